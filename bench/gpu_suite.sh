#!/usr/bin/env bash
# The one-shot GPU suite: one command on a machine with one CUDA GPU, no internet, torch
# preinstalled, every other package brought along as wheels. Finishes in under 9 minutes and
# writes bench/results/gpu_suite.json + gpu_suite.md (bench/gpu_suite.py says what it measures).
#
#   bash bench/gpu_suite.sh --wheels /path/to/wheels          # install our requirements from there, run
#   bash bench/gpu_suite.sh                                   # packages already installed: just run
#   bash bench/gpu_suite.sh --dry-run --out /tmp/suite        # CPU, tiny shapes, same code paths (CI)
#
# Never installs from the network: pip runs with --no-index against the wheel directory only.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       PYTHONUNBUFFERED=1 MEDGPT_NO_PROGRESS=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

if [ -n "$WHEELS" ]; then
  if [ ! -d "$WHEELS" ]; then echo "error: --wheels $WHEELS: no such directory" >&2; exit 2; fi
  # torch stays as preinstalled: requirements.txt does not name it, and --no-index never reaches a registry
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r requirements.txt || {
    echo "error: installing requirements.txt from $WHEELS failed (a wheel missing there?)" >&2; exit 2; }
  for extra in flash_attn flash-attn vllm; do
    if ls "$WHEELS" | grep -qi "^${extra//-/_}-"; then
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$extra" || echo "warning: $extra wheel did not install" >&2
    fi
  done
fi

missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "deepspeed", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "error: missing packages: $missing (pass --wheels DIR with their wheels)" >&2
  exit 2
fi
exec "$PY" bench/gpu_suite.py "${ARGS[@]}"
