#!/usr/bin/env bash
# Batch inference on a Cloud TPU VM slice: the same command on every worker
# (`gcloud compute tpus tpu-vm ssh --worker=all`), one process per worker, one global mesh.
# Arguments are passed to `python -m mimo_jax.batch` unchanged.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh --model /mnt/ckpt/MiMo-V2-Flash --weights fp8 \
#       --input ~/prompts.jsonl --output ~/results.jsonl --mesh tensor=4,expert=8 --max-batch 128
#
# Worker 0 is process 0 and the coordinator: --input and --output are paths on worker 0 (copy the
# prompts there with `gcloud compute tpus tpu-vm scp FILE $TPU_NAME:~/ --worker=0`). The checkpoint
# must be readable at --model on every worker (a disk attached read-only to all workers, or gcsfuse).
#
# Environment:
#   TPU_NAME, ZONE  the slice (required); PROJECT (optional)
#   WORKERS         number of workers           (default: from `gcloud ... describe`)
#   COORDINATOR_IP  worker 0's internal address (default: from `gcloud ... describe`)
#   PORT            coordinator port            (default 8476)
#   WORKDIR         repository on the workers   (default ~/mimo_jax)
#   PYTHON          python on the workers       (default python3)
#   SYNC=1          first copy this checkout to WORKDIR on every worker
#   SETUP=1         first pip install "jax[tpu]" and the repository on every worker
#   DRY_RUN=1       print the commands instead of running them
set -euo pipefail

# Quote for a remote shell, readably: 'it'\''s' (printf %q escapes commas and spaces with backslashes).
shquote() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $arg"; else out+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}

: "${TPU_NAME:?set TPU_NAME (the TPU VM slice)}"
: "${ZONE:?set ZONE (the zone of the slice)}"
PORT=${PORT:-8476}
WORKDIR=${WORKDIR:-'~/mimo_jax'}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("$TPU_NAME" --zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then where+=(--project "$PROJECT"); fi

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    shquote "$@"
    echo
  else
    "$@"
  fi
}

if [[ -z "${WORKERS:-}" || -z "${COORDINATOR_IP:-}" ]]; then
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    WORKERS=${WORKERS:-"<workers>"}
    COORDINATOR_IP=${COORDINATOR_IP:-"<worker-0-ip>"}
  else
    endpoints=$("${gcloud_tpu[@]}" describe "${where[@]}" --format='value(networkEndpoints[].ipAddress)')
    read -r -a ips <<<"${endpoints//;/ }"
    if [[ -z "${WORKERS:-}" ]]; then WORKERS=${#ips[@]}; fi
    if [[ -z "${COORDINATOR_IP:-}" ]]; then COORDINATOR_IP=${ips[0]}; fi
  fi
fi

if [[ "${SYNC:-0}" == 1 ]]; then
  run "${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all --command "mkdir -p $WORKDIR"
  run "${gcloud_tpu[@]}" scp --recurse "$REPO/mimo_jax" "$REPO/setup.cfg" "$REPO/pyproject.toml" "$REPO/README.md" \
    "$TPU_NAME:$WORKDIR/" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all
fi
if [[ "${SETUP:-0}" == 1 ]]; then
  run "${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all \
    --command "$PYTHON -m pip install -q -U 'jax[tpu]' && $PYTHON -m pip install -q -e $WORKDIR"
fi

# Each worker reads its own number from the metadata server: that is its process id.
worker_id='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
remote="cd $WORKDIR && MIMO_COORDINATOR_ADDRESS=$COORDINATOR_IP:$PORT MIMO_NUM_PROCESSES=$WORKERS"
remote+=" MIMO_PROCESS_ID=$worker_id $PYTHON -m mimo_jax.batch $(shquote "$@")"
run "${gcloud_tpu[@]}" ssh "${where[@]}" --worker=all --command "$remote"
