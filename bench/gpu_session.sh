#!/usr/bin/env bash
# One device call that measures GPU figures for bench/RESULTS.md; each step has its own time limit so one
# slow step cannot cost the others. Logs and JSON under $OUT.
#   bash bench/gpu_session.sh one    # one GPU: prefill, partial-depth Flash in fp8, MTP, server (wheels in .carry/wheels)
#   bash bench/gpu_session.sh four   # four GPUs (kind nvidia-h200-x4): prefill on one GPU, MoE layer 1 vs 4 GPUs,
#                                    # full-depth Flash in fp8 over 4 GPUs
set -u
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 NCCL_NVLS_ENABLE=0
O=${OUT:-/tmp/gpu_session}
mkdir -p "$O"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "### $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$O/$name.log" 2>&1
  echo "### $name exit $?"
  grep -v "^W1\|^I1\|Warning\|warn(" "$O/$name.log" | grep "|\|#\|Error\|error" | tail -"${TAIL:-16}"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
HBM=$(CUDA_VISIBLE_DEVICES=0 python -c "import jax; print(jax.devices()[0].memory_stats()['bytes_limit'])")
case "${1:-one}" in
one)
  [ -d .carry/wheels ] && pip install -q --no-index --find-links .carry/wheels fastapi uvicorn httpx openai 2>&1 | tail -1
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384)
  echo "### device bytes_limit $HBM -> flash-layers-$N"
  step prefill_cudnn 110 python -m mimo_jax.bench prefill --prompt-len 8192 --chunk 2048,4096 --reps 2 --json "$O/prefill.json"
  step full_decode 200 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --batch 1,16,64 --context 1024,16384 --steps 16 --rounds 3 --json "$O/full_decode.json"
  step mtp 120 python bench/bench_mtp.py --json "$O/mtp.json"
  step server 150 python bench/bench_server.py --model flash-slice-4 --random-weights --tokenizer mimo_jax/demo_model \
    --dtype bfloat16 --concurrency 1,8,32 --requests-per-client 2 --repeats 1 --json "$O/server.json"
  ;;
four)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384 --mesh expert=4)
  echo "### device bytes_limit $HBM -> flash-layers-$N on expert=4"
  CUDA_VISIBLE_DEVICES=0 step prefill_cudnn 70 python -m mimo_jax.bench prefill --prompt-len 8192 --chunk 2048,4096 --reps 2
  step moe 75 python bench/bench_moe.py --meshes "expert=1;expert=4" --tokens 1,64,8192 --impls pallas_gpu \
    --strategies replicated --reps 10 --out "$O/moe.jsonl"
  step full_decode 190 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --mesh expert=4 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 3 --copy-mb 1024
  ;;
*) echo "usage: bash bench/gpu_session.sh one|four" >&2; exit 2 ;;
esac
