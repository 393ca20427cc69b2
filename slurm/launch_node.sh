#!/usr/bin/env bash
# One node's launcher, started by srun on every node of a job (one task per node, see run_step in
# slurm/common.sh): runs `python SCRIPT --processes N --nodes K --node-rank I ... ARGS...` (or,
# with ENSEMBLE_ACCELERATE_CONFIG, `accelerate launch`) with this node's rank.
#
# Every value is read here, on the node, not in the batch script: SLURM_NODEID is this node's
# index (the batch script runs on the first node, where it is always 0), and the GPUs are this
# node's.
set -euo pipefail

: "${SLURM_NODEID:?launch_node.sh runs under srun, one task per node (see slurm/common.sh)}"
: "${ENSEMBLE_MAIN_ADDR:?set by run_step in slurm/common.sh}"
: "${ENSEMBLE_MAIN_PORT:?set by run_step in slurm/common.sh}"
: "${ENSEMBLE_PYTHON:=python3}"
if [[ $# -lt 1 ]]; then
    echo "usage: launch_node.sh SCRIPT [ARGS...]" >&2
    exit 2
fi

nodes="${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}"

# GPUs of this node: Slurm's count, else CUDA_VISIBLE_DEVICES, else none.
gpus=0
if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    gpus="$SLURM_GPUS_ON_NODE"
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    gpus="${#visible[@]}"
fi
if [[ -n "${ENSEMBLE_PROCS_PER_NODE:-}" ]]; then
    procs="$ENSEMBLE_PROCS_PER_NODE"
elif [[ $gpus -gt 0 ]]; then
    procs="$gpus"
else
    procs=1
fi

script="$1"
shift
if [[ $gpus -eq 0 ]]; then
    # CPU: hide any GPUs of the node (they are not this job's), and give each process its share
    # of this node's allocated CPUs.
    export CUDA_VISIBLE_DEVICES=""
    cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
    threads="$(((cpus + procs - 1) / procs))"
fi

if [[ -z "${ENSEMBLE_ACCELERATE_CONFIG:-}" ]]; then
    # The entry script's own launcher (--processes, ensemble/runtime/launcher.py): the job's log shows a
    # mistake as its one error line, and the step ends with the ranks' own status (2, 75).
    [[ $gpus -gt 0 ]] || export OMP_NUM_THREADS="$threads"
    cmd=("$ENSEMBLE_PYTHON" "$script"
        --processes "$procs"
        --nodes "$nodes"
        --node-rank "$SLURM_NODEID"
        --main-address "$ENSEMBLE_MAIN_ADDR:$ENSEMBLE_MAIN_PORT"
        "$@")
else
    # `accelerate launch` with the site's config (e.g. DeepSpeed): it reports a failed rank with
    # its own traceback and exits 1 (the batch script tells a stop by the signal it saw).
    cmd=("$ENSEMBLE_PYTHON" -m accelerate.commands.launch
        --config_file "$ENSEMBLE_ACCELERATE_CONFIG"
        --num_machines "$nodes"
        --machine_rank "$SLURM_NODEID"
        --num_processes "$((procs * nodes))"
        --main_process_ip "$ENSEMBLE_MAIN_ADDR"
        --main_process_port "$ENSEMBLE_MAIN_PORT")
    if [[ $gpus -eq 0 ]]; then
        # Accelerate starts several CPU processes only through MPI, so they go through its
        # torchrun-based launcher (--multi_gpu), which on a node without GPUs runs them on the
        # CPU with gloo (as configs/accelerate/cpu-debug.yaml does).
        cmd+=(--num_cpu_threads_per_process "$threads")
        if [[ $((procs * nodes)) -gt 1 ]]; then cmd+=(--multi_gpu); else cmd+=(--cpu); fi
    fi
    cmd+=("$script" "$@")
fi

echo "$(date +%H:%M:%S) [node $SLURM_NODEID of $nodes, $(hostname)] ${cmd[*]}" >&2
# The job's warning signal (USR1) reaches every process of the step. Accelerate's launcher must
# ignore it (its default action would kill it and orphan the workers); ours passes it on (the
# workers take the two copies as one). The workers checkpoint and exit, the launcher with them.
trap '' USR1
exec "${cmd[@]}"
