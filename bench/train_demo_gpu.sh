#!/usr/bin/env bash
# Demo model v2 (issue 24 item 3) in ONE device call: train on the prepared data, export the release layout to
# $OUT/demo_model, evaluate that exported (FP8) checkpoint into $OUT/eval.json (held-out perplexity, MTP
# acceptance for k = 1, 2, 3, tool-call behaviour on held-out chat probes, samples, plus the training summary
# and log), and print a summary. Any failure stops the call (set -euo pipefail); the exported checkpoint is in
# $OUT before evaluation starts. Loading with mimo_jax.load_model, generation and lossless MTP decoding are
# checked here afterwards, on the CPU, by bench/install_demo_v2.py.
#
# The data is prepared beforehand on a CPU host (the device has another Python, hence another stdlib):
#   python launch/train_demo.py prepare --out .carry/demo_data      # then run with carry [".carry/demo_data"]
#   bash bench/train_demo_gpu.sh
# Then, here: python bench/install_demo_v2.py <the call's files_at folder>.
#
# Environment (defaults are the shipped run's): DEMO_DATA (.carry/demo_data), DEMO_PRESET (demo), DEMO_STEPS
# (2900: about 5 minutes of training on one H200), DEMO_MAX_TRAIN_S (360: training stops early past it, so a
# slower card still leaves time for export and evaluation inside the device's 600 s), DEMO_DEADLINE_S (585: the
# evaluation is stopped, loudly, when it would run past this many seconds from the start), DEMO_BATCH (the
# preset's), DEMO_EVAL_PROMPTS (64), DEMO_HELDOUT_WINDOWS (256), DEMO_CHAT_TOKENS (128), DEMO_RUN (/tmp/demo_v2_run).
# CPU smoke run: OUT=/tmp/demo_smoke DEMO_STEPS=20 DEMO_BATCH=2 DEMO_EVAL_PROMPTS=2 DEMO_HELDOUT_WINDOWS=2 \
#   DEMO_CHAT_TOKENS=16 JAX_PLATFORMS=cpu bash bench/train_demo_gpu.sh
set -euo pipefail
: "${OUT:?OUT must name the output folder (the device sets it)}"
DATA=${DEMO_DATA:-.carry/demo_data}
PRESET=${DEMO_PRESET:-demo}
STEPS=${DEMO_STEPS:-2900}
MAX_TRAIN_S=${DEMO_MAX_TRAIN_S:-360}
DEADLINE_S=${DEMO_DEADLINE_S:-585}
RUN=${DEMO_RUN:-/tmp/demo_v2_run}
EXPORT="$OUT/demo_model"
for f in manifest.json train.npy heldout.npy heldout_chat.jsonl tokenizer.json tokenizer_config.json; do
  [ -f "$DATA/$f" ] || { echo "FATAL: $DATA/$f missing: run 'python launch/train_demo.py prepare --out $DATA' here and carry it" >&2; exit 2; }
done
[ ! -e "$EXPORT" ] || { echo "FATAL: $EXPORT exists; export writes into a new directory" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
PY=${PYTHON:-python3}
rm -rf "$RUN" && mkdir -p "$RUN" "$OUT"
start=$(date +%s)
stamp() { echo "### $(($(date +%s) - start)) s: $*"; }

stamp "device"
$PY -c "import jax, flax, optax, tokenizers; print(jax.__version__, flax.__version__, jax.devices())"
stamp "train: preset $PRESET, $STEPS steps, at most $MAX_TRAIN_S s"
$PY launch/train_demo.py train --data "$DATA" --out "$RUN" --preset "$PRESET" --steps "$STEPS" \
  --max-seconds "$MAX_TRAIN_S" ${DEMO_BATCH:+--batch-size "$DEMO_BATCH"} \
  ${DEMO_HELDOUT_WINDOWS:+--eval-windows "$DEMO_HELDOUT_WINDOWS"}
stamp "export (release layout, FP8) -> $EXPORT"
$PY launch/train_demo.py export --params "$RUN" --data "$DATA" --out "$EXPORT"
$PY - "$EXPORT" <<'EOF'
import json, sys
config = json.load(open(f"{sys.argv[1]}/config.json"))
assert "mtp_hidden_before_norm" not in config, "the exported config must not say mtp_hidden_before_norm"
print("exported config: post-norm MTP wiring (no mtp_hidden_before_norm)")
EOF
left=$((DEADLINE_S - $(date +%s) + start))
stamp "evaluate the exported checkpoint -> $OUT/eval.json (must end within ${left} s)"
[ "$left" -gt 30 ] || { echo "FATAL: only ${left} s left before DEMO_DEADLINE_S=$DEADLINE_S" >&2; exit 3; }
timeout "$left" $PY launch/train_demo.py evaluate --checkpoint "$EXPORT" --data "$DATA" --preset "$PRESET" \
  --prompts "${DEMO_EVAL_PROMPTS:-64}" --heldout-windows "${DEMO_HELDOUT_WINDOWS:-256}" \
  --chat-tokens "${DEMO_CHAT_TOKENS:-128}" --run "$RUN" --out "$OUT/eval.json"
stamp "done: $(ls "$EXPORT" | tr '\n' ' ')"
du -sh "$EXPORT" "$OUT/eval.json"
