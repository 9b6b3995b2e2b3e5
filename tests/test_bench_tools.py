"""The benchmarks' own logic: interleaving and ratios, the report generated from result files, the
padded-vocabulary tokenizer, the LLaMA-Factory recipe's packing and mask, the rollout token check."""
from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.unit

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)


def test_interleave_runs_sides_in_rounds_and_ratios_pair_adjacent_runs():
    from common import RunFailed, interleave

    order = []
    values = {"A": iter([10.0, 30.0, 8.0]), "B": iter([5.0, 10.0, 8.0]), "C": iter([20.0, 0.0, 4.0])}

    def side(name):
        def run():
            order.append(name)
            v = next(values[name])
            if v == 0.0:
                raise RunFailed("boom")
            return {"rate": v}
        return run

    out = interleave({n: side(n) for n in "ABC"}, rounds=3, metric="rate")
    assert order == list("ABCABCABC")
    ab = out["ratios"]["A / B"]
    assert ab["ratios"] == [2.0, 3.0, 1.0] and ab["median"] == 2.0 and (ab["min"], ab["max"]) == (1.0, 3.0)
    ac = out["ratios"]["A / C"]  # the failed round is left out, and recorded
    assert ac["ratios"] == [0.5, 2.0] and ac["n"] == 2
    assert out["runs"]["C"][1] == {"error": "boom"}


def _peer_result(name, a, b, complete=True):
    return {"name": name, "kind": "peer_comparison", "title": f"{name} title", "command": "python bench/x.py",
            "date": "2026-01-01 00:00 UTC", "machine": {"cpu": "cpu", "cores": 2, "load_average_1m": 1.0},
            "versions": {"torch": "2.13.0"}, "settings": {"zero": "zero2", "max_length": 512},
            "sides": {"ours": "launch/train.py", "peer": "TRL"}, "complete": complete,
            "comparisons": [{"name": "packed-gc_off", "metric": "real tokens/s (median per step)",
                             "settings": {"gradient_checkpointing": "off on both sides"},
                             "runs": {"ours": [{"tokens_per_s": x} for x in a], "peer": [{"tokens_per_s": x} for x in b]},
                             "ratios": {"ours / peer": __import__("common").ratio_stats(a, b)}}]}


def test_report_renders_every_result_file_with_verdicts(tmp_path):
    import report

    res = tmp_path / "results"
    res.mkdir()
    (res / "sft_peers.json").write_text(json.dumps(_peer_result("sft_peers", [120.0, 90.0], [100.0, 100.0])))
    (res / "dpo_peers.json").write_text(json.dumps(_peer_result("dpo_peers", [50.0, 60.0], [100.0, 100.0], False)))
    (res / "grpo_peers.json").write_text(json.dumps(_peer_result("grpo_peers", [150.0, 130.0], [100.0, 100.0])))
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(res), "--out", str(out)]) == 0
    text = out.read_text()
    assert "do not edit by hand" in text and "No GPU numbers yet" in text
    sft, dpo, grpo = (text[text.index(f"## {n} title"):] for n in ("sft_peers", "dpo_peers", "grpo_peers"))
    assert "1.05x [0.90-1.20] (2)" in sft and "tie (spread straddles 1.00)" in sft.split("##")[1]
    assert "0.55x [0.50-0.60] (2)" in dpo and "**peer ahead**" in dpo.split("##")[1]
    assert "Incomplete run" in dpo.split("##")[1]
    assert "1.40x [1.30-1.50] (2)" in grpo and "ours ahead" in grpo
    assert text.index("## sft_peers") < text.index("## dpo_peers") < text.index("## grpo_peers")
    assert report.main(["--results", str(res), "--out", str(out), "--check"]) == 0
    out.write_text(text + "edited by hand\n")
    assert report.main(["--results", str(res), "--out", str(out), "--check"]) == 1


def test_committed_results_md_is_generated_from_the_committed_results():
    import report

    assert report.main(["--check"]) == 0, "bench/RESULTS.md was edited by hand or not regenerated"


def test_padded_vocab_tokenizer_has_the_real_vocab_size(tmp_path):
    from transformers import AutoTokenizer

    from common import padded_vocab_tokenizer

    texts = ["fever and cough for three days", "headache after the dose", "发热咳嗽头痛"] * 50
    padded_vocab_tokenizer(texts, str(tmp_path), 5000, trained_vocab=300)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 5000
    ids = tok("fever and headache")["input_ids"]
    assert ids and max(ids) < 300  # real text never reaches the filler entries
    assert tok.decode(ids) == "fever and headache"
    assert tok.pad_token_id is not None and tok.pad_token_id < 300


def test_shapes_are_the_real_checkpoints():
    from common import shape_params

    # parameter counts of the published checkpoints (embeddings included, tied where they are)
    assert shape_params("qwen2.5-0.5b") == 494_032_768
    assert shape_params("qwen2.5-1.5b") == 1_543_714_304
    assert shape_params("qwen2.5-7b") == 7_615_616_512


def test_llama_factory_knapsack_and_block_diagonal_mask():
    import torch

    from peer_sft import block_diagonal_mask, greedy_knapsack

    # largest fitting length first, by binary search over sorted lengths (llamafactory 0.9.5)
    assert greedy_knapsack([5, 3, 8, 2, 6], 10) == [[8, 2], [6, 3], [5]]
    mask = block_diagonal_mask(torch.tensor([[1, 1, 2, 2, 2, 0]]), torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]


def test_rollout_token_check_finds_the_first_difference(tmp_path):
    from bench_rollout import first_difference, rollout_tokens

    def write(run, rank, calls):
        d = tmp_path / f"{run}-tokens"
        d.mkdir(exist_ok=True)
        (d / f"rank{rank}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))

    same = [{"prompts": [[1, 2]], "responses": [[5, 6, 7]]}, {"prompts": [[3]], "responses": [[8]]}]
    write("a", 0, same)
    write("b", 0, same)
    write("c", 0, same[:1] + [{"prompts": [[3]], "responses": [[9]]}])
    a, b, c = (rollout_tokens(str(tmp_path / x)) for x in "abc")
    assert first_difference(a, b) is None
    assert first_difference(a, c) == "rank0 rollout 2 row 0: [8]... vs [9]..."
    assert first_difference(a, c, steps=1) is None
