#!/usr/bin/env bash
# One device call that measures the GPU figures of bench/RESULTS.md still missing; each step has its own
# time limit so one slow step cannot cost the others. Needs the server wheels carried in .carry/wheels
# (pip download fastapi uvicorn httpx openai --python-version 3.12 --only-binary=:all: ...).
#   run: bash bench/gpu_session.sh   (writes logs and JSON under $OUT)
set -u
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
O=${OUT:-/tmp/gpu_session}
mkdir -p "$O"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "### $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$O/$name.log" 2>&1
  echo "### $name exit $?"
  grep -v "^W\|Warning\|warn(" "$O/$name.log" | tail -"${TAIL:-14}"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -d .carry/wheels ] && pip install -q --no-index --find-links .carry/wheels fastapi uvicorn httpx openai 2>&1 | tail -1
HBM=$(python -c "import jax; print(jax.devices()[0].memory_stats()['bytes_limit'])")
N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384)
echo "### device bytes_limit $HBM -> flash-layers-$N"
step prefill_cudnn 110 python -m mimo_jax.bench prefill --prompt-len 8192 --chunk 2048,4096 --reps 2 --json "$O/prefill.json"
step full_decode 200 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
  --batch 1,16,64 --context 1024,16384 --steps 16 --rounds 3 --json "$O/full_decode.json"
step full_prefill 90 python -m mimo_jax.bench prefill --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
  --prompt-len 8192 --chunk 2048 --reps 2 --json "$O/full_prefill.json"
if [ -f bench/bench_mtp.py ]; then step mtp 120 python bench/bench_mtp.py --json "$O/mtp.json"; fi
step server 150 python bench/bench_server.py --model flash-slice-4 --random-weights --tokenizer mimo_jax/demo_model \
  --dtype bfloat16 --concurrency 1,8,32 --requests-per-client 2 --repeats 1 --json "$O/server.json"
