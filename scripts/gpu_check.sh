#!/usr/bin/env bash
# GPU checks for whoever has a CUDA machine: the default config on one GPU with bf16, and the
# DDP key-BatchNorm modes (shuffle, sync) when there are two or more GPUs.
# Under 5 minutes on one H100. Run from the repository root after `make setup`:
#
#   scripts/gpu_check.sh [OUT_DIR]        # figures go to OUT_DIR (default gpu_check/) and stdout
#   RECIPE=fmnist_r18_gpu scripts/gpu_check.sh [OUT_DIR]   # only that recipe: its 8-minute budget
#
# Record the printed figures, with the card's name, in docs/benchmarks.md.
set -euo pipefail

OUT="${1:-${OUT:-gpu_check}}"
BIN="${BIN:-.venv/bin}"
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if ! "$BIN/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
  exit 1
fi
GPUS=$("$BIN/python" -c 'import torch; print(torch.cuda.device_count())')
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1), $GPUS visible"
"$BIN/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/summary.txt"

# 0. RECIPE=<experiment>: that recipe alone, its wall time and its kNN (docs/results.md).
if [ -n "${RECIPE:-}" ]; then
  log "recipe $RECIPE on one GPU"
  start=$(date +%s)
  "$BIN/mocoq-train" experiment="$RECIPE" trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/$RECIPE" 2>&1 | tail -n 8 | tee -a "$OUT/summary.txt"
  log "recipe $RECIPE: $(( $(date +%s) - start )) s wall"
  "$BIN/python" - "$OUT/$RECIPE/summary.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
s = json.load(open(sys.argv[1]))
print("epochs", s["epochs"], "steps", s["steps"], "fit_seconds", s["fit_seconds"],
      "budget", s.get("budget"), "knn", s.get("knn"), "knn_extra", s.get("knn_extra"))
PY
  exit 0
fi

# 1. The default recipe (Fashion-MNIST, small ResNet) on one GPU in bf16, capped at 2 minutes of
#    training; the kNN monitor runs after the last epoch reached.
log "one GPU, bf16: mocoq-train trainer=gpu (2-minute cap)"
start=$(date +%s)
"$BIN/mocoq-train" trainer=gpu trainer.max_epochs=3 trainer.max_time=00:00:02:00 \
  trainer.enable_progress_bar=false hydra.run.dir="$OUT/one_gpu" 2>&1 | tail -n 8 | tee -a "$OUT/summary.txt"
log "one GPU run: $(( $(date +%s) - start )) s wall"
"$BIN/python" - "$OUT/one_gpu/summary.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
s = json.load(open(sys.argv[1]))
print("steps", s["steps"], "epochs", s["epochs"], "knn", s.get("knn", {}).get("top1"),
      "monitor_s", s.get("knn_monitor_seconds"))
PY

# 2. Two GPUs: one global queue with shuffle BN and with SyncBatchNorm, 1 epoch each.
if [ "$GPUS" -ge 2 ]; then
  for mode in shuffle sync; do
    log "2 GPUs, DDP, key_bn=$mode (1 epoch)"
    "$BIN/mocoq-train" trainer=ddp trainer.devices=2 trainer.max_epochs=1 model.key_bn=$mode \
      trainer.enable_progress_bar=false callbacks.knn.every_n_epochs=1 \
      hydra.run.dir="$OUT/ddp_$mode" 2>&1 | tail -n 4 | tee -a "$OUT/summary.txt"
  done
else
  log "one GPU: the DDP checks (key_bn=shuffle, sync) need two"
fi

# 3. scripts/bench.py runs on the CPU only so far; its GPU arms are still to be written.
log "scripts/bench.py: CPU only for now (no GPU arms yet)"
log "done: $OUT/summary.txt"
