#!/usr/bin/env bash
# The main job: the whole pipeline on the bundled demo data with a tiny model, on CPU, offline.
# tokenizer -> pt (from scratch) -> sft -> rm -> dpo -> grpo (rule + reward-model rewards) -> opd (the
# SFT model distilled on-policy from the final one) -> ask both a question,
# every training stage on 2 ranks under DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/demo}
NPROC=${NPROC:-2}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
LAUNCH=(deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}")

echo "== 1/8 tokenizer: byte-level BPE on the demo corpus"
python tools/train_tokenizer.py --corpus data/demo/pretrain --output_dir "$OUT/tokenizer" \
  --vocab_size 1200 --template_name chatml

echo "== 2/8 pt: continued pretraining of a small model from scratch ($NPROC ranks, ZeRO-2)"
"${LAUNCH[@]}" launch/train.py --stage pt --model_config small --tokenizer_name_or_path "$OUT/tokenizer" \
  --train_file_dir data/demo/pretrain --block_size 256 --per_device_train_batch_size 4 \
  --learning_rate 1e-3 --warmup_ratio 0.05 --num_train_epochs 2 --logging_steps 10 --save_steps 50 \
  --save_total_limit 1 --deepspeed ds_configs/zero2.json --output_dir "$OUT/pt" --overwrite_output_dir

echo "== 3/8 sft: multi-turn conversations, loss on answers only ($NPROC ranks, ZeRO-3)"
"${LAUNCH[@]}" launch/train.py --stage sft --model_name_or_path "$OUT/pt" --template_name chatml \
  --train_file_dir data/demo/sft --validation_split_percentage 10 --model_max_length 256 \
  --per_device_train_batch_size 2 --learning_rate 5e-4 --warmup_ratio 0.05 --num_train_epochs 30 \
  --logging_steps 10 --eval_steps 30 --save_steps 100 --save_total_limit 1 \
  --deepspeed ds_configs/zero3.json --output_dir "$OUT/sft" --overwrite_output_dir

echo "== 4/8 rm: reward model on the demo preference pairs ($NPROC ranks, ZeRO-2)"
"${LAUNCH[@]}" launch/train.py --stage rm --model_name_or_path "$OUT/sft" --template_name chatml \
  --train_file_dir data/demo/reward --max_source_length 96 --max_target_length 64 \
  --per_device_train_batch_size 4 --learning_rate 5e-4 --num_train_epochs 2 --logging_steps 5 \
  --save_steps 100 --deepspeed ds_configs/zero2.json --output_dir "$OUT/rm" --overwrite_output_dir

echo "== 5/8 dpo: preference optimisation against a precomputed reference ($NPROC ranks, ZeRO-2)"
"${LAUNCH[@]}" launch/train.py --stage dpo --model_name_or_path "$OUT/sft" --template_name chatml \
  --train_file_dir data/demo/reward --max_source_length 96 --max_target_length 64 --reference precomputed \
  --beta 0.1 --per_device_train_batch_size 4 --learning_rate 5e-5 --num_train_epochs 1 --logging_steps 2 \
  --save_steps 100 --deepspeed ds_configs/zero2.json --output_dir "$OUT/dpo" --overwrite_output_dir

echo "== 6/8 grpo: 4 samples per question, answer-letter rule + the reward model ($NPROC ranks, ZeRO-3)"
"${LAUNCH[@]}" launch/train.py --stage grpo --model_name_or_path "$OUT/dpo" --template_name chatml \
  --train_file_dir data/demo/grpo --num_generations 4 --max_new_tokens 24 \
  --reward_funcs answer_choice --reward_model_path "$OUT/rm" --reward_model_weight 0.5 \
  --per_device_train_batch_size 2 --learning_rate 1e-5 --max_steps 3 --logging_steps 1 --save_steps 100 \
  --deepspeed ds_configs/zero3.json --output_dir "$OUT/grpo" --overwrite_output_dir

echo "== 7/8 opd: the SFT model (student) learns the final model's (teacher) token distribution on its own samples ($NPROC ranks, ZeRO-3)"
"${LAUNCH[@]}" launch/train.py --stage opd --model_name_or_path "$OUT/sft" --teacher_model_name_or_path "$OUT/grpo" \
  --template_name chatml --train_file_dir data/demo/sft --opd_lambda 0.5 --opd_beta 0.5 --max_prompt_length 96 \
  --max_new_tokens 24 --per_device_train_batch_size 2 --learning_rate 1e-4 --max_steps 10 --logging_steps 2 \
  --save_steps 100 --deepspeed ds_configs/zero3.json --output_dir "$OUT/opd" --overwrite_output_dir

echo "== 8/8 ask the final model, then the distilled student"
for q in "What are the symptoms of influenza?" "Which specialist treats asthma?"; do
  python tools/chat.py --model_name_or_path "$OUT/grpo" --max_new_tokens 32 --prompt "$q"
done
python tools/chat.py --model_name_or_path "$OUT/opd" --max_new_tokens 32 --prompt "Which specialist treats asthma?"
