"""--stage opd end to end through launch/train.py: a student distilled from a teacher trained (here) to
answer one fixed phrase learns to say it; two ranks under ZeRO-3 with the teacher partitioned and an
exact resume after a crash; MedicalGPT's run_opd.sh flag set (LoRA student, 4-bit teacher, bf16,
evaluation, tool calls); a teacher with another vocabulary refused. Units: the samples of a multi-turn tool
conversation, the flags. --rollout_backend vllm: tests/test_vllm_opd.py.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.launch_utils import ROOT, SHARED_DATA, crash_then_resume, ds_config_copy, metrics, train

PHRASE = "Rest and drink water."
HELD_OUT = ["What is a fever?", "How do I treat a cough at home?", "Is asthma dangerous?"]


def _greedy(model_dir: str, questions: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers of a saved model, ended at the template's end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for q in questions:
        p = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
        ids = model.generate(**p, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        out.append(tok.decode(ids[0, p["input_ids"].size(1):]))
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory, demo_tokenizer_dir, tiny_llama):
    """A teacher trained here to answer every question with PHRASE, and a random student, tiny Llamas (hidden 64
    and 32; vocabulary rows 608 and 600) with the ChatML demo tokenizer: {"teacher": dir, "student": dir}."""
    from transformers import AutoTokenizer

    from medgpt_ds.data.templates import encode_conversation

    out = tmp_path_factory.mktemp("opd_assets")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    questions = [json.loads(line)["conversations"][0]["value"]
                 for line in open(os.path.join(ROOT, "data", "demo", "sft", "train.jsonl"))]
    enc = [encode_conversation(tok, tok.chat_template, [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": PHRASE}], 256)
           for q in questions]
    width = max(len(e["input_ids"]) for e in enc)
    ids = torch.tensor([e["input_ids"] + [tok.pad_token_id] * (width - len(e["input_ids"])) for e in enc])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in enc])
    mask = (torch.arange(width)[None] < torch.tensor([len(e["input_ids"]) for e in enc])[:, None]).long()
    # wider than the student (hidden 64; bitsandbytes' CPU 4-bit kernels also refuse hidden 32's 16-row k_proj)
    # 8 padding rows past the shared tokenizer, as Qwen2.5-7B's 152064 against 1.5B's 151936: compared over the
    # student's 600
    teacher = tiny_llama(len(tok) + 8, seed=7, hidden_size=64, intermediate_size=128, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id).train()
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for step in range(40):  # ~16 samples a step: the phrase whatever the question (loss ~0.01)
        rows = slice(step * 16 % 64, step * 16 % 64 + 16)
        loss = teacher(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    paths = {"teacher": str(out / "teacher"), "student": str(out / "student")}
    teacher.save_pretrained(paths["teacher"])
    tok.save_pretrained(paths["teacher"])
    student = tiny_llama(len(tok), seed=3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    student.save_pretrained(paths["student"])
    tok.save_pretrained(paths["student"])
    assert _greedy(paths["teacher"], HELD_OUT) == [PHRASE + "<|im_end|>"] * 3  # a teacher worth distilling
    assert PHRASE not in _greedy(paths["student"], HELD_OUT[:1])[0]
    return paths


def _args(assets, out, *extra) -> list[str]:
    return ["--stage", "opd", "--model_name_or_path", assets["student"], "--teacher_model_name_or_path",
            assets["teacher"], "--template_name", "chatml", "--train_file_dir", "data/demo/sft",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none", "--output_dir", str(out),
            *extra]


def _by_step(out) -> dict[int, dict]:
    """The last logged record of each step (a resumed run appends to the same jsonl), timings left out."""
    return {r["step"]: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not k.startswith("time")}
            for r in metrics(out)}


@pytest.mark.smoke
def test_opd_distills_the_teachers_phrase(tmp_path, assets):
    # on-policy only, forward KL (beta 0): measured 5.9 -> 0.2 divergence, top-1 agreement 0.0 -> 0.95 in 50 steps
    out = tmp_path / "learn"
    p = train(_args(assets, out, "--opd_lambda", "1.0", "--opd_beta", "0", "--per_device_train_batch_size", "8",
                    "--learning_rate", "1e-2", "--max_new_tokens", "14", "--max_steps", "50", "--save_steps", "0",
                    "--chunked_loss", "False"))  # the teacher's full logits here; its chunked head in the tests below
    assert "loss computed in chunks" not in p.stdout
    rec = metrics(out)
    assert [r["step"] for r in rec] == list(range(1, 51))
    assert all(r["on_policy_fraction"] == 1.0 and "off_policy/jsd" not in r for r in rec)
    first = sum(r["loss"] for r in rec[:5]) / 5
    last = sum(r["loss"] for r in rec[-5:]) / 5
    assert last < 0.25 * first, (first, last)
    assert rec[-1]["top1_agreement"] > 0.9 > rec[0]["top1_agreement"]
    shares = [rec[-1][f"time/{k}_share"] for k in ("generation", "scoring", "training")]
    assert all(s > 0 for s in shares) and sum(shares) == pytest.approx(1.0)
    # the exported student says the teacher's phrase (greedy) to questions it never saw
    assert _greedy(str(out), HELD_OUT) == [PHRASE + "<|im_end|>"] * 3
    gen_cfg = json.load(open(out / "generation_config.json"))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids("<|im_end|>") in gen_cfg["eos_token_id"]


@pytest.mark.distributed
def test_opd_two_ranks_zero3_teacher_partitioned_and_exact_resume(tmp_path, assets):
    ds = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    args = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2",
            "--max_new_tokens", "10", "--opd_lambda", "0.5", "--max_steps", "4", "--save_steps", "2",
            "--deepspeed", ds]
    full, part = tmp_path / "full", tmp_path / "part"
    p = train(_args(assets, full, *args), nproc=2)
    # the teacher is a ZeRO-3 frozen engine: rank 0 holds half of it
    line = next(ln for ln in p.stdout.splitlines() if "teacher" in ln and "ZeRO-3 partitioned" in ln)
    held, total = (int(x.replace(",", "")) for x in line.split("holds ")[1].split(" parameters")[0].split(" of its "))
    assert 0 < held < total, line
    assert "the teacher has 608 vocabulary rows, the student 600" in p.stdout
    assert "opd teacher: loss computed in chunks of 1024 tokens" in p.stdout  # from its gathered head
    assert "opd student: loss computed in chunks of 1024 tokens" in p.stdout  # its ZeRO-3 head, trained
    m_full = _by_step(full)
    assert sorted(m_full) == [1, 2, 3, 4]
    fractions = {r["on_policy_fraction"] for r in m_full.values()}
    assert fractions & {0.0, 0.5} and fractions & {0.5, 1.0}, fractions  # dataset answers and the student's own
    assert any("on_policy/jsd" in r for s, r in m_full.items() if s > 2)  # the resumed part rolls out too
    assert os.path.isfile(full / "model.safetensors")

    crash_then_resume(_args(assets, part, *args), nproc=2, fail_rank=1, fail_step=3, resumes_from="checkpoint-2")
    m_part = _by_step(part)
    for step in (3, 4):  # the on-policy draw, the rollout RNG, the sample order and the weights restored
        assert m_part[step] == pytest.approx(m_full[step], rel=1e-6, abs=1e-9), step


# MedicalGPT's scripts/run_opd.sh, flag for flag; only the paths (<...>) and the sizes marked below differ
RUN_OPD_SH = """--model_name_or_path <student> --teacher_model_name_or_path <teacher> --train_file_dir <data>
--validation_file_dir <data> --per_device_train_batch_size 2 --per_device_eval_batch_size 1 --do_train --do_eval
--use_peft True --teacher_load_in_4bit True --max_train_samples 12 --max_eval_samples 4 --max_prompt_length 96
--max_new_tokens 8 --num_train_epochs 1 --learning_rate 5e-5 --warmup_steps 5 --weight_decay 0.05
--logging_strategy steps --logging_steps 10 --eval_steps 50 --eval_strategy steps --save_steps 500
--save_strategy steps --save_total_limit 3 --gradient_accumulation_steps 8 --preprocessing_num_workers 4
--output_dir <out> --ddp_timeout 30000 --logging_first_step True --target_modules all --lora_rank 8
--lora_alpha 16 --lora_dropout 0.05 --torch_dtype bfloat16 --bf16 --report_to tensorboard
--ddp_find_unused_parameters False --gradient_checkpointing True --opd_lambda 0.5 --opd_beta 0.5 --temperature 0.9
--tool_format default --cache_dir <cache>"""  # run_opd.sh: max_train_samples 1000, max_eval_samples 10,
# max_prompt_length 1024, max_new_tokens 512


def _run_opd_sh(assets, data, out, cache) -> list[str]:
    values = {"<student>": assets["student"], "<teacher>": assets["teacher"], "<data>": data, "<out>": str(out),
              "<cache>": str(cache)}
    return ["--stage", "opd", "--template_name", "chatml"] + [values.get(w, w) for w in RUN_OPD_SH.split()]


@pytest.mark.smoke
def test_opd_medicalgpt_run_opd_sh_flags_lora_4bit_teacher_tool_calls(tmp_path, assets):
    data = os.path.join(SHARED_DATA, "toolcall", "glaive_toolcall_zh_demo.jsonl")
    if not os.path.isfile(data):
        pytest.skip(f"MedicalGPT tool-call sample not found at {data}")
    out = tmp_path / "run_opd"
    p = train(_run_opd_sh(assets, data, out, tmp_path / "cache"))
    assert "MedicalGPT's 'default' tool format" in p.stdout  # tool schemas, calls and results rendered
    assert "(4-bit)" in p.stdout and "LoRA:" in p.stdout and "opd teacher: loss computed in chunks" in p.stdout
    assert "opd student: loss computed in chunks" in p.stdout  # its head frozen (LoRA)
    assert "warning: --logging_strategy is accepted but ignored" in p.stderr
    assert "Traceback" not in p.stderr
    rec = metrics(out)
    assert rec and all(0.0 < r["loss"] < 0.7 for r in rec)  # the generalized JSD at beta 0.5 is below ln 2
    ev = metrics(out, "eval")
    assert len(ev) == 1 and ev[0]["units"] > 0 and 0.0 < ev[0]["loss"] < 0.7  # --do_eval: once, at the end
    assert os.path.isfile(out / "adapter_model.safetensors") and not os.path.exists(out / "model.safetensors")
    cfg = json.load(open(out / "run_config.json"))
    assert cfg["stage_args"]["teacher_load_in_4bit"] is True and cfg["lora"]["use_peft"] is True


@pytest.mark.unit
def test_opd_refuses_another_vocabulary_and_a_4bit_teacher_under_zero3(tmp_path, tiny_base_dir, tiny_tokenizer,
                                                                       tiny_llama, capsys):
    # cli.main in-process: both are refused before any rank starts (no process group, no model loaded)
    from transformers import LlamaConfig

    from medgpt_ds.cli import main
    from medgpt_ds.errors import UserError
    from medgpt_ds.stages.opd import shared_vocab_size

    def error(argv) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        return lines[0]

    assets = {"student": tiny_base_dir, "teacher": tiny_base_dir}
    other = tmp_path / "other"
    tiny_llama(len(tiny_tokenizer), seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    err = error(_args({**assets, "teacher": str(other)}, tmp_path / "vocab", "--max_steps", "1"))
    assert f"--teacher_model_name_or_path {other}" in err and "share one tokenizer" in err
    ds = ds_config_copy(tmp_path, "zero3")
    err = error(_args(assets, tmp_path / "q", "--teacher_load_in_4bit", "True", "--deepspeed", ds, "--max_steps", "1"))
    assert err.startswith("error: --teacher_load_in_4bit/8bit: quantized weights cannot be ZeRO-3 partitioned")
    assert not any((tmp_path / d).exists() for d in ("vocab", "q"))  # nothing written

    # padded vocabularies: compared over the student's rows; a student with rows the teacher lacks is refused
    assert shared_vocab_size(LlamaConfig(vocab_size=600), LlamaConfig(vocab_size=640), 600, "t") == 600
    with pytest.raises(UserError, match="the teacher's vocabulary has 512 rows, the student's 600"):
        shared_vocab_size(LlamaConfig(vocab_size=512), LlamaConfig(vocab_size=512), 600, "t")


@pytest.mark.unit
def test_opd_samples_are_every_assistant_turn_with_tool_calls(tmp_path, demo_tokenizer_dir):
    from transformers import AutoTokenizer

    from medgpt_ds.data.formats import load_records
    from medgpt_ds.data.templates import turn_terminators
    from medgpt_ds.stages.opd import dataset_answers, encode_turns, split_samples

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    path = str(tmp_path / "conv.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"conversations": [
            {"from": "human", "value": "What is the dose?"},
            {"from": "function_call", "value": json.dumps({"name": "lookup", "arguments": {"drug": "aspirin"}})},
            {"from": "observation", "value": "100 mg"},
            {"from": "gpt", "value": "Take 100 mg."},
            {"from": "human", "value": "Thanks"},
            {"from": "gpt", "value": "You are welcome."}],
            "tools": json.dumps([{"name": "lookup", "description": "Find a dose",
                                  "parameters": {"type": "object", "properties": {}}}])}) + "\n")
    (rec,) = load_records([path], "sft")
    stop_ids, _ = turn_terminators(tok, tok.chat_template)
    enc = encode_turns(tok, rec, "default", stop_ids)
    samples = split_samples([enc], 4096, 4096, "truncate", "test")
    assert len(samples) == 3  # the call, the answer after the tool result, the last answer
    answers = [tok.decode(s["answer_ids"]) for s in samples]
    assert answers[0].startswith("Action: lookup") and answers[0].endswith("<|im_end|>")
    assert answers[1:] == ["Take 100 mg.<|im_end|>", "You are welcome.<|im_end|>"]
    for s in samples:  # each prompt is the conversation so far, ending with the generation prompt
        assert tok.decode(s["prompt_ids"]).endswith("<|im_start|>assistant\n") and not s["answer_cut"]
    assert "Observation: 100 mg" in tok.decode(samples[1]["prompt_ids"])
    assert samples[2]["prompt_ids"][:len(samples[1]["prompt_ids"])] == samples[1]["prompt_ids"]
    assert "Find a dose" in tok.decode(samples[0]["prompt_ids"])  # the tool schema in the system prompt

    cut = split_samples([enc], 12, 3, "truncate", "test")
    assert [len(s["prompt_ids"]) for s in cut] == [12] * 3 and all(len(s["answer_ids"]) == 3 for s in cut)
    assert all(s["answer_cut"] for s in cut) and cut[2]["prompt_ids"] == samples[2]["prompt_ids"][-12:]
    assert split_samples([enc], 4096, 5, "drop", "test") == [s for s in samples if len(s["answer_ids"]) <= 5]

    gen = dataset_answers(samples[1:] + cut[:1], tok.pad_token_id, "cpu")
    assert gen.response_mask.sum(1).tolist() == [len(s["answer_ids"]) for s in samples[1:] + cut[:1]]
    assert gen.has_eos.tolist() == [True, True, False]
    assert gen.responses()[0] == samples[1]["answer_ids"]
    assert gen.sequences[0, :gen.prompt_length][gen.prompt_mask[0]].tolist() == samples[1]["prompt_ids"]


@pytest.mark.unit
def test_opd_flags(tiny_base_dir, capsys):
    from medgpt_ds.config import parse_args
    from medgpt_ds.errors import UserError
    from medgpt_ds.stages.opd import Arguments

    base = ["--stage", "opd", "--model_name_or_path", tiny_base_dir, "--output_dir", "x"]
    a = parse_args(base + ["--teacher_model_name_or_path", "t", "--opd_lambda", "0.25", "--max_prompt_length", "64",
                           "--teacher_load_in_4bit", "True", "--teacher_device_map", "auto"], {"opd": Arguments}).stage_args
    err = capsys.readouterr().err
    assert "warning: --teacher_device_map is accepted but ignored" in err
    # the defaults run_opd.sh relies on without setting them, where ours differ: one notice line
    assert "differ from MedicalGPT's opd_training.py (TRL GKDConfig): " in err and "--use_peft False (MedicalGPT: True)" in err
    assert (a.opd_lambda, a.opd_beta, a.max_prompt_length, a.teacher_load_in_4bit, a.temperature) == (
        0.25, 0.5, 64, True, 0.9)
    assert a.rollout_backend == "hybrid"  # MedicalGPT/TRL's --use_vllm True: the student samples through vLLM
    assert parse_args(base + ["--use_vllm", "True"], {"opd": Arguments}).stage_args.rollout_backend == "vllm"
    for bad, match in ((["--opd_lambda", "1.5"], "opd_lambda"), (["--opd_beta", "-0.1"], "opd_beta"),
                       (["--reward_funcs", "format"], "no meaning in --stage opd"),
                       (["--teacher_load_in_4bit", "True", "--teacher_load_in_8bit", "True"], "exclusive")):
        with pytest.raises(UserError, match=match):
            parse_args(base + bad, {"opd": Arguments})
