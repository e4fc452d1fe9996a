#!/usr/bin/env bash
# Batch inference over several GPU nodes: one process per node (each sees all of its node's GPUs),
# all on one global mesh. Arguments are passed to `python -m mimo_jax.batch` unchanged.
#
#   HOSTS="gpu0 gpu1" launch/gpu_multinode.sh --model /ckpt/MiMo-V2-Flash --weights fp8 \
#       --input prompts.jsonl --output results.jsonl --mesh tensor=8,expert=2
#
# Inside a Slurm allocation (salloc/sbatch --nodes=N) HOSTS defaults to the allocation's nodes and
# the processes start with `srun --ntasks-per-node=1`; otherwise each host is reached over ssh.
# The first host is the coordinator and process 0: --input and --output are paths on it. The
# repository and the checkpoint must be at the same paths on every node.
#
# Environment:
#   HOSTS     nodes, in process order                 (default: the Slurm nodelist)
#   PORT      coordinator port on the first host      (default 8476)
#   WORKDIR   repository directory on the nodes       (default: this checkout)
#   PYTHON    python with mimo_jax and jax[cuda] installed (default: python3)
#   SSH       ssh command                             (default: ssh -o BatchMode=yes)
#   DRY_RUN=1 print each node's command instead of running it
set -euo pipefail

# Quote for a remote shell, readably: 'it'\''s' (printf %q escapes commas and spaces with backslashes).
shquote() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $arg"; else out+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}

WORKDIR=${WORKDIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-python3}
PORT=${PORT:-8476}
SSH=${SSH:-ssh -o BatchMode=yes}

if [[ -z "${HOSTS:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')
  USE_SRUN=1
fi
if [[ -z "${HOSTS:-}" ]]; then
  echo "gpu_multinode.sh: set HOSTS=\"node0 node1 ...\" (or run inside a Slurm allocation)" >&2
  exit 2
fi
read -r -a HOST_LIST <<<"$HOSTS"
NUM=${#HOST_LIST[@]}
COORDINATOR="${HOST_LIST[0]}:$PORT"

# XLA_PYTHON_CLIENT_MEM_FRACTION: let JAX take most of each GPU (weights + KV cache are planned up front).
export MIMO_COORDINATOR_ADDRESS=$COORDINATOR MIMO_NUM_PROCESSES=$NUM XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

if [[ "${USE_SRUN:-0}" == 1 ]]; then
  # One Slurm task per node (srun passes the environment on); SLURM_PROCID is the process id.
  cmd=(srun "--nodes=$NUM" "--ntasks=$NUM" --ntasks-per-node=1 bash -c
    'cd "$0" && MIMO_PROCESS_ID=$SLURM_PROCID exec "$1" -m mimo_jax.batch "${@:2}"' "$WORKDIR" "$PYTHON" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    shquote "${cmd[@]}"
    echo
    exit 0
  fi
  exec "${cmd[@]}"
fi

remote_env="MIMO_COORDINATOR_ADDRESS=$COORDINATOR MIMO_NUM_PROCESSES=$NUM XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"
remote_args=" $(shquote "$@")"
pids=()
for pid in "${!HOST_LIST[@]}"; do
  host=${HOST_LIST[$pid]}
  remote="cd $(shquote "$WORKDIR") && env $remote_env MIMO_PROCESS_ID=$pid $PYTHON -m mimo_jax.batch$remote_args"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "$SSH $host $remote"
    continue
  fi
  # shellcheck disable=SC2086  # SSH holds a command and its options
  $SSH "$host" "$remote" 2>&1 | sed "s/^/[$host] /" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || status=$?
done
exit $status
