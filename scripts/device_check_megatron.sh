#!/usr/bin/env bash
# Megatron policy backend on one GPU, no network: bf16 log-prob parity HF vs Megatron, then tokens/s, MFU and peak
# memory of the HF and Megatron policy backends (train_step) for a ~0.5B Qwen2-shaped model at sequence 2048.
#
#   scripts/device_check_megatron.sh [OUT_DIR]          (env: WHEELS=dir of wheels, BATCH=8, SEQ=2048, STEPS=5)
#
# Installs megatron-core from $WHEELS (pip --no-index) when it is not importable. Each measurement runs in its own
# process with a timeout; the table is printed at the end (record it in docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/device_check_megatron}
WHEELS=${WHEELS:-./wheels}
BATCH=${BATCH:-8}
SEQ=${SEQ:-2048}
STEPS=${STEPS:-5}
PY=${PYTHON:-python}
mkdir -p "$OUT"

if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" megatron-core psutil
  else
    echo "megatron-core is not installed and WHEELS=$WHEELS is not a folder of wheels" >&2
    exit 2
  fi
fi
"$PY" -c "import psutil" 2>/dev/null || echo "warning: psutil missing (dist_checkpointing saves hang without it)" >&2

"$PY" - <<'PYEOF'
import torch, transformers, megatron.core as mc
print(f"torch {torch.__version__} · transformers {transformers.__version__} · megatron-core {mc.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import transformer_engine
    print("transformer-engine", transformer_engine.__version__)
except Exception as error:  # noqa: BLE001
    print("transformer-engine: not importable; Megatron uses the local spec with SDPA attention")
PYEOF

run() {  # mode, seconds
  timeout "$2" "$PY" scripts/device_check_megatron.py "$1" --out "$OUT" --batch "$BATCH" --micro-batch "$BATCH" \
    --seq "$SEQ" --steps "$STEPS" ${TINY:+--tiny} || echo "$1 failed or timed out (exit $?)" >&2
}
run parity 300
run hf 300
run megatron 300
"$PY" scripts/device_check_megatron.py table --out "$OUT"
