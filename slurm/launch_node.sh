#!/usr/bin/env bash
# One node's launcher, started by srun on every node of a job (one task per node, see run_step in
# slurm/common.sh): runs `accelerate launch SCRIPT ARGS...` with this node's machine rank.
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

cmd=("$ENSEMBLE_PYTHON" -m accelerate.commands.launch)
if [[ -n "${ENSEMBLE_ACCELERATE_CONFIG:-}" ]]; then
    cmd+=(--config_file "$ENSEMBLE_ACCELERATE_CONFIG")
fi
cmd+=(
    --num_machines "$nodes"
    --machine_rank "$SLURM_NODEID"
    --num_processes "$((procs * nodes))"
    --main_process_ip "$ENSEMBLE_MAIN_ADDR"
    --main_process_port "$ENSEMBLE_MAIN_PORT"
)
if [[ $gpus -eq 0 ]]; then
    # CPU: each process gets its share of this node's allocated CPUs. Accelerate starts several
    # CPU processes only through MPI, so they go through its torchrun-based launcher
    # (--multi_gpu), which on a node without GPUs runs them on the CPU with gloo (as
    # configs/accelerate/cpu-debug.yaml does); hiding any GPUs keeps them there.
    cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
    cmd+=(--num_cpu_threads_per_process "$(((cpus + procs - 1) / procs))")
    if [[ $((procs * nodes)) -gt 1 ]]; then
        cmd+=(--multi_gpu)
        export CUDA_VISIBLE_DEVICES=""
    else
        cmd+=(--cpu)
    fi
elif [[ -z "${ENSEMBLE_ACCELERATE_CONFIG:-}" && $((procs * nodes)) -gt 1 ]]; then
    cmd+=(--multi_gpu)
fi
if [[ -z "${ENSEMBLE_ACCELERATE_CONFIG:-}" ]]; then
    cmd+=(--mixed_precision no --dynamo_backend no) # precision: the config's train.mixed_precision
fi
cmd+=("$@")

echo "$(date +%H:%M:%S) [node $SLURM_NODEID of $nodes, $(hostname)] ${cmd[*]}" >&2
# The job's warning signal (USR1) reaches every process of the step. The launcher must ignore
# it (its default action would kill it and orphan the workers); the workers set their own
# handler, checkpoint and exit, and the launcher then exits with them.
trap '' USR1
exec "${cmd[@]}"
