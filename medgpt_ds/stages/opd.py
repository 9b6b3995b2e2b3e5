"""On-policy distillation (OPD): a student learns a frozen teacher's next-token distribution on its own
samples, mixed with the dataset's answers.

Paper: GKD, Agarwal et al. 2024, https://arxiv.org/abs/2306.13649 (eq. 1: the generalized Jensen-Shannon
divergence; algorithm 1: with probability lambda the student's own samples, else the dataset's outputs).
MedicalGPT's `training/opd_training.py` runs TRL's GKDTrainer with the teacher whole on every GPU; here the
student is a DeepSpeed engine (full or LoRA, ZeRO-2/3), the teacher a frozen engine (ZeRO-3 partitioned, its
parameters optionally on the CPU, or 4-bit / 8-bit on ZeRO-0/1/2), and the student samples through the rollout
backends of ppo / grpo (--rollout_backend vllm: a vLLM engine holding the student's weights, synced after every
optimizer step and version-checked; only its sampled ids are used). Each optimizer step: per micro batch a seeded
draw (the same on every rank) makes it on-policy with probability --opd_lambda; the on-policy prompts are answered
by the student in one rollout, the others keep their dataset answer; teacher and student score the response tokens
(both models' logits made from their hidden states --loss_chunk_size tokens at a time) and the student takes the
generalized JSD (--opd_beta: 0 forward KL, 1 reverse KL; fp32 a chunk at a time) as a token mean over the whole step.
Data: MedicalGPT's sft formats; every assistant turn with the conversation before it is one sample (tool calls
and tool results rendered per --tool_format).

    deepspeed --num_gpus 8 launch/train.py --stage opd --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
        --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct --train_file_dir data/demo/sft \
        --opd_lambda 0.5 --opd_beta 0.5 --max_new_tokens 256 --deepspeed ds_configs/zero3.json \
        --bf16 --output_dir outputs/opd
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from medgpt_ds import checkpoint, dist, engine as eng, generation, long_context, loop, rl
from medgpt_ds.config import RolloutArguments
from medgpt_ds.convert import write_hf_meta
from medgpt_ds.data.loading import data_key, load_train_eval, resolve_tools, tokenize_records
from medgpt_ds.data.templates import encode_conversation, get_chat_template, turn_terminators
from medgpt_ds.errors import UserError
from medgpt_ds.generation import Generation, left_pad
from medgpt_ds.logprobs import IGNORE_INDEX
from medgpt_ds.losses import generalized_jsd_loss
from medgpt_ds.model import check_model_path, load_tokenizer, resolve_attn_implementation, resolve_dtype
from medgpt_ds.run_state import RunState, TrainState, debug_fault
from medgpt_ds.scoring import in_chunks, rollout_logprobs

# RolloutArguments flags of ppo / grpo that have no meaning here, with their default (refused when changed)
NOT_FOR_OPD = {"sft_model_path": None, "ref_model_path": None, "reward_model_path": None, "reward_funcs": None,
               "reward_weights": None, "reward_model_weight": 1.0, "kl_estimator": "k1", "rollout_batch_size": None}


@dataclass
class Arguments(RolloutArguments):
    """--stage opd: the teacher, the on-policy share, the divergence; sampling and the rollout backend as in
    ppo / grpo (--rollout_backend, --max_new_tokens, --temperature, --top_p, --top_k, --stop,
    --generation_batch_size; --offload_frozen puts a ZeRO-3 teacher's parameters on the CPU)."""

    teacher_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "The frozen teacher (an HF folder or hub id) whose token distribution the "
                                        "student learns; it must share the student's tokenizer."})
    teacher_load_in_4bit: bool = field(default=False, metadata={"help": "Load the teacher in 4-bit (bitsandbytes "
                                                                         "nf4); ZeRO-0/1/2 only."})
    teacher_load_in_8bit: bool = field(default=False, metadata={"help": "Load the teacher in 8-bit (bitsandbytes); "
                                                                         "ZeRO-0/1/2 only."})
    opd_lambda: float = field(default=0.5, metadata={"help": "Share of micro batches trained on the student's own "
                                                             "samples (on-policy); the rest use the dataset answers."})
    opd_beta: float = field(default=0.5, metadata={"help": "Generalized JSD interpolation: 0 forward KL(teacher || "
                                                           "student), 1 reverse KL(student || teacher)."})
    jsd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both distributions in the "
                                                                  "divergence (TRL's GKDTrainer, which MedicalGPT's "
                                                                  "opd runs, uses 1; --temperature is the sampling one)."})
    max_prompt_length: Optional[int] = field(
        default=None, metadata={"help": "Max prompt tokens (MedicalGPT's name for --max_source_length, which is the "
                                        "default); longer prompts are left-truncated (--truncation_mode drop: "
                                        "dropped), counted in the log."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the student's answers "
                                                              "(0: greedy); GKD's default 0.9."})

    def __post_init__(self):
        super().__post_init__()
        for name, default in NOT_FOR_OPD.items():
            if getattr(self, name) != default:
                raise ValueError(f"--{name} has no meaning in --stage opd (no reward, no reference policy; a step "
                                 "is per_device_train_batch_size x gradient_accumulation_steps samples per rank)")
        if not 0.0 <= self.opd_lambda <= 1.0:
            raise ValueError(f"--opd_lambda must be in [0, 1], got {self.opd_lambda}")
        if not 0.0 <= self.opd_beta <= 1.0:
            raise ValueError(f"--opd_beta must be in [0, 1], got {self.opd_beta}")
        if self.jsd_temperature <= 0:
            raise ValueError("--jsd_temperature must be positive")
        if self.teacher_load_in_4bit and self.teacher_load_in_8bit:
            raise ValueError("--teacher_load_in_4bit and --teacher_load_in_8bit are exclusive")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ValueError("--max_prompt_length must be positive")


def check_same_vocabulary(student_tok, teacher_tok, chat_template: str, teacher_path: str) -> None:
    """UserError unless the teacher's tokenizer is the student's: the same size, the same ids for the chat
    template's special tokens (and eos / bos / pad), the same id for every token."""
    flag = f"--teacher_model_name_or_path {teacher_path}"
    why = ("the divergence compares the two models' next-token distributions id by id, so teacher and student "
           "must share one tokenizer (one model family, e.g. Qwen2.5-7B-Instruct -> Qwen2.5-1.5B-Instruct)")
    if len(teacher_tok) != len(student_tok):
        raise UserError(f"{flag}: its tokenizer has {len(teacher_tok)} tokens, the student's {len(student_tok)}; {why}")
    special = [t for t in list(student_tok.all_special_tokens) + list(student_tok.get_added_vocab())
               if t in chat_template or t in (student_tok.eos_token, student_tok.bos_token)]
    stop_ids, _ = turn_terminators(student_tok, chat_template)
    special += student_tok.convert_ids_to_tokens(stop_ids)
    for tok in dict.fromkeys(special):
        mine, theirs = student_tok.convert_tokens_to_ids(tok), teacher_tok.convert_tokens_to_ids(tok)
        if mine != theirs:
            raise UserError(f"{flag}: the chat template's special token {tok!r} is id {mine} for the student but "
                            f"{theirs} for the teacher; {why}")
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        tok = next(t for t in sorted(vs, key=vs.get) if vt.get(t) != vs[t])
        raise UserError(f"{flag}: token {tok!r} is id {vs[tok]} for the student but {vt.get(tok)} for the teacher; "
                        f"{why}")


def shared_vocab_size(student_config, teacher_config, n_tokens: int, teacher_path: str) -> int:
    """The logits both models are compared over: the student's rows (padded checkpoints, e.g. Qwen2.5 1.5B with
    151936 rows against 7B's 152064, compare over the student's; the extra teacher rows are padding beyond the
    shared tokenizer). UserError when the student has rows the teacher cannot read (it may sample them)."""
    v_s = max(student_config.get_text_config().vocab_size, n_tokens)  # the student is resized up to the tokenizer
    v_t = teacher_config.get_text_config().vocab_size
    if v_s > v_t:
        raise UserError(f"--teacher_model_name_or_path {teacher_path}: the teacher's vocabulary has {v_t} rows, the "
                        f"student's {v_s}; the student could sample ids the teacher cannot score")
    if v_s < v_t:
        dist.print0(f"opd: the teacher has {v_t} vocabulary rows, the student {v_s}: the distributions are compared "
                    f"over the first {v_s} (the shared tokenizer has {n_tokens} tokens)")
    return v_s


def encode_turns(tokenizer, rec: dict, tool_format: str, stop_ids: list[int]) -> Optional[dict]:
    """One tokenization of an sft record and the [start, end) token span of each assistant turn after the first
    token: each turn with everything before it (the prompt, ending in the generation prompt) is one sample. A turn
    ends at its first ``stop_ids`` token (the template's end of turn), where the student's own answers end."""
    enc = encode_conversation(tokenizer, tokenizer.chat_template, rec["messages"], 1 << 30, tools=rec.get("tools"),
                              tool_format=tool_format)
    if enc is None:
        return None
    ids, labels, turns, i = enc["input_ids"], enc["labels"], [], 0
    stops = set(stop_ids)
    while i < len(labels):
        if labels[i] == IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] != IGNORE_INDEX:
            j += 1
        end = next((k + 1 for k in range(i, j) if ids[k] in stops), j)
        if i > 0:  # an assistant turn needs a prompt to answer
            turns.append([i, end])
        i = j
    return {"input_ids": ids, "turns": turns} if turns else None


def split_samples(encoded: list[dict], max_prompt: int, max_answer: int, mode: str, what: str) -> list[dict]:
    """[{"prompt_ids", "answer_ids", "answer_cut"}] of every turn: prompts left-truncated to ``max_prompt`` and
    answers cut at ``max_answer`` (``mode`` "drop": such samples are dropped instead); counts in the log."""
    out, long_prompt, long_answer, dropped = [], 0, 0, 0
    for rec in encoded:
        ids = rec["input_ids"]
        for start, end in rec["turns"]:
            prompt, answer = ids[:start], ids[start:end]
            too_long = (len(prompt) > max_prompt, len(answer) > max_answer)
            long_prompt += too_long[0]
            long_answer += too_long[1]
            if any(too_long) and mode == "drop":
                dropped += 1
                continue
            out.append({"prompt_ids": prompt[-max_prompt:], "answer_ids": answer[:max_answer],
                        "answer_cut": too_long[1]})
    fate = f"{dropped} dropped (--truncation_mode drop)" if mode == "drop" else "left-truncated / cut"
    dist.print0(f"opd {what}: {len(out)} samples (assistant turns) from {len(encoded)} conversations; "
                f"{long_prompt} prompts over {max_prompt} tokens and {long_answer} answers over {max_answer} "
                f"(--max_new_tokens): {fate}")
    return out


def dataset_answers(samples: list[dict], pad_id: int, device) -> Generation:
    """The dataset's answers to ``samples`` laid out as a rollout (prompts left-padded, answers right-padded)."""
    ids, prompt_mask = left_pad([s["prompt_ids"] for s in samples], pad_id, device)
    width = max(len(s["answer_ids"]) for s in samples)
    answers = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        answers[i, :len(s["answer_ids"])] = torch.tensor(s["answer_ids"], dtype=torch.long)
        mask[i, :len(s["answer_ids"])] = True
    has_eos = torch.tensor([not s["answer_cut"] for s in samples])
    return Generation(torch.cat([ids, answers.to(device)], dim=1), prompt_mask, mask.to(device), has_eos.to(device))


def response_logits(model, gen: Generation) -> torch.Tensor:
    """(B, R, V) logits at the positions that predict the response tokens, in the model's dtype (only those
    R + 1 positions go through the LM head)."""
    R = gen.response_mask.size(1)
    out = model(input_ids=gen.sequences, attention_mask=gen.attention_mask, position_ids=gen.position_ids,
                use_cache=False, logits_to_keep=R + 1)
    return out.logits[:, -(R + 1):-1]


def response_hidden(model, gen: Generation) -> torch.Tensor:
    """(B, R, H) final hidden states at the positions that predict the response tokens (no logits computed)."""
    R = gen.response_mask.size(1)
    hidden = long_context.final_hidden_states(model, input_ids=gen.sequences, attention_mask=gen.attention_mask,
                                              position_ids=gen.position_ids, use_cache=False)
    return hidden[:, -(R + 1):-1]


def load_teacher(cfg, a, tokenizer, frozen_config: dict):
    """The frozen teacher: a ZeRO-3 (or replicated) frozen engine, or with --teacher_load_in_4bit/8bit a
    bitsandbytes model on this rank's device (quantized weights can be neither partitioned nor cast)."""
    path = a.teacher_model_name_or_path
    if not (a.teacher_load_in_4bit or a.teacher_load_in_8bit):
        return rl.load_frozen(cfg, path, AutoModelForCausalLM, tokenizer, frozen_config)
    from transformers import BitsAndBytesConfig  # here: bitsandbytes is only needed for this path

    m = cfg.model
    dtype = resolve_dtype(m, cfg.train)
    quant = BitsAndBytesConfig(load_in_4bit=a.teacher_load_in_4bit, load_in_8bit=a.teacher_load_in_8bit,
                               bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, cache_dir=m.cache_dir, revision=m.model_revision, trust_remote_code=m.trust_remote_code, dtype=dtype,
        attn_implementation=resolve_attn_implementation(m), quantization_config=quant,
        device_map={"": dist.device()})
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def run(cfg) -> Optional[TrainState]:
    t, d, a = cfg.train, cfg.data, cfg.stage_args or Arguments()
    micro, ga = t.per_device_train_batch_size, t.gradient_accumulation_steps
    max_prompt = a.max_prompt_length or d.max_source_length

    # 1. setup: checks, tokenizers (one vocabulary), samples, batch arithmetic, sampling
    student_path, teacher_path = cfg.model.model_name_or_path, a.teacher_model_name_or_path
    if not student_path or cfg.model.model_config:
        raise UserError("--stage opd needs --model_name_or_path: the student to start from (not --model_config)")
    if not teacher_path:
        raise UserError("--stage opd needs --teacher_model_name_or_path: the model whose distribution the student "
                        "learns")
    check_model_path(teacher_path, "--teacher_model_name_or_path", tokenizer=True, cache_dir=cfg.model.cache_dir)
    quantized = a.teacher_load_in_4bit or a.teacher_load_in_8bit
    if quantized and eng.zero_stage(eng.load_ds_config(t.deepspeed)) == 3:
        raise UserError("--teacher_load_in_4bit/8bit: quantized weights cannot be ZeRO-3 partitioned; use a ZeRO-2 "
                        "config (the teacher is then whole on every rank, in 4/8 bits), or drop the flag under ZeRO-3 "
                        "(the teacher is partitioned; --offload_frozen keeps its parameters on the CPU)")
    # the tokenizers are compared before any rank starts: a teacher of another family stops here
    student_config = AutoConfig.from_pretrained(student_path, trust_remote_code=cfg.model.trust_remote_code)
    teacher_config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.chat_template = get_chat_template(d.template_name, tokenizer)
    teacher_tok = load_tokenizer(dataclasses.replace(cfg.model, model_name_or_path=teacher_path,
                                                     tokenizer_name_or_path=None))
    check_same_vocabulary(tokenizer, teacher_tok, tokenizer.chat_template, teacher_path)
    vocab = shared_vocab_size(student_config, teacher_config, len(tokenizer), teacher_path)
    dist.init(t.ddp_timeout)
    dist.announce()
    # the rollout backends see opd's prompt length as the prompt budget (vLLM's context length)
    rollout_cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, max_source_length=max_prompt))
    generation.check_backend(a.rollout_backend, model_type=student_config.model_type, device_type=dist.device().type,
                             use_peft=cfg.lora.use_peft, cfg=rollout_cfg, model_config=student_config)
    resume = checkpoint.prepare_output_dir(cfg)

    train_recs, eval_recs, files = load_train_eval(d, "sft", t.seed, output_dir=t.output_dir)
    tool_format = resolve_tools(d, tokenizer, train_recs + eval_recs)
    stop_ids, _ = turn_terminators(tokenizer, tokenizer.chat_template)
    key = [data_key("opd", d, tokenizer, files, t.seed, tool_format=tool_format, stop_ids=stop_ids)]
    cache = f"{t.output_dir}/.cache/tokenized" if not cfg.model.cache_dir else f"{cfg.model.cache_dir}/tokenized"

    def samples(records: list[dict], what: str) -> list[dict]:
        encoded, counts = tokenize_records(records, lambda r: encode_turns(tokenizer, r, tool_format, stop_ids),
                                           cache_dir=cache, key=key + [what], num_proc=d.preprocessing_num_workers,
                                           overwrite=d.overwrite_cache, desc=f"opd-{what}")
        if counts["dropped"]:
            dist.print0(f"opd {what}: {counts['dropped']} of {counts['records']} conversations have no assistant turn "
                        "after a prompt and give no sample")
        return split_samples(encoded, max_prompt, a.max_new_tokens, d.truncation_mode, what)

    items = samples(train_recs, "train")
    eval_items = samples(eval_recs, "eval") if eval_recs else []
    world = dist.world_size()
    steps_per_epoch, leftover = loop.epoch_layout(len(items), micro, ga, world)
    if steps_per_epoch == 0:
        raise UserError(f"{len(items)} training samples cannot fill one step of per_device_train_batch_size {micro} x "
                        f"gradient_accumulation_steps {ga} x {world} ranks; lower them or add data")
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
    params = rl.sampling_params(a, tokenizer)
    set_seed(t.seed)

    # 2. engines: student (trained), teacher (frozen), rollout backend
    ds_config = eng.build_ds_config(cfg, hidden_size=getattr(student_config.get_text_config(), "hidden_size", None),
                                    num_training_steps=total_steps)
    generation.patch_ds_config(a.rollout_backend, ds_config, max_prompt + a.max_new_tokens)
    zero3 = eng.zero_stage(ds_config) == 3
    if a.offload_frozen and not zero3:
        dist.print0("warning: --offload_frozen needs ZeRO-3 (parameter offload); the teacher stays on the device")
    student = rl.load_actor(cfg, cfg.model, tokenizer, ds_config, total_steps)
    teacher = load_teacher(cfg, a, tokenizer, eng.frozen_ds_config(ds_config, offload_params=a.offload_frozen))
    backend = generation.make_backend(a.rollout_backend, student, tokenizer, params, zero3=zero3, args=a,
                                      cfg=rollout_cfg)
    truncation = (a.top_k, a.top_p) if a.temperature > 0 else (0, 1.0)  # what the sampler drew from
    how = ("4-bit" if a.teacher_load_in_4bit else "8-bit") if quantized else (
        "ZeRO-3 partitioned" + (", parameters on the CPU" if a.offload_frozen else "") if zero3 else "replicated")
    # the teacher's logits from its hidden states, --loss_chunk_size tokens at a time, wherever its output head
    # reproduces its logits (--chunked_loss False, or a head it cannot: its (B, R, V) logits per micro batch)
    teacher_chunks = long_context.loss_chunk_size(t, teacher, "opd teacher")
    teacher_head = long_context.OutputHead(teacher) if teacher_chunks else None
    # the student's logits likewise (its head trainable: chunks recomputed in backward; LoRA: frozen, gathered)
    student_chunks = long_context.loss_chunk_size(t, student, "opd student")
    student_head = long_context.OutputHead(student) if student_chunks else None
    if zero3:  # what partitioning left on this rank (rank 0 speaks for all)
        held = sum(p.ds_tensor.numel() for p in teacher.parameters())
        how += f", rank 0 holds {held:,} of its {sum(p.ds_numel for p in teacher.parameters()):,} parameters"
    dist.print0(f"opd: {micro} x {ga} samples per rank per step ({micro * ga * world} in all), on-policy share "
                f"{a.opd_lambda}, generalized JSD beta {a.opd_beta}; teacher {teacher_path} ({how})")

    def hf_meta(tag_dir: str) -> None:
        write_hf_meta(tag_dir, student.module, tokenizer, model_kind="causal_lm", base_model=student_path,
                      torch_dtype=str(next(student.module.parameters()).dtype))

    # ranks sample from their own streams; set after every model is built, before a resume restores each rank's
    set_seed(t.seed + dist.rank())
    run_state = RunState(cfg, student, tokenizer, ds_config=ds_config, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch, resume_dir=resume, hf_meta=hf_meta, export_name="student")
    state = run_state.resume()
    if leftover:
        run_state.logger.info(f"data: {leftover} of {len(items)} samples per epoch do not fill a whole step and are "
                              "left out of that epoch (a different set each epoch)")

    def divergence(gen: Generation, num_tokens: Optional[float], backward: bool):
        """(loss, metrics, teacher seconds) of the student against the teacher on ``gen``'s response tokens;
        with ``backward`` the student's backward too (inside the heads' gathers: a trainable student head's
        chunks are recomputed there, teacher head included)."""
        start = time.perf_counter()
        with torch.no_grad():
            t_out = response_hidden(teacher, gen) if teacher_chunks else response_logits(teacher, gen)[..., :vocab]
        teacher_s = time.perf_counter() - start
        s_out = response_hidden(student, gen) if student_chunks else response_logits(student, gen)
        # under ZeRO-3 a frozen partitioned head (the teacher's, a LoRA student's) is gathered once per micro batch
        # (collective); a trainable one is gathered by the student engine's own hooks
        with teacher_head.gathered() if teacher_head else contextlib.nullcontext() as t_fn, \
                student_head.gathered() if student_head else contextlib.nullcontext() as s_fn:
            loss, m = generalized_jsd_loss(s_out, t_out, gen.response_mask, beta=a.opd_beta,
                                           temperature=a.jsd_temperature, num_tokens=num_tokens,
                                           chunk_size=t.loss_chunk_size,
                                           teacher_head=(lambda h: t_fn(h)[..., :vocab]) if t_fn else None,
                                           student_head=s_fn, frozen_student_head=bool(s_fn) and student_head.frozen)
            if backward:
                student.backward(loss)
        return loss, m, teacher_s

    def eval_collate(batch: list[dict]) -> dict:
        gen = dataset_answers(batch, tokenizer.pad_token_id, "cpu")
        return {"sequences": gen.sequences, "prompt_mask": gen.prompt_mask, "response_mask": gen.response_mask,
                "num_tokens": gen.response_mask.sum()}

    def eval_loss(engine, batch: dict):
        gen = Generation(batch["sequences"], batch["prompt_mask"], batch["response_mask"],
                         torch.ones(len(batch["sequences"]), dtype=torch.bool))
        loss, m, _ = divergence(gen, 1.0, backward=False)  # the sum: loop.evaluate divides by the tokens of all ranks
        return loss, {"top1_agreement": m["top1_agreement"] * m["num_tokens"]}

    def run_eval() -> None:
        if eval_items:
            res = loop.evaluate(student, eval_items, eval_collate, eval_loss, t.per_device_eval_batch_size,
                                "num_tokens")
            run_state.logger.log(state.global_step, res, prefix="eval")

    window: dict[str, float] = {}

    def record() -> dict:
        """The window's sums (already over all ranks) as means for the log."""
        w = dict(window)
        window.clear()
        tok, on = max(w["tokens"], 1.0), w["on_seqs"]
        rec = {"loss": w["jsd"] / tok, "top1_agreement": w["agree"] / tok,
               "on_policy_fraction": on / w["seqs"], "response_length": w["tokens"] / w["seqs"]}
        if on:
            rec.update({"on_policy/response_length": w["on_tokens"] / on, "on_policy/eos_fraction": w["on_eos"] / on,
                        "on_policy/jsd": w["on_jsd"] / max(w["on_tokens"], 1.0)})
        if w["seqs"] > on:
            rec["off_policy/jsd"] = (w["jsd"] - w["on_jsd"]) / max(w["tokens"] - w["on_tokens"], 1.0)
        if "weight_version" in w:
            rec["rollout/weight_version"] = w["weight_version"]
        if "mismatch/n" in w:
            rec.update(rl.mismatch_metrics(w, w["mismatch_max"]))
        rec.update(rl.timing(w["gen_s"] / w["steps"], w["teacher_s"] / w["steps"], w["train_s"] / w["steps"],
                             w["sync_s"] / w["steps"]))
        rec["lr"] = student.get_lr()[0]
        grad_norm = student.get_global_grad_norm()
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        return rec

    # 3. loop: draw, roll out, score with the teacher, update
    student.train()
    with closing(backend):
        while state.global_step < total_steps:
            debug_fault(state.global_step + 1)
            t0 = time.perf_counter()
            batch = rl.prompts_for(items, state.epoch, state.step_in_epoch, micro * ga, t.seed)
            micro_batches = [batch[j * micro:(j + 1) * micro] for j in range(ga)]
            # the on-policy draw: a function of the seed and the step, the same on every rank (the rollout is collective)
            g = torch.Generator().manual_seed(t.seed * 1000003 + state.global_step)
            on_policy = (torch.rand(ga, generator=g) < a.opd_lambda).tolist()
            rollout, sync_s = None, 0.0
            if any(on_policy):
                rollout = backend.generate([s["prompt_ids"] for j in range(ga) if on_policy[j]
                                            for s in micro_batches[j]])
                # a backend with its own copy of the weights (vLLM) must have sampled from this step's student
                rl.check_weight_version(rollout, student.global_steps)
                sync_s = rl.backend_stats(backend).get("weight_sync/seconds", 0.0)
            mismatch, max_diff = {}, 0.0
            logged = (state.global_step + 1) % t.logging_steps == 0 or state.global_step + 1 == total_steps
            if rollout is not None and rollout.logprobs is not None and logged:
                # the loss needs only the sampled ids; the engine's log-probs against the student's, on logged
                # steps only (one extra no-grad forward over the on-policy rows): the rollout/* mismatch metrics
                with torch.no_grad():
                    _, sampled = in_chunks(lambda rows: rollout_logprobs(student, rows, params.logit_temperature,
                                                                         *truncation), rollout, micro)
                _, mismatch, max_diff = rl.engine_correction(rollout, sampled, sampled, 0.0)
            gen_s = time.perf_counter() - t0 - sync_s

            gens, k = [], 0
            for j in range(ga):
                if on_policy[j]:
                    gens.append(rollout.select(slice(k * micro, (k + 1) * micro)))
                    k += 1
                else:
                    gens.append(dataset_answers(micro_batches[j], tokenizer.pad_token_id, dist.device()))
            tokens = dist.all_reduce_sum(torch.tensor(float(sum(x.response_mask.sum() for x in gens)),
                                                      dtype=torch.float64, device=dist.device())).item()
            norm = max(tokens, 1.0) / (world * ga)  # a global token mean over the step (losses.py docstring)
            sums = {"jsd": 0.0, "agree": 0.0, "tokens": 0.0, "seqs": 0.0, "on_seqs": 0.0, "on_tokens": 0.0,
                    "on_eos": 0.0, "on_jsd": 0.0, "teacher_s": 0.0}
            for j, gen_j in enumerate(gens):
                loss, m, teacher_s = divergence(gen_j, norm, backward=True)
                student.step()
                n = float(m["num_tokens"])
                sums["teacher_s"] += teacher_s
                sums["jsd"] += float(m["jsd"]) * n
                sums["agree"] += float(m["top1_agreement"]) * n
                sums["tokens"] += n
                sums["seqs"] += len(gen_j)
                if on_policy[j]:
                    sums["on_seqs"] += len(gen_j)
                    sums["on_tokens"] += n
                    sums["on_eos"] += float(gen_j.has_eos.sum())
                    sums["on_jsd"] += float(m["jsd"]) * n
            backend.update_weights(student.global_steps)
            step_s = time.perf_counter() - t0

            # bookkeeping: sums over ranks (by name), log, evaluate, checkpoint, stop signal
            tot = dist.all_reduce_dict({**{k: v for k, v in sums.items() if k != "teacher_s"}, **mismatch})
            times = dist.all_reduce_max(torch.tensor([gen_s, sums["teacher_s"], step_s, sync_s, max_diff],
                                                     dtype=torch.float64, device=dist.device())).tolist()
            tot.update(gen_s=times[0], teacher_s=times[1], sync_s=times[3],
                       train_s=max(times[2] - times[0] - times[1] - times[3], 0.0), steps=1.0)
            for k, v in tot.items():
                window[k] = window.get(k, 0.0) + v
            if mismatch:
                window["mismatch_max"] = max(window.get("mismatch_max", 0.0), times[4])
            if rollout is not None and rollout.weight_version >= 0:
                window["weight_version"] = float(rollout.weight_version)  # the last rollout's, not a sum
            run_state.after_step(micro * ga * world, record)
            if t.eval_steps and state.global_step % t.eval_steps == 0:
                run_eval()
            if run_state.should_stop():
                return state
    if (t.eval_steps or t.do_eval) and not (t.eval_steps and state.global_step % t.eval_steps == 0):
        run_eval()
    return run_state.finish()
