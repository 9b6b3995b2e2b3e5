#!/usr/bin/env bash
# The main job: the whole pipeline on the bundled demo data with a tiny model, on CPU, offline.
# tokenizer -> pt (from scratch, 2 ranks, ZeRO-2) -> sft (2 ranks, ZeRO-3) -> ask a question.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/demo}
NPROC=${NPROC:-2}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
LAUNCH=(deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}")

echo "== 1/4 tokenizer: byte-level BPE on the demo corpus"
python tools/train_tokenizer.py --corpus data/demo/pretrain --output_dir "$OUT/tokenizer" \
  --vocab_size 1200 --template_name chatml

echo "== 2/4 pt: continued pretraining of a small model from scratch ($NPROC ranks, ZeRO-2)"
"${LAUNCH[@]}" launch/train.py --stage pt --model_config small --tokenizer_name_or_path "$OUT/tokenizer" \
  --train_file_dir data/demo/pretrain --block_size 256 --per_device_train_batch_size 4 \
  --learning_rate 1e-3 --warmup_ratio 0.05 --num_train_epochs 2 --logging_steps 10 --save_steps 50 \
  --save_total_limit 1 --deepspeed ds_configs/zero2.json --output_dir "$OUT/pt" --overwrite_output_dir

echo "== 3/4 sft: multi-turn conversations, loss on answers only ($NPROC ranks, ZeRO-3)"
"${LAUNCH[@]}" launch/train.py --stage sft --model_name_or_path "$OUT/pt" --template_name chatml \
  --train_file_dir data/demo/sft --validation_split_percentage 10 --model_max_length 256 \
  --per_device_train_batch_size 2 --learning_rate 5e-4 --warmup_ratio 0.05 --num_train_epochs 30 \
  --logging_steps 10 --eval_steps 30 --save_steps 100 --save_total_limit 1 \
  --deepspeed ds_configs/zero3.json --output_dir "$OUT/sft" --overwrite_output_dir

echo "== 4/4 ask the fine-tuned model"
python tools/chat.py --model_name_or_path "$OUT/sft" --max_new_tokens 32 \
  --prompt "What are the symptoms of influenza?"
