"""Evaluation numbers on hand-checkable tiny cases.

- Multiple choice: the bigram model of test_inference.py puts all its weight on "A" after any
  prompt, so its accuracy is exactly the share of items whose answer is A.
- Perplexity: equals exp of the token-weighted mean of HF's own loss (computed here separately,
  window by window), and on the bigram model the closed form from its logit table.
- Reward model: a hand-built Llama reward model whose reward has the sign of (#"+" - #"-") in the
  sequence, so a pair is won exactly when the chosen reply is "+" and the rejected one "-".
- The CLI writes report.json / report.md / report.png; under 2 ranks (torchrun) every number and
  the batch chat output equal the 1-rank run (the chat with the echo model: each row its own answer).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ANSWER, BIGRAM, echo_answer, save_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]

MC = [  # 9 single-answer items, 4 with answer A; plus one multi-answer item
    {"question": "Which vitamin deficiency causes scurvy?", "options": {"A": "Vitamin C", "B": "Vitamin D"}, "answer": "A"},
    {"question": "Normal adult resting heart rate?", "options": ["60-100", "20-40", "150-200"], "answer": "A."},
    {"question": "Insulin is made by the", "options": {"A": "liver", "B": "pancreas", "C": "kidney"}, "answer": "B"},
    {"question": "Aspirin class?", "options": ["A. NSAID", "B. opioid", "C. antibiotic", "D. statin"], "answer": "NSAID"},
    {"question": "Which organ filters blood?", "options": {"A": "lung", "B": "kidney"}, "answer": "B"},
    {"question": "Fever threshold?", "options": {"A": "38 C", "B": "35 C", "C": "33 C", "D": "30 C"}, "answer": "A"},
    {"question": "Most common anemia cause?", "options": ["folate", "iron deficiency", "B12"], "answer": "B"},
    {"question": "Which is an antibiotic?", "options": {"A": "ibuprofen", "B": "paracetamol", "C": "amoxicillin"}, "answer": "C"},
    {"question": "Hypertension means high", "options": {"A": "glucose", "B": "pressure", "C": "heart rate", "D": "fever"}, "answer": "D、fever"},
    {"question": "Which are vitamins?", "options": {"A": "C", "B": "iron", "C": "D"}, "answer": "AC"},
]
MC_SHARE_A = 4 / 9

PAIRS = [  # MedicalGPT preference format; won when chosen is "+" and rejected "-"
    {"conversations": [{"from": "human", "value": "Is rest good after surgery?"}], "chosen": "+", "rejected": "-"},
    {"conversations": [{"from": "human", "value": "Should I take the full course of antibiotics?"}], "chosen": "+", "rejected": "-"},
    {"conversations": [{"from": "human", "value": "Can I double my dose?"}], "chosen": "-", "rejected": "+"},
    {"conversations": [{"from": "human", "value": "Is smoking fine?"}, {"from": "gpt", "value": "No."},
                       {"from": "human", "value": "And exercise?"}], "chosen": "+", "rejected": "-"},
    {"conversations": [{"from": "human", "value": "Do I need a doctor for chest pain?"}], "chosen": "-", "rejected": "+"},
]
PAIR_ACCURACY = 3 / 5
TEXTS = ["The patient has a fever and a cough.", "Blood pressure should be checked every day with care.",
         "What is the usual dose of this tablet for a child with a chronic infection of the lung?",
         "发热咳嗽头痛", "Doctor"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat(model_dir):
    from medgpt_ds.inference import ChatModel

    return ChatModel.load(str(model_dir), device="cpu")


@pytest.fixture(scope="session")
def random_lm_dir(tmp_path_factory, tiny_tokenizer, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("random_lm")
    tok = save_chat_tokenizer(tiny_tokenizer, out)
    tiny_llama(len(tok), seed=3).save_pretrained(out)
    return out


def sign_reward_model(tok):
    """Llama reward model: layer 1 attends uniformly (q = k = 0) and copies hidden dim 1 (+1 for "+",
    -1 for "-", 0 otherwise) into the residual stream, so the last position holds the mean of that
    feature over the sequence; the score head reads dim 1. Everything else adds nothing."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for w in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                      layer.self_attn.o_proj, layer.mlp.down_proj):
                w.weight.zero_()
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, 1] = 1.0  # kv head 0, channel 0 <- hidden dim 1
        attn.o_proj.weight[1, 0] = 1.0  # hidden dim 1 <- query head 0 (uses kv head 0), channel 0
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[tok.convert_tokens_to_ids("+"), 1] = 1.0
        emb[tok.convert_tokens_to_ids("-"), 1] = -1.0
        model.score.weight.zero_()
        model.score.weight[0, 1] = 1.0
    return model


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("rm")
    tok = save_chat_tokenizer(tiny_tokenizer, out)
    sign_reward_model(tok).save_pretrained(out)
    return out


@pytest.mark.unit
def test_multiple_choice_always_a_scores_the_share_of_a(chat):
    from medgpt_ds.evaluation import multiple_choice

    res = multiple_choice(chat, MC, batch_size=4)
    assert res["accuracy"] == MC_SHARE_A
    assert (res["correct"], res["total"], res["skipped_multi_answer"]) == (4, 9, 1)
    assert res["prediction_counts"] == {"A": 9}
    assert res["answer_counts"] == {"A": 4, "B": 3, "C": 1, "D": 1}


@pytest.mark.unit
def test_parse_mc_formats_and_errors():
    from medgpt_ds.evaluation import mc_messages, parse_mc

    assert parse_mc(MC[3], "f:4") == ("Aspirin class?", list("ABCD"), ["NSAID", "opioid", "antibiotic", "statin"], "A")
    assert parse_mc(MC[8], "f:9")[3] == "D"
    assert parse_mc({"question": "q", "options": {"b": "x", "a": "y"}, "answer": "b"}, "f")[1:] == (["A", "B"], ["y", "x"], "B")
    assert mc_messages("Q?", ["A", "B"], ["x", "y"], "Pick one.") == [{"role": "user", "content": "Q?\nA. x\nB. y\nPick one."}]
    with pytest.raises(ValueError, match="f:3: field 'answer'"):
        parse_mc({"question": "q", "options": ["x", "y"], "answer": "E"}, "f:3")
    with pytest.raises(ValueError, match="field 'options'"):
        parse_mc({"question": "q", "options": "A. x B. y", "answer": "A"}, "f:1")


def _hf_loss_perplexity(model, tok, texts: list[str], max_length: int) -> tuple[float, int]:
    """Independent: HF's mean loss per window, re-weighted by the window's predicted tokens."""
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        for i in range(0, len(ids), max_length):
            w = torch.tensor([ids[i:i + max_length]])
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                nll += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            n += w.shape[1] - 1
    return math.exp(nll / n), n


@pytest.mark.unit
def test_perplexity_equals_exp_of_hf_loss(random_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medgpt_ds.evaluation import perplexity

    tok = AutoTokenizer.from_pretrained(random_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(random_lm_dir).eval()
    for max_length in (1024, 8):  # whole texts; and windows of 8 tokens
        expected, n = _hf_loss_perplexity(model, tok, TEXTS, max_length)
        res = perplexity(model, tok, TEXTS, max_length=max_length, batch_size=3)
        assert res["tokens"] == n and res["documents"] == len(TEXTS)
        assert res["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert 1.0 < res["perplexity"] < len(tok) * 2  # a random model is near uniform


@pytest.mark.unit
def test_perplexity_closed_form_on_the_bigram(chat):
    from medgpt_ds.evaluation import perplexity

    tok = chat.tokenizer
    text = "The patient A B was fine"
    ids = tok(text)["input_ids"]
    V, c = len(tok), 4.0 / math.sqrt(1 / 32 + chat.model.config.rms_norm_eps)  # the table's logit margin
    favourite = {None: tok.convert_tokens_to_ids(BIGRAM[None])}
    favourite.update({tok.convert_tokens_to_ids(k): tok.convert_tokens_to_ids(v) for k, v in BIGRAM.items() if k})
    log_z = math.log(math.exp(c) + V - 1)
    nll = sum(log_z - (c if nxt == favourite.get(cur, favourite[None]) else 0.0) for cur, nxt in zip(ids, ids[1:]))
    res = perplexity(chat.model, tok, [text])
    assert res["tokens"] == len(ids) - 1
    assert res["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)


@pytest.mark.unit
def test_reward_pairwise_on_a_hand_built_reward_model(rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from medgpt_ds.data.formats import load_records
    from medgpt_ds.evaluation import _rewards, reward_pairwise

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1).eval()
    records = load_records([str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))], "preference", log=lambda *_: None)
    res = reward_pairwise(model, tok, tok.chat_template, records, batch_size=2)
    assert (res["accuracy"], res["correct"], res["total"], res["ties"]) == (PAIR_ACCURACY, 3, 5, 0)
    assert res["mean_margin"] > 0  # 3 wins vs 2 losses of the same size per length
    # batched + padded rewards equal HF's own pooled score on unpadded single rows
    rows = [tok(tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": r}],
                                        tokenize=False), add_special_tokens=False)["input_ids"] for r in ("+", "-", "ok")]
    ours = _rewards(model, rows, tok.pad_token_id)
    with torch.no_grad():
        theirs = [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows]
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert ours[0] > 0 > ours[1] and ours[2] == pytest.approx(0.0, abs=1e-6)
    # a row ending in the pad id (pad == eos templates) is read where transformers reads it, before the pads
    model.config.pad_token_id = rows[0][-1]
    with torch.no_grad():
        theirs = [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows]
    assert _rewards(model, rows, tok.pad_token_id) == pytest.approx(theirs, abs=1e-6)


def _files(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "text.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return {"text": d / "text.txt", "mc": write_jsonl(d / "mc.jsonl", MC),
            "pairs": write_jsonl(d / "pairs.jsonl", PAIRS),
            "prompts": write_jsonl(d / "prompts.jsonl", [{"question": f"Question {i}?", "answer": "A"} for i in range(5)]),
            "chat": write_jsonl(d / "chat.jsonl", [{"question": CHAT_QUESTIONS[i], "id": i} for i in range(5)])}


# for the echo model: different answers per row ("7 B", "A B", "8 B", "9 B", "A B"), so a row answered
# with another's (a wrong shard order on 2 ranks) shows
CHAT_QUESTIONS = ["bed 7", "q", "bed 8", "bed 9", "q2"]


def _eval_argv(model: Path, rm: Path, f: dict[str, Path], out: Path) -> list[str]:
    return ["--model_name_or_path", str(model), "--reward_model_name_or_path", str(rm), "--output_dir", str(out),
            "--ppl_files", str(f["text"]), "--mc_files", str(f["mc"]), "--preference_files", str(f["pairs"]),
            "--prompt_files", str(f["prompts"]), "--max_new_tokens", "8", "--batch_size", "2", "--max_length", "8"]


@pytest.mark.smoke
def test_evaluate_cli_writes_report(model_dir, rm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import evaluate

    f = _files(tmp_path)
    report = evaluate.main(_eval_argv(model_dir, rm_dir, f, tmp_path / "eval"))
    assert report["multiple_choice"][0]["accuracy"] == MC_SHARE_A
    assert report["reward_pairwise"][0]["accuracy"] == PAIR_ACCURACY
    assert [s["response"] for s in report["samples"]] == [ANSWER] * 5
    assert report["perplexity"][0]["documents"] == len(TEXTS)
    on_disk = json.loads((tmp_path / "eval/report.json").read_text(encoding="utf-8"))
    assert on_disk["multiple_choice"][0]["accuracy"] == MC_SHARE_A
    md = (tmp_path / "eval/report.md").read_text(encoding="utf-8")
    assert "| multiple_choice | mc.jsonl | accuracy | 0.4444 | 9 |" in md
    assert "| reward_pairwise | pairs.jsonl | accuracy | 0.6000 | 5 |" in md
    assert "## Generation samples" in md and "| Question 0? | A B | A |" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "eval/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1] + "/tools")
import chat, evaluate
from medgpt_ds import dist
chat.main(json.loads(sys.argv[2]))
evaluate.main(json.loads(sys.argv[3]))
print(f"rank {dist.rank()} of {dist.world_size()} done", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_match_one_rank(model_dir, digit_model_dir, rm_dir, tmp_path, monkeypatch):
    """One torchrun launch, 2 ranks: batch chat and every evaluation, compared with 1 rank in-process."""
    f = _files(tmp_path)
    chat_argv = ["--model_name_or_path", str(digit_model_dir), "--input_file", str(f["chat"]), "--batch_size", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache/torch_extensions")}
    (tmp_path / "driver.py").write_text(DRIVER, encoding="utf-8")

    out = tmp_path / "two"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(tmp_path / "driver.py"), str(ROOT), json.dumps([*chat_argv, "--output_file", str(out / "answers.jsonl")]),
           json.dumps(_eval_argv(model_dir, rm_dir, f, out / "eval"))]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rank 0 of 2 done" in res.stdout and "rank 1 of 2 done" in res.stdout
    answers2 = [json.loads(x) for x in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    rep2 = json.loads((out / "eval/report.json").read_text(encoding="utf-8"))

    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # the 1-rank reference, in this process
    import chat
    import evaluate

    chat.main([*chat_argv, "--output_file", str(tmp_path / "answers1.jsonl")])
    answers1 = [json.loads(x) for x in (tmp_path / "answers1.jsonl").read_text(encoding="utf-8").splitlines()]
    rep1 = evaluate.main(_eval_argv(model_dir, rm_dir, f, tmp_path / "eval1"))
    assert answers2 == answers1 == [{"question": t, "id": i, "response": echo_answer(t)} for i, t in enumerate(CHAT_QUESTIONS)]
    assert len({a["response"] for a in answers1}) == 4
    assert rep2["world_size"] == 2 and rep1["world_size"] == 1
    assert rep2["multiple_choice"][0]["predictions"] == rep1["multiple_choice"][0]["predictions"]
    assert rep2["multiple_choice"][0]["accuracy"] == MC_SHARE_A
    assert rep2["reward_pairwise"][0]["accuracy"] == rep1["reward_pairwise"][0]["accuracy"] == PAIR_ACCURACY
    assert rep2["perplexity"][0]["tokens"] == rep1["perplexity"][0]["tokens"]
    assert rep2["perplexity"][0]["perplexity"] == pytest.approx(rep1["perplexity"][0]["perplexity"], rel=1e-6)
    assert rep2["samples"] == rep1["samples"]


MEDICALGPT = ROOT.parent / "shared/data/medicalgpt"


@pytest.mark.smoke
def test_evaluate_on_medicalgpt_sample_files(model_dir, rm_dir, tmp_path, monkeypatch):
    """MedicalGPT's own file formats go through every evaluation (Chinese text, sharegpt pairs)."""
    if not MEDICALGPT.is_dir():
        pytest.skip(f"{MEDICALGPT} absent (sample data lives beside the checkout in CI)")
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import evaluate

    argv = ["--model_name_or_path", str(model_dir), "--reward_model_name_or_path", str(rm_dir),
            "--output_dir", str(tmp_path / "eval"), "--max_samples", "12", "--num_samples", "3", "--max_new_tokens", "8",
            "--ppl_files", str(MEDICALGPT / "pretrain/fever.txt"), "--preference_files", str(MEDICALGPT / "reward"),
            "--prompt_files", str(MEDICALGPT / "grpo/sample.jsonl"), "--max_length", "128"]
    report = evaluate.main(argv)
    assert report["perplexity"][0]["documents"] == 12 and report["perplexity"][0]["tokens"] > 12
    rm = report["reward_pairwise"][0]
    assert rm["total"] == 12 and 0.0 <= rm["accuracy"] <= 1.0
    assert [s["response"] for s in report["samples"]] == [ANSWER] * 3
    assert report["samples"][0]["prompt"] == "肛门病变可能是什么疾病的症状?"


@pytest.mark.unit
def test_cli_flags_accept_the_deepspeed_launcher_local_rank(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import chat
    import evaluate

    args = evaluate.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--mc_files", "x.jsonl", "--local_rank=1"])
    assert args.local_rank == 1 and args.trust_remote_code is False
    assert chat.parse_args(["--model_name_or_path", "m", "--input_file", "q.jsonl", "--local_rank=0"]).local_rank == 0
    with pytest.raises(SystemExit):  # a reward file without a reward model is a usage error
        evaluate.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--preference_files", "p.jsonl"])


@pytest.mark.unit
def test_record_folders_skip_and_name_text_files(tmp_path, capsys):
    """--preference_files/--prompt_files folders read records only: a README.txt beside them is named
    as skipped, not parsed as data."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import evaluate

    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "pairs.jsonl", PAIRS)
    (folder / "README.txt").write_text("how these pairs were made\n")
    recs = evaluate._records(str(folder), "preference", None)
    assert len(recs) == len(PAIRS)
    assert "README.txt" in capsys.readouterr().out
