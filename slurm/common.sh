# shellcheck shell=bash
# Shared by the sbatch scripts (sourced, not run). Site-specific values come from environment
# variables, each with a default; slurm/README.md lists them.
#
#   ENSEMBLE_REPO           the repository (default: the directory sbatch was called from)
#   ENSEMBLE_PYTHON         the Python with the project installed (default: python3 on PATH)
#   ENSEMBLE_PROCS_PER_NODE processes per node (default: the node's allocated GPUs; 1 without GPUs)
#   ENSEMBLE_ACCELERATE_CONFIG  run under `accelerate launch` with this config file (default: none:
#                           the scripts' own --processes; DeepSpeed also comes from parallel.deepspeed)
#   ENSEMBLE_MAIN_PORT      rendezvous port on the first node (default: 20000 + job id % 20000)
#   ENSEMBLE_REQUEUE        1: requeue the job after the warning signal; 0: just stop (default: 1)

ENSEMBLE_REPO="${ENSEMBLE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
ENSEMBLE_PYTHON="${ENSEMBLE_PYTHON:-python3}"
ENSEMBLE_REQUEUE="${ENSEMBLE_REQUEUE:-1}"
ENSEMBLE_PREEMPTED_EXIT=75 # launch/train.py: stopped by a signal after saving checkpoints
export ENSEMBLE_REPO ENSEMBLE_PYTHON

log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S)" "${SLURM_JOB_ID:-?}" "$*" >&2; }

die() {
    log "error: $*"
    exit 2
}

check_setup() {
    [[ -f "$ENSEMBLE_REPO/launch/train.py" ]] ||
        die "ENSEMBLE_REPO=$ENSEMBLE_REPO is not the repository (no launch/train.py); submit from the repository root or set ENSEMBLE_REPO"
    command -v "$ENSEMBLE_PYTHON" >/dev/null ||
        die "ENSEMBLE_PYTHON=$ENSEMBLE_PYTHON not found; set it to the Python of the environment with the project installed (e.g. .venv/bin/python)"
    "$ENSEMBLE_PYTHON" -c 'import ensemble, accelerate' 2>/dev/null ||
        die "ENSEMBLE_PYTHON=$ENSEMBLE_PYTHON cannot import the project; install it (pip install -e .) or point ENSEMBLE_PYTHON at the right environment"
    cd "$ENSEMBLE_REPO" || die "cannot enter ENSEMBLE_REPO=$ENSEMBLE_REPO"
}

# The address the other nodes reach the first node of the allocation at: its NodeAddr in Slurm
# (which is the node name unless the site set another), not this host's idea of its own name.
main_address() {
    local -a hosts words
    local word
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    read -r -a words < <(scontrol show node --oneliner "${hosts[0]}")
    for word in "${words[@]}"; do
        if [[ $word == NodeAddr=* ]]; then
            echo "${word#NodeAddr=}"
            return
        fi
    done
    echo "${hosts[0]}"
}

# Runs SCRIPT ARGS... (launch/train.py, evaluate.py or distill.py) on every node of the
# allocation, one launcher per node (slurm/launch_node.sh: the script's own --processes), and
# waits for it. Sets STEP_STATUS to the step's exit status (srun's: the highest of the nodes') and
# STOP_SIGNALLED=1 when the job got the warning signal meanwhile. The signal is passed on to the
# step: srun delivers it to every process of the step, and the Python workers checkpoint and exit.
run_step() {
    local nodes="${SLURM_JOB_NUM_NODES:-1}"
    local -a step=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0)
    # Since Slurm 22.05 a step no longer inherits the job's --cpus-per-task: ask for it again,
    # or the launcher and its workers would share one CPU.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    ENSEMBLE_MAIN_ADDR="${ENSEMBLE_MAIN_ADDR:-$(main_address)}"
    ENSEMBLE_MAIN_PORT="${ENSEMBLE_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export ENSEMBLE_MAIN_ADDR ENSEMBLE_MAIN_PORT
    log "running on $nodes node(s) ($SLURM_JOB_NODELIST), rendezvous at $ENSEMBLE_MAIN_ADDR:$ENSEMBLE_MAIN_PORT: $*"

    STOP_SIGNALLED=0
    local pid
    trap 'STOP_SIGNALLED=1; log "warning signal (USR1): checkpointing"; kill -USR1 "$pid" 2>/dev/null || true' USR1
    "${step[@]}" "$ENSEMBLE_REPO/slurm/launch_node.sh" "$@" &
    pid=$!
    # `wait` returns early when a trapped signal arrives; wait again until the step has ended.
    while true; do
        STEP_STATUS=0
        wait "$pid" || STEP_STATUS=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1
}

# `scontrol requeue` on this job, tried 3 times: a controller that is busy (e.g. with many jobs
# ending at their time limit) can time out one request, and without a retry the job would end
# FAILED and its dependants never run. (submitit and Lightning's SLURM plugin try once.)
requeue_self() {
    local try
    for try in 1 2 3; do
        scontrol requeue "$SLURM_JOB_ID" && return 0
        log "scontrol requeue failed (try $try of 3)"
        [[ $try -eq 3 ]] || sleep $((10 * try))
    done
    return 1
}

# After training (or distillation: `finish_training distillation`): requeue the job when it
# stopped on the warning signal, so that it continues from its checkpoints (the scripts always
# pass --resume auto). Exits the script.
finish_training() {
    local what="${1:-training}"
    if [[ $STEP_STATUS -eq 0 ]]; then
        log "$what finished"
        exit 0
    fi
    if [[ $STOP_SIGNALLED -eq 1 || $STEP_STATUS -eq $ENSEMBLE_PREEMPTED_EXIT ]]; then
        # The signal we saw counts as well as the status: under accelerate launch
        # (ENSEMBLE_ACCELERATE_CONFIG) the step exits 1 even when every worker exited 75.
        if [[ $ENSEMBLE_REQUEUE == 1 ]]; then
            # (an array task has its own SLURM_JOB_ID: this requeues only this task)
            log "stopped after checkpointing (status $STEP_STATUS): requeueing job $SLURM_JOB_ID; it resumes from its checkpoints"
            requeue_self && exit 0
            log "error: could not requeue job $SLURM_JOB_ID; its checkpoints are kept: submit the same command again to continue"
            exit "$ENSEMBLE_PREEMPTED_EXIT"
        fi
        log "stopped after checkpointing (status $STEP_STATUS); ENSEMBLE_REQUEUE=0: resubmit to continue"
        exit "$ENSEMBLE_PREEMPTED_EXIT"
    fi
    log "$what failed (status $STEP_STATUS); see the error above"
    exit "$STEP_STATUS"
}
