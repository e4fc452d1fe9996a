#!/usr/bin/env bash
# One device call that measures GPU figures for bench/RESULTS.md; each step has its own time limit so one
# slow step cannot cost the others. Logs and JSON under $OUT.
#   bash bench/gpu_session.sh one    # one GPU: prefill, partial-depth Flash in fp8, MTP, server (wheels in .carry/wheels)
#   bash bench/gpu_session.sh two-c  # the largest real-pattern Flash prefix that fits 2 GPUs (tensor=2), fp8: decode, prefill
#   bash bench/gpu_session.sh four-e # four GPUs (nvidia-h200-x4): fp8 kernel tiles at a tensor=4 shard's size, full
#                                    # Flash decode with XLA command buffers, MoE layer 1 vs 4 GPUs at 8 layers per call
#   bash bench/gpu_session.sh four-f # four GPUs: full Flash decode at batch 16 and 64 (1K, 16K) and a 32K prefill
# The modes of earlier runs (four, two-a, two-b, two-rest, four-a .. four-d) are in this file's history at the
# commits bench/RESULTS.md names beside their figures.
# With OUT set, logs and JSON are packed into $OUT/session.tgz at the end (the device returns at most 8 files).
set -u
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 NCCL_NVLS_ENABLE=0
O=/tmp/gpu_session
mkdir -p "$O"
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/session.tgz" -C "$O" . ; }
trap pack EXIT
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
two-c)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384 --mesh tensor=2)
  echo "### device bytes_limit $HBM -> flash-layers-$N on tensor=2"
  step full_decode 300 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --mesh tensor=2 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 3 --copy-mb 1024 --no-experts-count \
    --json "$O/full_decode.json"
  step full_prefill 200 python -m mimo_jax.bench prefill --model "flash-layers-$N" --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=2 --prompt-len 1024,8192,32768 --chunk 8192 --reps 1 --copy-mb 1024 \
    --json "$O/full_prefill.json"
  ;;
four-e)
  # batch 1 on tensor=4 (8 experts x 4 column tiles = 32 programs), and prefill: w8a8 since activations are prepared
  # before the kernel (it took 92 ms at 8192 tokens with the per-step quantization)
  CUDA_VISIBLE_DEVICES=0 TAIL=12 step kernel512 120 python bench/bench_moe_kernel.py --skip-checks --intermediate 512 \
    --weights fp8,fp8-w8a8 --tokens 1,16,8192 --sweep-budget 80
  # the ~2 ms per step between a decode round's ~2,000 kernels: XLA command buffers (CUDA graphs) with the loop inside
  XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE \
    TAIL=20 step full_decode_t4_graphs 100 python -m mimo_jax.bench decode --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --batch 16 --context 1024 --steps 16 --rounds 2 --copy-mb 1024 \
    --no-experts-count --json "$O/full_decode_t4_graphs.json"
  for w in bf16 fp8; do
    TAIL=30 step "moe4_$w" 90 python bench/bench_moe.py --meshes "expert=1;expert=4" --tokens 1,64,8192 \
      --impls pallas_gpu --strategies replicated --weights $w --reps 10 --layers-per-call 8 --profile 6 \
      --out "$O/moe4_$w.jsonl"
  done
  ;;
four-f)
  TAIL=40 step full_decode_t4 300 python -m mimo_jax.bench decode --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --batch 16,64 --context 1024,16384 --steps 16 --rounds 2 --copy-mb 1024 \
    --no-experts-count --profile 8 --json "$O/full_decode_t4.json"
  TAIL=30 step full_prefill_t4_32k 120 python -m mimo_jax.bench prefill --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --prompt-len 32768 --chunk 8192 --reps 1 --copy-mb 1024 \
    --json "$O/full_prefill_t4_32k.json"
  ;;
*) echo "usage: bash bench/gpu_session.sh one|two-c|four-e|four-f" >&2; exit 2 ;;
esac
