"""Packed == padded: the same model trained on the same samples with the same global token-mean loss
gives the same loss curve whether samples are packed into rows (position_ids, no mask) or padded
one per row (attention mask).

Each optimizer step here is the whole data set (full-batch gradient descent), so the step's loss
does not depend on how samples are grouped into rows — only on the attention being exactly
per-sample in both layouts. Tolerance 1e-4: sdpa with a padding mask and sdpa on packed rows sum in
different orders (~1e-7 relative per step in fp32); any cross-sample attention in the packed rows
moves the loss by >1e-2.
"""
import os

import pytest

from tests.launch_utils import ROOT, losses, train

DEMO = os.path.join(ROOT, "data", "demo")


@pytest.mark.invariant
def test_packed_equals_padded(tmp_path, tiny_base_dir):
    from transformers import AutoTokenizer

    from medgpt_ds.data.formats import load_records
    from medgpt_ds.data.packing import pack_sequences
    from medgpt_ds.data.templates import TEMPLATES, encode_conversation

    n, max_len = 24, 128
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    recs = load_records([f"{DEMO}/sft/train.jsonl"], "sft", max_samples=n, log=lambda *a: None)
    enc = [encode_conversation(tok, TEMPLATES["chatml"], r["messages"], max_len) for r in recs]
    assert all(e is not None for e in enc)
    rows = pack_sequences([len(e["input_ids"]) for e in enc], max_len)
    assert len(rows) < n  # packing really packs

    common = ["--stage", "sft", "--model_name_or_path", tiny_base_dir, "--template_name", "chatml",
              "--train_file_dir", f"{DEMO}/sft", "--max_train_samples", str(n), "--model_max_length", str(max_len),
              "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--max_steps", "5", "--logging_steps", "1",
              "--save_steps", "0", "--export_hf", "False", "--report_to", "none"]
    train(common + ["--packing", "True", "--per_device_train_batch_size", str(len(rows)), "--output_dir", str(tmp_path / "p")])
    train(common + ["--packing", "False", "--per_device_train_batch_size", str(n), "--output_dir", str(tmp_path / "u")])
    packed, padded = losses(str(tmp_path / "p")), losses(str(tmp_path / "u"))
    assert sorted(packed) == sorted(padded) == [1, 2, 3, 4, 5]
    assert packed[5] < packed[1] - 0.1  # it trains
    for step in packed:
        assert abs(packed[step] - padded[step]) < 1e-4, (step, packed, padded)
