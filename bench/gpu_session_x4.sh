#!/usr/bin/env bash
# One call on a 4-GPU machine (kind nvidia-h200-x4): engine prefill on one GPU, the MoE layer on 1 vs 4 GPUs,
# and the full-depth MiMo-V2-Flash with random fp8 weights over 4 GPUs. Logs under $OUT.
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
N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384 --mesh expert=4)
echo "### device bytes_limit $HBM -> flash-layers-$N on expert=4"
CUDA_VISIBLE_DEVICES=0 step prefill_cudnn 70 python -m mimo_jax.bench prefill --prompt-len 8192 --chunk 2048,4096 --reps 2
step moe 75 python bench/bench_moe.py --meshes "expert=1;expert=4" --tokens 1,64,8192 --impls pallas_gpu \
  --strategies replicated --reps 10 --out "$O/moe.jsonl"
step full_decode 190 python -m mimo_jax.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
  --mesh expert=4 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 3 --copy-mb 1024
