#!/usr/bin/env bash
# One device call that measures GPU figures for bench/RESULTS.md; each step has its own time limit so one
# slow step cannot cost the others. Logs and JSON under $OUT.
#   bash bench/gpu_session.sh one    # one GPU: prefill, partial-depth Flash in fp8, MTP, server (wheels in .carry/wheels)
#   bash bench/gpu_session.sh two-c  # the largest real-pattern Flash prefix that fits 2 GPUs (tensor=2), fp8: decode, prefill
#   bash bench/gpu_session.sh four-g # four GPUs (nvidia-h200-x4): full Flash decode (batch 16/64/1, 1K/16K) and
#                                    # prefill (8K, 32K) with the experts in the kernel's [E, out, in] layout
#   bash bench/gpu_session.sh kernel-g # one GPU: the fused kernel in one launch and in two (split), fewer stages,
#                                      # wide down steps; per call and per layer of 16 in one jit (--chain); checks
#   bash bench/gpu_session.sh kernel-h # one GPU: module defaults only at 1-32 tokens (T = 1 three times, fresh
#                                      # inputs), per call and per layer; one tensor=4 shard; the GPU checks
#   bash bench/gpu_session.sh engine [DIR] # one GPU, the parts in PARTS (default agent, ~3 min): paged decode vs
#                                          # the contiguous cache of the tree in DIR (batch 1/64 at CTX, default 2K
#                                          # and 128K), a lone request in 1 and 64 slots, the agent trace (16
#                                          # conversations, HISTORY=8192 tokens of history, 3 turns, cache off / on)
#   bash bench/gpu_session.sh arch [DIR] # one GPU: engine decode (batch 1, 32 at 2K) and prefill 8K, alternating this
#                                        # tree and an older one in DIR (e.g. `git archive REV mimo_jax configs`), twice
#   bash bench/gpu_session.sh mtpcost # one GPU (~4.5 min): a k=3 MTP iteration at batch 1 in plain steps, full
#                                     # vocabulary vs a 32K draft vocabulary, flash-slice-4 bf16 then flash-layers-N fp8
#   bash bench/gpu_session.sh paged [DIR] # one GPU (~6 min): the Pallas paged kernel checked against XLA at Flash
#                                         # shapes and timed by splits; decode with the XLA paged path and the kernel
#                                         # (batch BATCHES at CTX) beside the contiguous cache of the tree in DIR
#   bash bench/gpu_session.sh round [DIR] # one GPU (~8 min): the lone request in 1 / 64 slots, one constrained
#                                         # request beside 16 free ones (also in the tree in PRE), decode at 64 x CTX64 old (DIR) vs new,
#                                         # the agent trace at HISTORY (default 8192)
#   bash bench/gpu_session.sh cells [DIR] # one GPU (~9 min): issue 22's missing decode cells, paged kernel vs the
#                                         # contiguous cache of DIR; issue 23's constrained bench with a profile
#   bash bench/gpu_session.sh combo [DIR] # one GPU (~8 min): the constrained bench under default command buffers
#                                         # and with WHILE,CONDITIONAL in them; the cells' decode in DIR and here
#   bash bench/gpu_session.sh graphs      # one GPU (~9 min): decode rounds in CUDA graphs: same tokens? then the
#                                         # constrained bench with graphs in the tree in PRE and here
#   bash bench/gpu_session.sh cells128 [DIR] # one GPU, an H200 (~7 min): batch 64 x 128K and 32 x 2K, paged kernel vs DIR
#   bash bench/gpu_session.sh dense [DIR] # one GPU (~9 min): fp8 projections at decode sizes, the ring kernel's check;
#                                         # flash-layers-N decode, DIR vs here (rings in XLA / the kernel)
#   bash bench/gpu_session.sh prof        # one GPU (~3 min): every kernel of a batch-1 decode step of flash-layers-N fp8, the HLO
#   bash bench/gpu_session.sh graphs2     # one GPU (~9 min): issue 25's low-batch decode and MTP cost, graphs or not
#   bash bench/gpu_session.sh host [DIR]  # one GPU (~5 min): the constrained bench under cProfile, batch 32 x 2K
#                                         # in DIR and here, the w8a8 checks
# The modes of earlier runs (four, two-a, two-b, two-rest, four-a .. four-f, kernel-a .. kernel-f) are in this
# file's history at the commits bench/RESULTS.md names beside their figures.
# With OUT set, logs and JSON are packed into $OUT/session.tgz at the end (the device returns at most 8 files).
set -u
SITE=${PYTHONPATH:-}  # carried wheels installed under a --target folder
export PYTHONPATH=.${SITE:+:$SITE} XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 NCCL_NVLS_ENABLE=0
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
  pack  # after every step: a call cut off at its limit still returns what finished
}
read_ceiling() {  # the HBM read-only ceiling (bf16 sum over 8 GiB), stated beside every decode figure of the call
  echo "### HBM read ceiling $(python -c "from mimo_jax.tools.bench import measure_read_bandwidth as r; print(round(r(8<<30)/1e12, 3))" 2>/dev/null) TB/s"
}
# every program of a run in CUDA graphs, the decode loop's while and conditionals included (RunOptions.decode_graphs)
WHILE_FLAGS="--xla_gpu_enable_command_buffer=$(python -c 'from mimo_jax.config import GPU_DECODE_COMMAND_BUFFERS as c; print(c)')"
plain_and_graphs() {  # plain_and_graphs NAME SECONDS COMMAND...: steps NAME_plain and NAME_graphs (WHILE_FLAGS)
  local name=$1 limit=$2; shift 2
  XLA_FLAGS="" step "${name}_plain" "$limit" "$@"
  XLA_FLAGS="$WHILE_FLAGS" step "${name}_graphs" "$limit" "$@"
}
decode_in_trees() {  # decode_in_trees DIR NAME SECONDS ARGS...: `tools.bench decode ARGS` in the tree DIR (the
  # contiguous cache: step old_NAME), then here with the paged kernel (new_NAME); no DIR: here only
  local dir=$1 name=$2 limit=$3 tree tag paged; shift 3
  for tree in $dir .; do
    tag=$( [ "$tree" = . ] && echo new || echo old )
    paged=$( [ "$tree" = . ] && echo "--paged pallas_gpu" || echo "" )
    (cd "$tree" && PYTHONPATH=. step "${tag}_$name" "$limit" python -m mimo_jax.tools.bench decode "$@" $paged \
      --json "$O/${tag}_$name.json")
  done
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
HBM=$(CUDA_VISIBLE_DEVICES=0 python -c "import jax; print(jax.devices()[0].memory_stats()['bytes_limit'])")
case "${1:-one}" in
one)
  [ -d .carry/wheels ] && pip install -q --no-index --find-links .carry/wheels fastapi uvicorn httpx openai 2>&1 | tail -1
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384)
  echo "### device bytes_limit $HBM -> flash-layers-$N"
  step prefill_cudnn 110 python -m mimo_jax.tools.bench prefill --prompt-len 8192 --chunk 2048,4096 --reps 2 --json "$O/prefill.json"
  step full_decode 200 python -m mimo_jax.tools.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --batch 1,16,64 --context 1024,16384 --steps 16 --rounds 3 --json "$O/full_decode.json"
  step mtp 120 python bench/bench_mtp.py --json "$O/mtp.json"
  step server 150 python bench/bench_server.py --model flash-slice-4 --random-weights --tokenizer mimo_jax/demo_model \
    --dtype bfloat16 --concurrency 1,8,32 --requests-per-client 2 --repeats 1 --json "$O/server.json"
  ;;
two-c)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384 --mesh tensor=2)
  echo "### device bytes_limit $HBM -> flash-layers-$N on tensor=2"
  step full_decode 300 python -m mimo_jax.tools.bench decode --model "flash-layers-$N" --random-weights fp8 --moe-impl pallas_gpu \
    --mesh tensor=2 --batch 16,1,64 --context 1024,16384 --steps 16 --rounds 3 --copy-mb 1024 --no-experts-count \
    --json "$O/full_decode.json"
  step full_prefill 200 python -m mimo_jax.tools.bench prefill --model "flash-layers-$N" --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=2 --prompt-len 1024,8192,32768 --chunk 8192 --reps 1 --copy-mb 1024 \
    --json "$O/full_prefill.json"
  ;;
four-g)
  # expert weights re-laid out to [E, out, in] for the kernel (bench/RESULTS.md, kernel run 6): full Flash decode
  # at batch 16 / 64 / 1 and 1K / 16K, then prefill 8K and 32K
  TAIL=30 step full_decode_t4 380 python -m mimo_jax.tools.bench decode --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --batch 16,64,1 --context 1024,16384 --steps 16 --rounds 2 --copy-mb 1024 \
    --no-experts-count --json "$O/full_decode_t4.json"
  TAIL=20 step full_prefill_t4 170 python -m mimo_jax.tools.bench prefill --model flash-layers-48 --random-weights fp8 \
    --moe-impl pallas_gpu --mesh tensor=4 --prompt-len 8192,32768 --chunk 8192 --reps 1 --copy-mb 1024 \
    --json "$O/full_prefill_t4.json"
  ;;
mtpcost)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384)
  echo "### device bytes_limit $HBM -> flash-layers-$N"
  TAIL=40 step mtp_slice 130 python bench/bench_mtp.py --model flash-slice-4 --batch 1 --steps 3 --draft-vocab 0,32768 \
    --iters 8 --rounds 3 --json "$O/mtp_slice.json"
  TAIL=40 step mtp_layers 140 python bench/bench_mtp.py --model "flash-layers-$N" --weights fp8 --batch 1 --steps 3 \
    --draft-vocab 0,32768 --iters 8 --rounds 3 --json "$O/mtp_layers.json"
  ;;
kernel-g)
  TAIL=60 step kernel_flash 300 python bench/bench_moe_kernel.py --skip-checks --weights fp8/out_in,bf16/out_in,bf16 \
    --tokens 1,2,4,8 --variants split --sweep-budget 160 --profile 4 --chain 16
  TAIL=30 step kernel_shard 120 python bench/bench_moe_kernel.py --skip-checks --intermediate 512 \
    --weights fp8/out_in,bf16/out_in --tokens 1,2 --variants split --sweep-budget 70 --chain 16
  TAIL=30 step kernel_checks 90 python bench/bench_moe_kernel.py --checks-only --quick-checks \
    --check-kinds fp8-fused/out_in,fp8-fused-split/out_in,bf16-fused-split/out_in,bf16-fused/out_in,fp8-fused-wide/out_in
  ;;
kernel-h)
  TAIL=40 step kernel_defaults 200 python bench/bench_moe_kernel.py --skip-checks --weights fp8/out_in,bf16/out_in,bf16 \
    --tokens 1,2,4,8,32 --sweep-budget 0 --profile 4 --chain 16
  for r in 2 3; do
    TAIL=12 step "kernel_t1_$r" 150 python bench/bench_moe_kernel.py --skip-checks --weights fp8/out_in,bf16/out_in,bf16 \
      --tokens 1 --sweep-budget 0 --chain 16
  done
  TAIL=12 step kernel_shard 80 python bench/bench_moe_kernel.py --skip-checks --intermediate 512 \
    --weights fp8/out_in,bf16/out_in --tokens 1,2 --sweep-budget 0 --chain 16
  TAIL=30 step kernel_checks 120 python bench/bench_moe_kernel.py --checks-only --quick-checks \
    --check-kinds bf16,fp8,fp8-f16,bf16-fused/out_in,fp8-fused/out_in,fp8-fused-split/out_in,fp8-fused-wide/out_in
  ;;
arch)
  # the same commands on the old tree (its CLI was python -m mimo_jax.bench) and this one, alternating REPS times
  for r in $(seq "${REPS:-2}"); do
    if [ -n "${2:-}" ]; then
      (cd "$2" && PYTHONPATH=. step "old_decode_$r" 150 python -m mimo_jax.bench decode --batch 1,32 --context 2048 \
        --json "$O/old_decode_$r.json")
      (cd "$2" && PYTHONPATH=. step "old_prefill_$r" 150 python -m mimo_jax.bench prefill --prompt-len 8192 --chunk 2048 \
        --reps 2 --json "$O/old_prefill_$r.json")
    fi
    step "new_decode_$r" 150 python -m mimo_jax.tools.bench decode --batch 1,32 --context 2048 --json "$O/new_decode_$r.json"
    step "new_prefill_$r" 150 python -m mimo_jax.tools.bench prefill --prompt-len 8192 --chunk 2048 --reps 2 \
      --json "$O/new_prefill_$r.json"
  done
  ;;
engine)
  # engine v2 (issue 22), flash-slice-4 bf16, the parts named in PARTS (default: agent; all: decode,lone,agent):
  # decode with paged full layers (this tree) against the contiguous cache of the tree in DIR (the engine before
  # v2), a lone request in 1 / 64 slots, and the agent trace (16 conversations, HISTORY tokens of history each,
  # default 8192; 3 turns of 200 new tokens): mean TTFT per turn with and without the prefix cache and the ratio.
  # The two agent engines compile the same programs: the second reads them from a persistent compilation cache.
  CTX=${CTX:-2048,131072}
  PARTS=${PARTS:-agent}
  if [[ $PARTS == *decode* ]]; then
    if [ -n "${2:-}" ]; then
      (cd "$2" && PYTHONPATH=. TAIL=12 step old_decode 150 python -m mimo_jax.tools.bench decode --batch 1,64 \
        --context "$CTX" --steps 16 --rounds 3 --no-experts-count --json "$O/old_decode.json")
    fi
    TAIL=12 step new_decode 150 python -m mimo_jax.tools.bench decode --batch 1,64 --context "$CTX" --steps 16 \
      --rounds 3 --no-experts-count --json "$O/new_decode.json"
  fi
  if [[ $PARTS == *lone* ]]; then
    step lone 100 python bench/bench_engine.py lone --model flash-slice-4 --dtype bfloat16 --slots 1,64 \
      --prompt 2048 --output 256 --round 8 --reps 2 --json "$O/lone.json"
  fi
  if [[ $PARTS == *agent* ]]; then
    for h in ${HISTORY:-8192}; do
      JAX_COMPILATION_CACHE_DIR=/tmp/gpu_session_jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 TAIL=8 \
        step "agent_$h" 220 python bench/bench_engine.py agent --model flash-slice-4 --dtype bfloat16 \
        --conversations 16 --history "$h" --turns 3 --new-tokens 200 --output-tokens 32 --chunk 2048 --round 8 \
        --json "$O/agent_$h.json"
    done
  fi
  ;;
paged)
  CTX=${CTX:-2048,131072}
  BATCHES=${BATCHES:-1,64}
  read_ceiling
  TAIL=40 step paged_check 130 python bench/check_paged_kernel.py --time
  if [ -n "${2:-}" ]; then
    (cd "$2" && PYTHONPATH=. TAIL=12 step old_decode 170 python -m mimo_jax.tools.bench decode --batch "$BATCHES" \
      --context "$CTX" --steps 16 --rounds 3 --no-experts-count --json "$O/old_decode.json")
  fi
  TAIL=20 step new_decode 240 python -m mimo_jax.tools.bench decode --batch "$BATCHES" --context "$CTX" --steps 16 \
    --rounds 3 --no-experts-count --paged xla,pallas_gpu --json "$O/new_decode.json"
  ;;
round)
  read_ceiling
  PARTS=${PARTS:-lone,constrained,decode64}
  [[ $PARTS == *lone* ]] && step lone 100 python bench/bench_engine.py lone --model flash-slice-4 --dtype bfloat16 --slots 1,64 \
    --prompt 2048 --output 256 --round 8 --reps 2 --json "$O/lone.json"
  [[ $PARTS == *constrained* ]] && for tree in ${PRE:-} .; do  # PRE: an older tree to alternate with (its constrained step before this one's)
    name=constrained_$( [ "$tree" = . ] && echo new || echo old )
    (cd "$tree" && PYTHONPATH=.${SITE:+:$SITE} TAIL=8 step "$name" 190 python bench/bench_engine.py constrained --model flash-slice-4 \
      --dtype bfloat16 --conversations 16 --prompt 512 --output "${OUTPUT:-512}" --round 8 --reps 3 --json "$O/$name.json")
  done
  if [ -n "${2:-}" ] && [[ $PARTS == *decode64* ]]; then
    (cd "$2" && PYTHONPATH=. TAIL=6 step old_decode64 80 python -m mimo_jax.tools.bench decode --batch 64 \
      --context "${CTX64:-65536}" --steps 16 --rounds 3 --no-experts-count --moe-impl pallas_gpu --json "$O/old_decode64.json")
    TAIL=6 step new_decode64 80 python -m mimo_jax.tools.bench decode --batch 64 --context "${CTX64:-65536}" \
      --steps 16 --rounds 3 --no-experts-count --moe-impl pallas_gpu --paged pallas_gpu --json "$O/new_decode64.json"
  fi
  ;;
graphs)
  # CUDA-graph decode rounds: the same greedy tokens as the plain rounds (RunOptions.decode_graphs), then issue 23's
  # constrained bench with the rounds in graphs in the tree in PRE (e.g. main before a change) and here
  read_ceiling
  TAIL=6 step decode_graphs 150 python bench/check_decode_graphs.py --requests 16 --prompt 256 --output 64 --round 8
  for tree in . ${PRE:-}; do  # this tree first (REPS pairs), then PRE (one pair)
    name=constrained_$( [ "$tree" = . ] && echo new || echo old )
    reps=$( [ "$tree" = . ] && echo "${REPS:-2}" || echo 1 )
    (cd "$tree" && PYTHONPATH=.${SITE:+:$SITE} XLA_FLAGS="$WHILE_FLAGS" TAIL=12 step "$name" 170 python \
      bench/bench_engine.py constrained --model flash-slice-4 --dtype bfloat16 --conversations 16 --prompt 512 \
      --output "${OUTPUT:-384}" --round 8 --reps "$reps" --json "$O/$name.json")
  done
  # what is left of the call: flash-slice-4 bf16 decode at batch 1 and 4, plain rounds and in graphs (issue 25)
  TAIL=8 plain_and_graphs slice_b1 60 python -m mimo_jax.tools.bench decode --batch 1,4 --context 1024 --steps 16 \
    --rounds 3 --no-experts-count --moe-impl pallas_gpu
  ;;
graphs2)
  # issue 25, plain rounds and in graphs: low-batch decode on the deepest fp8 Flash prefix, then a k=3 MTP iteration
  # in plain steps (flash-slice-4 at batch 1 and 4: the end of `graphs`)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384)
  echo "### device bytes_limit $HBM -> flash-layers-$N"
  read_ceiling
  TAIL=10 plain_and_graphs layers 170 python -m mimo_jax.tools.bench decode --model "flash-layers-$N" \
    --random-weights fp8 --moe-impl pallas_gpu --batch 1,4,16,64 --context 1024 --steps 16 --rounds 3
  XLA_FLAGS="$WHILE_FLAGS" TAIL=30 step mtp_slice_graphs 120 python bench/bench_mtp.py --model flash-slice-4 --batch 1 \
    --steps 3 --draft-vocab 0,32768 --iters 8 --rounds 3 --json "$O/mtp_slice_graphs.json"
  ;;
cells128)
  # issue 22's last cells: batch 64 x 128K with the paged kernel (H200: it does not fit 80 GB) and batch 32 x 2K
  # (at the line on the H100) vs the contiguous cache of the tree in DIR
  # (CELLS=64x128k: that cell only)
  read_ceiling
  TAIL=6 decode_in_trees "${2:-}" cell64x128k 150 --batch 64 --context 131072 --steps 16 --rounds 2 --no-experts-count
  [[ ${CELLS:-64x128k,32x2k} == *32x2k* ]] && TAIL=6 decode_in_trees "${2:-}" cell32x2k 60 --batch 32 --context 2048 \
    --steps 16 --rounds 4 --no-experts-count --moe-impl pallas_gpu
  ;;
dense)
  # issue 25 item 2: fp8 projections at decode sizes (bench_projection: ways of applying the block scales), the ring
  # kernel checked against XLA, then flash-layers-N fp8 decode at batch 1/4/16 in the tree in DIR (before) and here
  # (after, SWA rings through XLA and the ring kernel), each beside its ceiling; flash-slice-4 bf16 at batch 1/4 last
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384)
  echo "### device bytes_limit $HBM -> flash-layers-$N"
  TAIL=20 step projection 90 python bench/bench_projection.py --rows 1 --shapes q,k,mlp_gate,mlp_down \
    --ways dequantize,project,padded,reduce
  TAIL=12 step ring_check 90 python bench/check_ring_kernel.py
  layers="--model flash-layers-$N --random-weights fp8 --moe-impl pallas_gpu --paged pallas_gpu --batch 1,4,16"
  if [ -n "${2:-}" ]; then
    (cd "$2" && PYTHONPATH=. TAIL=5 step old_layers 150 python -m mimo_jax.tools.bench decode $layers --context 1024 \
      --steps 16 --rounds 3 --json "$O/old_layers.json")
  fi
  TAIL=8 step new_layers 200 python -m mimo_jax.tools.bench decode $layers --ring xla,pallas_gpu --context 1024 \
    --steps 16 --rounds 3 --json "$O/new_layers.json"
  TAIL=6 step new_slice 90 python -m mimo_jax.tools.bench decode --batch 1,4 --ring xla,pallas_gpu --context 1024 \
    --steps 16 --rounds 3 --no-experts-count --moe-impl pallas_gpu --paged pallas_gpu --json "$O/new_slice.json"
  ;;
prof)
  # issue 25 item 2: which kernels one layer's decode runs: the profile of flash-layers-N fp8 at batch 1 (every
  # kernel, by launches) and the optimized HLO of the decode loop (XLA's dump, jit_decode only)
  N=$(python bench/pick_layers.py --hbm-bytes "$HBM" --batch 64 --context 16384)
  echo "### device bytes_limit $HBM -> flash-layers-$N"
  read_ceiling
  XLA_FLAGS="--xla_dump_to=$O/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_decode" TAIL=4 step prof_layers \
    ${LIMIT:-150} python -m mimo_jax.tools.bench decode --model "flash-layers-$N" --random-weights fp8 \
    --moe-impl pallas_gpu --paged pallas_gpu --batch 1 --context 1024 --steps 16 --rounds 3 --profile 400
  find "$O/dump" -name "*jit_decode*" ! -name "*after_optimizations.txt" ! -name "*buffer-assignment*" -delete
  ;;
cells)
  # issue 22's decode cells not yet measured (paged kernel vs the contiguous cache of the tree in DIR: batch 32 at
  # 2K/32K/128K, batch 1 and 64 at 32K), and issue 23's constrained bench with a profiled window of each kind
  read_ceiling
  PARTS=${PARTS:-constrained,cells}
  [[ $PARTS == *constrained* ]] && for tree in ${PRE:-} .; do  # PRE: another tree (e.g. a candidate design), run first
    name=constrained_$( [ "$tree" = . ] && echo new || echo old )
    (cd "$tree" && PYTHONPATH=.${SITE:+:$SITE} TAIL=24 step "$name" 200 python bench/bench_engine.py constrained \
      --model flash-slice-4 --dtype bfloat16 --conversations 16 --prompt 512 --output "${OUTPUT:-512}" --round 8 \
      --reps "${REPS:-4}" --profile --json "$O/$name.json")
  done
  if [[ $PARTS == *cells* ]]; then
    TAIL=8 decode_in_trees "${2:-}" cells32 150 --batch 32 --context 2048,32768,131072 --steps 16 --rounds 3 \
      --no-experts-count
    TAIL=8 decode_in_trees "${2:-}" cells32k 120 --batch 1,64 --context 32768 --steps 16 --rounds 3 --no-experts-count
  fi
  ;;
combo)
  # one call for both when the device is scarce: the constrained bench with and without the decode loop in CUDA
  # graphs (one pair + the profiled windows each)
  # and the cells' decode (one command per tree: batch 32 at 2K/32K/128K and batch 1 and 64 at 32K)
  read_ceiling
  TAIL=24 plain_and_graphs constrained 140 python bench/bench_engine.py constrained --model flash-slice-4 \
    --dtype bfloat16 --conversations 16 --prompt 512 --output 384 --round 8 --reps 1 --profile
  TAIL=8 decode_in_trees "${2:-}" cells32 80 --batch 32 --context 32768,131072,2048 --steps 16 --rounds 2 \
    --no-experts-count
  TAIL=8 decode_in_trees "${2:-}" cells32k 55 --batch 64,1 --context 32768 --steps 16 --rounds 2 --no-experts-count
  ;;
host)
  # where the host's time goes in the constrained bench (cProfile; the device waits for the host, issue 23), the
  # batch-32 x 2K decode cell again (old tree in DIR vs paged), the w8a8 checks
  TAIL=70 step profile_host 200 python bench/profile_host.py constrained --model flash-slice-4 --dtype bfloat16 \
    --conversations 16 --prompt 512 --output 256 --round 8 --reps 1
  TAIL=6 decode_in_trees "${2:-}" cell2k 60 --batch 32 --context 2048 --steps 16 --rounds 4 --no-experts-count \
    --moe-impl pallas_gpu
  TAIL=30 step w8a8 100 python bench/bench_moe_kernel.py --w8a8 --tokens 8192 --sweep-budget 0
  ;;
*) echo "usage: bash bench/gpu_session.sh one|two-c|four-g|kernel-g|kernel-h|arch|engine|mtpcost|paged|round|graphs|graphs2|cells128|prof|dense|cells|combo|host [DIR]" >&2; exit 2 ;;
esac
