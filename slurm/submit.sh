#!/usr/bin/env bash
# Submit the whole pipeline: training (a job array with one task per member, or one multi-node
# job), optionally the distillation of the members into one student (--distill), then the
# evaluation; each job starts only once the one before has succeeded (afterok). Prints the job
# ids.
#
#   slurm/submit.sh [options] [-- launch/train.py arguments (key=value overrides)]
#
# Options (defaults in brackets; every one can also come from the environment variable named):
#   --mode array|multinode    how to train [array]                       ENSEMBLE_MODE
#   --config FILE             experiment config [configs/tiny.yaml]      ENSEMBLE_CONFIG
#   --partition NAME          Slurm partition [the cluster's default]    ENSEMBLE_PARTITION
#   --account NAME            Slurm account [your default]               ENSEMBLE_ACCOUNT
#   --gpus-per-task N         GPUs per array task, or per node in multinode mode; 0 trains
#                             on CPUs [0]                                ENSEMBLE_GPUS_PER_TASK
#   --cpus-per-task N         CPUs per array task / per node [the cluster's default]
#                                                                        ENSEMBLE_CPUS_PER_TASK
#   --nodes N                 nodes of the multinode job [2]             ENSEMBLE_NODES
#   --procs-per-node N        training processes per node [one per GPU; 1 on CPUs]
#   --eval-procs-per-node N   evaluation processes per node [as for training]
#   --members LIST            array mode: member indices to train, e.g. 1 or 0,2 [all]
#   --time T                  training time limit per job, e.g. 04:00:00 [the partition's]
#                                                                        ENSEMBLE_TIME
#   --eval-time T             evaluation time limit [the partition's]   ENSEMBLE_EVAL_TIME
#   --distill                 distil the members into a student after training (1 node,
#                             processes as for the evaluation)           ENSEMBLE_DISTILL=1
#   --distill-arg KEY=VALUE   an override for launch/distill.py, e.g. distill.alpha=0.8
#                             (repeatable; implies --distill)
#   --distill-time T          distillation time limit [the partition's] ENSEMBLE_DISTILL_TIME
#   --signal-lead S           seconds before the time limit at which training checkpoints
#                             and requeues [120]                         ENSEMBLE_SIGNAL_LEAD
#   --sbatch-arg ARG          passed to every sbatch call, e.g. --sbatch-arg=--mem=64G
#                             (repeatable)
#   --dry-run                 print the sbatch commands instead of running them
#
# Submit from anywhere: the jobs run in this repository (ENSEMBLE_REPO) with ENSEMBLE_PYTHON
# (default: python3 on PATH; activate the project's environment first). See slurm/README.md.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ENSEMBLE_REPO="${ENSEMBLE_REPO:-$repo}"
python="${ENSEMBLE_PYTHON:-python3}"

mode="${ENSEMBLE_MODE:-array}"
config="${ENSEMBLE_CONFIG:-configs/tiny.yaml}"
partition="${ENSEMBLE_PARTITION:-}"
account="${ENSEMBLE_ACCOUNT:-}"
gpus="${ENSEMBLE_GPUS_PER_TASK:-0}"
cpus="${ENSEMBLE_CPUS_PER_TASK:-}"
nodes="${ENSEMBLE_NODES:-2}"
procs=""
eval_procs=""
members=""
time_limit="${ENSEMBLE_TIME:-}"
eval_time="${ENSEMBLE_EVAL_TIME:-}"
signal_lead="${ENSEMBLE_SIGNAL_LEAD:-120}"
distill="${ENSEMBLE_DISTILL:-0}"
distill_time="${ENSEMBLE_DISTILL_TIME:-}"
distill_args=()
dry_run=0
extra=()

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "${1:-0}"
}
fail() {
    echo "submit.sh: error: $*" >&2
    exit 2
}
need() { [[ $# -ge 2 && -n "$2" ]] || fail "$1 needs a value (see --help)"; }
natural() { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1 $2: expected a whole number"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
    --mode) need "$@"; mode="$2"; shift 2 ;;
    --config) need "$@"; config="$2"; shift 2 ;;
    --partition) need "$@"; partition="$2"; shift 2 ;;
    --account) need "$@"; account="$2"; shift 2 ;;
    --gpus-per-task) need "$@"; natural "$1" "$2"; gpus="$2"; shift 2 ;;
    --cpus-per-task) need "$@"; natural "$1" "$2"; cpus="$2"; shift 2 ;;
    --nodes) need "$@"; natural "$1" "$2"; nodes="$2"; shift 2 ;;
    --procs-per-node) need "$@"; natural "$1" "$2"; procs="$2"; shift 2 ;;
    --eval-procs-per-node) need "$@"; natural "$1" "$2"; eval_procs="$2"; shift 2 ;;
    --members) need "$@"; members="$2"; shift 2 ;;
    --time) need "$@"; time_limit="$2"; shift 2 ;;
    --eval-time) need "$@"; eval_time="$2"; shift 2 ;;
    --signal-lead) need "$@"; natural "$1" "$2"; signal_lead="$2"; shift 2 ;;
    --distill) distill=1; shift ;;
    --distill-arg) need "$@"; distill=1; distill_args+=("$2"); shift 2 ;;
    --distill-arg=*) distill=1; distill_args+=("${1#--distill-arg=}"); shift ;;
    --distill-time) need "$@"; distill_time="$2"; shift 2 ;;
    --sbatch-arg) need "$@"; extra+=("$2"); shift 2 ;;
    --sbatch-arg=*) extra+=("${1#--sbatch-arg=}"); shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) fail "unknown option $1; launch/train.py arguments go after --, e.g. -- train.lr=3e-4 (see --help)" ;;
    esac
done
train_args=(--config "$config" "$@")

[[ "$mode" == array || "$mode" == multinode ]] || fail "--mode $mode: use array or multinode"
[[ "$distill" == 0 || "$distill" == 1 ]] || fail "ENSEMBLE_DISTILL=$distill: use 0 or 1"
for arg in "${distill_args[@]}"; do
    [[ "$arg" =~ ^(distill|train|eval|checkpoint|tracking)\.[A-Za-z_.]+= ]] ||
        fail "--distill-arg $arg: expected an override such as distill.alpha=0.8 (distill.*, train.*, eval.*, checkpoint.*, tracking.*)"
done
cd "$ENSEMBLE_REPO"
[[ -f "$config" ]] || fail "config $config not found (paths are relative to $ENSEMBLE_REPO)"
command -v "$python" >/dev/null || fail "ENSEMBLE_PYTHON=$python not found; activate the project's environment or set ENSEMBLE_PYTHON"
command -v sbatch >/dev/null || fail "sbatch not found: run this on a Slurm login node"

# The config is checked here, before anything is queued; the run directory and the members
# come from it (with the overrides).
run_dir="$("$python" launch/train.py "${train_args[@]}" --get output.dir)" || fail "the config above is invalid"
mapfile -t listed < <("$python" launch/train.py "${train_args[@]}" --list-members)
all_members=()
for line in "${listed[@]}"; do
    all_members+=("${line%% *}")
done
if [[ -n "$members" && "$mode" != array ]]; then
    fail "--members selects array tasks; use it with --mode array"
fi
array="0-$((${#all_members[@]} - 1))"
if [[ -n "$members" ]]; then
    [[ "$members" =~ ^[0-9]+(,[0-9]+)*$ ]] || fail "--members $members: expected indices like 1 or 0,2"
    IFS=, read -r -a chosen <<<"$members"
    for i in "${chosen[@]}"; do
        ((i < ${#all_members[@]})) || fail "--members: index $i, but the config has ${#all_members[@]} members (0-$((${#all_members[@]} - 1)))"
    done
    array="$members"
fi

common=()
[[ -n "$partition" ]] && common+=(--partition="$partition")
[[ -n "$account" ]] && common+=(--account="$account")
common+=("${extra[@]}")

train=(sbatch --parsable "${common[@]}" --signal="B:USR1@$signal_lead")
evaluate=(sbatch --parsable "${common[@]}" --kill-on-invalid-dep=yes)
distil=(sbatch --parsable "${common[@]}" --kill-on-invalid-dep=yes --signal="B:USR1@$signal_lead")
[[ -n "$time_limit" ]] && train+=(--time="$time_limit")
[[ -n "$eval_time" ]] && evaluate+=(--time="$eval_time")
[[ -n "$distill_time" ]] && distil+=(--time="$distill_time")
if [[ "$gpus" -gt 0 ]]; then
    train+=(--gpus-per-node="$gpus")
    evaluate+=(--gpus-per-node="$gpus")
    distil+=(--gpus-per-node="$gpus")
fi
if [[ -n "$cpus" ]]; then
    train+=(--cpus-per-task="$cpus")
    evaluate+=(--cpus-per-task="$cpus")
    distil+=(--cpus-per-task="$cpus")
fi
train_env="ALL"
[[ -n "$procs" ]] && train_env+=",ENSEMBLE_PROCS_PER_NODE=$procs"
eval_env="ALL"
[[ -n "${eval_procs:-$procs}" ]] && eval_env+=",ENSEMBLE_PROCS_PER_NODE=${eval_procs:-$procs}"
train+=(--export="$train_env")
evaluate+=(--export="$eval_env")
distil+=(--export="$eval_env")
if [[ "$mode" == array ]]; then
    train+=(--array="$array" slurm/train_array.sbatch "${train_args[@]}")
    what="array $array, one task per member"
else
    train+=(--nodes="$nodes" slurm/train_multinode.sbatch "${train_args[@]}")
    what="$nodes nodes"
fi

distil+=(slurm/distill.sbatch "$run_dir" "${distill_args[@]}")
if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${train[@]}"
    echo
    before="<training job>"
    if [[ $distill -eq 1 ]]; then
        printf '%q ' "${distil[@]:0:2}" "--dependency=afterok:$before" "${distil[@]:2}"
        echo
        before="<distillation job>"
    fi
    printf '%q ' "${evaluate[@]}" "--dependency=afterok:$before" slurm/evaluate.sbatch "$run_dir"
    echo
    exit 0
fi
train_job="$("${train[@]}")"
train_job="${train_job%%;*}" # --parsable prints "id" or "id;cluster"
echo "training job $train_job ($what) -> $run_dir"
before="$train_job"
jobs="$train_job"
if [[ $distill -eq 1 ]]; then
    distill_job="$("${distil[@]:0:2}" --dependency="afterok:$train_job" "${distil[@]:2}")"
    distill_job="${distill_job%%;*}"
    echo "distillation job $distill_job (starts when every training task has succeeded) -> $run_dir/student"
    before="$distill_job"
    jobs+=",$distill_job"
fi
eval_job="$("${evaluate[@]}" --dependency="afterok:$before" slurm/evaluate.sbatch "$run_dir")"
eval_job="${eval_job%%;*}"
echo "evaluation job $eval_job (starts when the job before it has succeeded)"
echo "watch: squeue -j $jobs,$eval_job    logs: $ENSEMBLE_REPO/ensemble-{train,distill,eval}-*.out"
