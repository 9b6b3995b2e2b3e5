#!/usr/bin/env bash
# Serve a MERGED medgpt-ds model with vLLM's OpenAI-compatible server (continuous batching, paged
# KV cache, tensor parallel): the high-throughput alternative to tools/serve.py.
#
# vLLM is an optional dependency (pip install vllm; needs a CUDA GPU); nothing else in medgpt-ds
# uses it. A LoRA run must be merged first, e.g. from its DeepSpeed checkpoint:
#     python tools/zero_to_hf.py --checkpoint_dir outputs/sft_lora --output_dir outputs/sft_merged --merge_lora
#
# Usage:
#     MEDGPT_API_KEY=secret bash tools/vllm_serve.sh outputs/sft_merged [extra `vllm serve` flags]
#     TP=4 PORT=8001 bash tools/vllm_serve.sh outputs/sft_70b_merged --max-num-seqs 64
#     DRY_RUN=1 bash tools/vllm_serve.sh outputs/sft_merged     # print the command, start nothing
# Environment: HOST (127.0.0.1), PORT (8000), TP (tensor-parallel size, 1), DTYPE (auto),
#     SERVED_MODEL_NAME (the dir's name), MAX_MODEL_LEN (the model's), MEDGPT_API_KEY (none),
#     PYTHON (python).
# Clients use it exactly like tools/serve.py: OpenAI(base_url="http://HOST:PORT/v1", api_key=...).
#
# The chat template is the one training exported into the tokenizer. vLLM stops generating at the
# eos ids of generation_config.json; a base model trained with a chat template (e.g. chatml on a
# base tokenizer whose eos is <|endoftext|>) has the template's end-of-turn token (<|im_end|>)
# missing there and would talk past the end of its turn. So this script writes a generation config
# with the end-of-turn id added (to a temp dir, the model dir is left alone) and passes it with
# --generation-config.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
MODEL=$1
shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}

if [[ ! -f "$MODEL/config.json" ]]; then
    if [[ -f "$MODEL/adapter_config.json" ]]; then
        echo "error: $MODEL is a LoRA adapter; merge it first (tools/zero_to_hf.py --merge_lora, or tools/merge_lora.py) and serve the merged dir" >&2
    else
        echo "error: $MODEL has no config.json: pass a merged HF model dir (tools/zero_to_hf.py / tools/merge_lora.py output)" >&2
    fi
    exit 1
fi

GEN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/medgpt_vllm_gen.XXXXXX")
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$MODEL" "$GEN_DIR" <<'EOF'
import json, os, sys
from transformers import AutoTokenizer
from medgpt_ds.data.templates import turn_terminators

model, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model)
gen_path = os.path.join(model, "generation_config.json")
gen = json.load(open(gen_path, encoding="utf-8")) if os.path.isfile(gen_path) else {}
eos = gen.get("eos_token_id")
eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
added = [i for i in turn_terminators(tok)[0] if i not in eos]
gen["eos_token_id"] = eos + added
json.dump(gen, open(os.path.join(out, "generation_config.json"), "w"), indent=2)
names = ", ".join(tok.convert_ids_to_tokens(gen["eos_token_id"]))
print(f"vllm_serve: stop tokens {names}" + (f" (added {tok.convert_ids_to_tokens(added)})" if added else ""), file=sys.stderr)
EOF

cmd=(vllm serve "$MODEL"
     --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
     --served-model-name "${SERVED_MODEL_NAME:-$(basename "$MODEL")}"
     --dtype "${DTYPE:-auto}" --tensor-parallel-size "${TP:-1}"
     --generation-config "$GEN_DIR")
[[ -n "${MAX_MODEL_LEN:-}" ]] && cmd+=(--max-model-len "$MAX_MODEL_LEN")
cmd+=("$@")
# The key goes through the environment (vLLM reads VLLM_API_KEY), not argv, which `ps` shows.
[[ -n "${MEDGPT_API_KEY:-}" ]] && export VLLM_API_KEY=$MEDGPT_API_KEY
if [[ -z "${MEDGPT_API_KEY:-}" && "${HOST:-127.0.0.1}" != 127.* && "${HOST:-127.0.0.1}" != localhost ]]; then
    echo "WARNING: serving on ${HOST} without an API key; set MEDGPT_API_KEY" >&2
fi

if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
if ! command -v vllm >/dev/null; then
    echo "error: vllm is not installed (pip install vllm; needs a CUDA GPU). tools/serve.py serves the same API without it." >&2
    exit 1
fi
exec "${cmd[@]}"
