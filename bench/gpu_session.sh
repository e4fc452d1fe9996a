#!/usr/bin/env bash
# One device call that measures GPU figures for bench/RESULTS.md; each step has its own time limit so one
# slow step cannot cost the others. Logs and JSON under $OUT.
#   bash bench/gpu_session.sh one    # one GPU: prefill, partial-depth Flash in fp8, MTP, server (wheels in .carry/wheels)
#   bash bench/gpu_session.sh four   # four GPUs (kind nvidia-h200-x4): prefill on one GPU, MoE layer 1 vs 4 GPUs,
#                                    # full-depth Flash in fp8 over 4 GPUs
#   bash bench/gpu_session.sh two-a  # two GPUs (kind nvidia-h200-x2), each running single-GPU benches side by side:
#                                    # GPU 0 prefill + MTP, GPU 1 MoE kernel sweep + server load
#   bash bench/gpu_session.sh two-b  # MoE layer on 1 vs 2 GPUs (replicated vs all_to_all; bf16, fp8)
#   bash bench/gpu_session.sh two-c  # the largest real-pattern Flash prefix that fits 2 GPUs, fp8: decode, prefill
#   bash bench/gpu_session.sh two-rest  # what two-a/b/c left unmeasured on 2026-11-27: fp8 kernel sweep incl. w8a8
#                                    # (GPU 1) beside the server at N = 1 and 64 (GPU 0), then full-depth decode
#   bash bench/gpu_session.sh four-a # four GPUs (nvidia-h200-x4): all 48 Flash layers in fp8 decoding on tensor=4; then side by
#                                    # side: server load (GPU 0), fp8/w8a8 kernel sweep (GPU 1), MoE layer 1 vs 2 GPUs (2, 3)
#   bash bench/gpu_session.sh four-b # four GPUs: full Flash fp8 prefill on tensor=4, decode on expert=4, MoE layer 1 vs 4 GPUs
#   bash bench/gpu_session.sh four-c # four GPUs: side by side server N=64 (GPU 0), fp8 kernel checks + timings (GPU 1),
#                                    # the kernel at one tensor=4 shard's expert size (GPU 2), fp8 MoE layer (GPU 3);
#                                    # then full Flash fp8 decode (batch 16, 1, 64 at 1K) and prefill on tensor=4
#   bash bench/gpu_session.sh four-d # four GPUs: MoE layer 1 vs 4 GPUs (bf16, fp8), full Flash decode at 16K context
#   bash bench/gpu_session.sh four-e # four GPUs, what four-a..d left: fp8 kernel tiles at a tensor=4 shard's size, full
#                                    # Flash decode with XLA command buffers, MoE layer 1 vs 4 GPUs at 8 layers per call
#   bash bench/gpu_session.sh four-f # four GPUs: full Flash decode at batch 16 and 64 (1K, 16K) and a 32K prefill
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
four)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384 --mesh expert=4)
  echo "### device bytes_limit $HBM -> flash-layers-$N on expert=4"
  CUDA_VISIBLE_DEVICES=0 step prefill_cudnn 70 python -m mimo_jax.bench prefill --prompt-len 8192 --chunk 2048,4096 --reps 2
  step moe 75 python bench/bench_moe.py --meshes "expert=1;expert=4" --tokens 1,64,8192 --impls pallas_gpu \
    --strategies replicated --reps 10 --out "$O/moe.jsonl"
  step full_decode 190 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --mesh expert=4 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 3 --copy-mb 1024
  ;;
two-a)
  [ -d .carry/wheels ] && pip install -q --no-index --find-links .carry/wheels fastapi uvicorn httpx openai 2>&1 | tail -1
  (
    export CUDA_VISIBLE_DEVICES=0
    step prefill 150 python -m mimo_jax.bench prefill --prompt-len 8192 --chunk 2048,4096,8192 --reps 2 \
      --json "$O/prefill.json"
    step mtp 130 python bench/bench_mtp.py --json "$O/mtp.json"
    step mtp_slice 100 python bench/bench_mtp.py --model flash-slice-4 --batch 1,8,32 --iters 8 --rounds 3 \
      --json "$O/mtp_slice.json"
  ) > "$O/gpu0.txt" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1
    export OUT=$O
    step kernel 250 python bench/bench_moe_kernel.py --quick-checks --sweep-budget 200
    step server 220 python bench/bench_server.py --model flash-slice-4 --random-weights --tokenizer mimo_jax/demo_model \
      --dtype bfloat16 --concurrency 1,8,32,64 --requests-per-client 2 --repeats 1 --json "$O/server.json"
  ) > "$O/gpu1.txt" 2>&1 &
  wait
  cat "$O/gpu0.txt" "$O/gpu1.txt"
  ;;
two-b)
  for w in bf16 fp8; do
    step "moe_$w" 140 python bench/bench_moe.py --meshes "expert=1;expert=2" --tokens 1,64,512,2048,8192 \
      --impls pallas_gpu --strategies replicated,all_to_all --weights $w --reps 10 --out "$O/moe_$w.jsonl"
  done
  ;;
two-c)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384 --mesh expert=2)
  echo "### device bytes_limit $HBM -> flash-layers-$N on expert=2"
  step full_decode 300 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --mesh expert=2 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 3 --copy-mb 1024 --json "$O/full_decode.json"
  step full_prefill 200 python -m mimo_jax.bench prefill --model "flash-layers-$N" --random-weights fp8 \
    --moe-impl pallas_gpu --mesh expert=2 --prompt-len 1024,8192,32768 --chunk 4096 --reps 1 --copy-mb 1024 \
    --json "$O/full_prefill.json"
  ;;
two-rest)
  python -m pip install -q --no-index --find-links .carry/wheels fastapi uvicorn httpx openai 2>&1 | grep -v WARN | tail -1
  (
    export CUDA_VISIBLE_DEVICES=0
    step server 280 python bench/bench_server.py --model flash-slice-4 --random-weights --tokenizer mimo_jax/demo_model \
      --dtype bfloat16 --concurrency 1,64 --requests-per-client 2 --repeats 1 --json "$O/server.json"
  ) > "$O/gpu0.txt" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1 OUT=$O
    step kernel 280 python bench/bench_moe_kernel.py --quick-checks --weights fp8,fp8-w8a8 --tokens 1,8,32,128,8192 \
      --sweep-budget 240
  ) > "$O/gpu1.txt" 2>&1 &
  wait
  cat "$O/gpu0.txt" "$O/gpu1.txt"
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384 --mesh expert=2)
  step full_decode 280 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --mesh expert=2 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 2 --copy-mb 1024 --json "$O/full_decode.json"
  ;;
four-a)
  python -m pip install -q --no-index --find-links .carry/wheels fastapi uvicorn httpx openai 2>&1 | grep -v WARN | tail -1
  TAIL=40 step full_decode_t4 270 python -m mimo_jax.bench decode --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 2 --copy-mb 1024 \
    --profile 14 --json "$O/full_decode_t4.json"
  (
    export CUDA_VISIBLE_DEVICES=0
    step server 290 python bench/bench_server.py --model flash-slice-4 --random-weights --tokenizer mimo_jax/demo_model \
      --dtype bfloat16 --concurrency 1,8,32,64 --requests-per-client 2 --repeats 1 --json "$O/server.json"
  ) > "$O/gpu0.txt" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=1 OUT=$O
    step kernel 280 python bench/bench_moe_kernel.py --quick-checks --weights fp8,fp8-w8a8 --tokens 1,8,32,128,8192 \
      --sweep-budget 230
  ) > "$O/gpu1.txt" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=2,3
    for w in bf16 fp8; do
      TAIL=60 step "moe2_$w" 140 python bench/bench_moe.py --meshes "expert=1;expert=2" --tokens 1,64,8192 \
        --impls pallas_gpu --strategies replicated --weights $w --reps 10 --profile 10 --out "$O/moe2_$w.jsonl"
    done
  ) > "$O/gpu23.txt" 2>&1 &
  wait
  cat "$O/gpu0.txt" "$O/gpu1.txt" "$O/gpu23.txt"
  ;;
four-b)
  TAIL=40 step full_prefill_t4 230 python -m mimo_jax.bench prefill --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --prompt-len 1024,8192,32768 --chunk 8192 --reps 1 --copy-mb 1024 \
    --profile 14 --json "$O/full_prefill_t4.json"
  TAIL=30 step full_decode_e4 150 python -m mimo_jax.bench decode --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh expert=4 --batch 16 --context 1024,16384 --steps 16 --rounds 2 --copy-mb 1024 \
    --profile 10 --json "$O/full_decode_e4.json"
  for w in bf16 fp8; do
    TAIL=60 step "moe4_$w" 100 python bench/bench_moe.py --meshes "expert=1;expert=4" --tokens 1,64,8192 \
      --impls pallas_gpu --strategies replicated --weights $w --reps 10 --profile 10 --out "$O/moe4_$w.jsonl"
  done
  ;;
four-c)
  python -m pip install -q --no-index --find-links .carry/wheels fastapi uvicorn httpx openai 2>&1 | grep -v WARN | tail -1
  (export CUDA_VISIBLE_DEVICES=0; step server 165 python bench/bench_server.py --model flash-slice-4 --random-weights \
    --tokenizer mimo_jax/demo_model --dtype bfloat16 --concurrency 64 --requests-per-client 2 --repeats 1 \
    --json "$O/server64.json") > "$O/gpu0.txt" 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1 OUT=$O TAIL=12; step kernel 165 python bench/bench_moe_kernel.py --quick-checks \
    --weights fp8,fp8-w8a8 --tokens 1,8,32,128 --sweep-budget 70) > "$O/gpu1.txt" 2>&1 &
  (export CUDA_VISIBLE_DEVICES=2 TAIL=12; step kernel512 165 python bench/bench_moe_kernel.py --skip-checks --intermediate 512 \
    --weights bf16,fp8,fp8-w8a8 --tokens 16,64 --sweep-budget 110) > "$O/gpu2.txt" 2>&1 &
  (export CUDA_VISIBLE_DEVICES=3 TAIL=40; step moe1_fp8 165 python bench/bench_moe.py --meshes "expert=1" --tokens 1,16,64,8192 \
    --impls pallas_gpu --weights fp8 --reps 10 --profile 6 --out "$O/moe1_fp8.jsonl") > "$O/gpu3.txt" 2>&1 &
  wait
  cat "$O/gpu0.txt" "$O/gpu1.txt" "$O/gpu2.txt" "$O/gpu3.txt"
  TAIL=60 step full_decode_t4 230 python -m mimo_jax.bench decode --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --batch 16,1,64 --context 1024 --steps 16 --rounds 2 --copy-mb 1024 \
    --no-experts-count --profile 12 --json "$O/full_decode_t4.json"
  TAIL=50 step full_prefill_t4 175 python -m mimo_jax.bench prefill --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --prompt-len 1024,8192,32768 --chunk 8192 --reps 1 --copy-mb 1024 \
    --profile 12 --json "$O/full_prefill_t4.json"
  ;;
four-d)
  for w in bf16 fp8; do
    TAIL=30 step "moe4_$w" 85 python bench/bench_moe.py --meshes "expert=1;expert=4" --tokens 1,64,8192 \
      --impls pallas_gpu --strategies replicated --weights $w --reps 10 --profile 6 --out "$O/moe4_$w.jsonl"
  done
  TAIL=40 step full_decode_t4_16k 190 python -m mimo_jax.bench decode --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --batch 16,64,1 --context 16384 --steps 16 --rounds 2 --copy-mb 1024 \
    --no-experts-count --profile 8 --json "$O/full_decode_t4_16k.json"
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
*) echo "usage: bash bench/gpu_session.sh one|four|four-a|...|four-f|two-a|two-b|two-c|two-rest" >&2; exit 2 ;;
esac
