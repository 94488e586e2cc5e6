#!/usr/bin/env bash
# The body of train.sbatch and train_multinode.sbatch, run by the batch shell on the first node.
# See docs/slurm.md. Arguments: those of launch/train.py (--config FILE key=value ...).
#
# - One `accelerate launch` per node (srun, one task per node): main address = the first node of
#   `scontrol show hostnames`, machine rank = SLURM_NODEID, a free port.
# - Run folder runs/<job name>/<job id> (or the run.dir=... given), always `--resume auto`: the
#   first start begins afresh, a requeued start (SLURM_RESTART_COUNT > 0) continues from the
#   latest checkpoint, with the W&B run id kept in the run folder.
# - On SIGUSR1 (sbatch --signal=B:USR1@<seconds>, or `scancel --signal=USR1 --batch JOB`) the
#   signal goes to every process of the training step on every node; the launchers ignore it,
#   the ranks finish their step, checkpoint and exit; then the job requeues itself. A signal
#   before training started requeues at once; a refused requeue fails the job (exit 1, with the
#   reason in the job log).
#
# Environment: MMVAE_CPU_PROCS=N runs N CPU processes per node instead of one per GPU (test
# clusters, laptops); MMVAE_PYTHON (default .venv/bin/python, else python); MMVAE_ROOT (the
# checkout; default the submission directory).
set -uo pipefail

# The trap comes first: a SIGUSR1 that arrives while this script is still starting (the Python
# port probe takes a second) would otherwise kill the batch shell, and with it the job.
STOP=0
STEP_STARTED=0
forward_stop() {
    STOP=1
    (( STEP_STARTED )) || return 0  # nothing to signal yet: the job requeues before training
    echo "mmvae: SIGUSR1 (time limit or preemption ahead): the ranks checkpoint and stop" >&2
    scancel --signal=USR1 "$SLURM_JOB_ID"  # every step on every node; not this batch shell
}
trap forward_stop USR1

# Requeue this job (it restarts with the same id and run folder and resumes); a refused requeue
# (the job was submitted with --no-requeue, or the cluster forbids it) fails the job, saying so.
requeue() {
    local out
    echo "mmvae: $1; requeueing job $SLURM_JOB_ID to resume" >&2
    if ! out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
        echo "mmvae: scontrol requeue $SLURM_JOB_ID failed (${out:-no output}): nothing is lost;" \
             "resubmit with run.dir=$RUN_DIR to resume" >&2
        exit 1
    fi
    exit 0
}

cd "${MMVAE_ROOT:-$SLURM_SUBMIT_DIR}" || exit 1
if [[ -z ${MMVAE_PYTHON:-} ]]; then
    MMVAE_PYTHON=python
    [[ -x .venv/bin/python ]] && MMVAE_PYTHON=.venv/bin/python
fi
RUN_DIR=runs/$SLURM_JOB_NAME/$SLURM_JOB_ID
for arg in "$@"; do [[ $arg == run.dir=* ]] && RUN_DIR=${arg#run.dir=}; done  # user's choice
NODES=${SLURM_JOB_NUM_NODES:-1}

if [[ -n ${MMVAE_CPU_PROCS:-} ]]; then
    PER_NODE=$MMVAE_CPU_PROCS
    export CUDA_VISIBLE_DEVICES=""  # the trainer uses Accelerator(cpu=True) without a GPU
else
    PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
    if (( PER_NODE < 1 )); then
        echo "mmvae: no GPU in the allocation (sbatch --gpus-per-node=N), or set" \
             "MMVAE_CPU_PROCS=N for N CPU processes per node" >&2
        exit 2
    fi
fi
TOTAL=$(( PER_NODE * NODES ))
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
(( NODES == 1 )) && MAIN_ADDR=127.0.0.1
PORT=$("$MMVAE_PYTHON" -c \
    'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')

LAUNCH=(-m accelerate.commands.launch --num_machines "$NODES" --num_processes "$TOTAL"
        --main_process_ip "$MAIN_ADDR" --main_process_port "$PORT"
        --mixed_precision no --dynamo_backend no)  # the config's train.mixed_precision decides
(( TOTAL > 1 )) && LAUNCH+=(--multi_gpu)  # also for CPU processes (gloo), see ENVIRONMENT.md
TRAIN=(launch/train.py --resume auto "run.dir=$RUN_DIR" "$@")
# Per node: ignore USR1 in the launcher (torchrun would die of it and take the ranks along; they
# get it from SLURM directly), and take the machine rank from that node's SLURM_NODEID.
NODE_CMD="trap '' USR1; exec $(printf '%q ' "$MMVAE_PYTHON" "${LAUNCH[@]}")"
NODE_CMD+='--machine_rank "$SLURM_NODEID" '"$(printf '%q ' "${TRAIN[@]}")"

echo "mmvae: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NODES node(s) x" \
     "$PER_NODE process(es), main $MAIN_ADDR:$PORT, run folder $RUN_DIR" >&2

(( STOP )) && requeue "SIGUSR1 before training started"

# One task per node runs the launcher and all of that node's ranks: it gets the job's
# --cpus-per-task (the sbatch scripts ask for 8 by default), else every CPU of the allocation.
srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 \
     --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" --kill-on-bad-exit=1 \
     bash -c "$NODE_CMD" &
STEP_PID=$!
STEP_STARTED=1
(( STOP )) && forward_stop  # a signal between the check above and here
while :; do
    wait "$STEP_PID"
    RC=$?
    kill -0 "$STEP_PID" 2>/dev/null || break  # else a trapped signal interrupted `wait`
done

if (( STOP && RC == 0 )) && [[ ! -f $RUN_DIR/summary.json ]]; then
    requeue "checkpoint written"
fi
exit "$RC"
