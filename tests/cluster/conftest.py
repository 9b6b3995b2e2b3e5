"""Fixtures for the `cluster` tests: a real 2-node SLURM cluster (see slurm_cluster.py).

Run them alone with `pytest -m cluster tests/cluster` (as root, after `bash .ci/cluster_setup.sh`).
They skip, naming the reason, when not root or when the slurm/munge binaries are missing.
MEDGPT_KEEP_CLUSTER_DIR=1 keeps the daemons' run directory (logs, slurm.conf) for debugging.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import REPO, SlurmCluster, job_env, missing_requirements, reap_stale  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster():
    why = missing_requirements()
    if why:
        pytest.skip(why)
    reap_stale()
    cluster = SlurmCluster()
    try:
        cluster.start()
    except Exception as e:
        pytest.fail(f"could not start the test SLURM cluster: {e}\n{cluster.failure_logs}")
    yield cluster
    cluster.stop()


_WORDS = ("fever cough headache patient doctor infection virus treatment dose tablet blood pressure heart "
          "lung liver kidney pain chronic acute symptom diagnosis rest water sleep the a of and to is").split()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, slurm_cluster):
    """A saved tiny Llama + BPE tokenizer (ChatML template), sft and preference jsonl, a ZeRO-3
    config that shards even tiny parameters. Built here so the cluster tests depend on no demo file.
    Also JIT-builds DeepSpeed's CPU comm op once, before any job needs it (no-op when cached)."""
    import json
    import random
    import subprocess

    build = subprocess.run(
        [sys.executable, "-c", "from deepspeed.accelerator import get_accelerator as g; "
                               "g().create_op_builder('ShareMemCommBuilder').load()"],
        env={**os.environ, **job_env()}, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt_ds.data.templates import TEMPLATES
    from medgpt_ds.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("cluster_assets")
    rng = random.Random(0)

    def sentence(n):
        return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."

    model_dir = root / "tiny"
    tok = train_bpe_tokenizer(texts=[sentence(rng.randint(4, 14)) for _ in range(1500)], vocab_size=400,
                              output_dir=str(model_dir), chat_template=TEMPLATES["chatml"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)

    sft, pref = root / "sft", root / "pref"
    sft.mkdir()
    pref.mkdir()
    with open(sft / "train.jsonl", "w") as f:
        for _ in range(64):
            conv = [{"from": "human", "value": sentence(6)}, {"from": "gpt", "value": sentence(10)}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    with open(pref / "train.jsonl", "w") as f:
        for _ in range(64):
            f.write(json.dumps({"conversations": [{"from": "human", "value": sentence(6)}],
                                "chosen": sentence(8), "rejected": sentence(5)}) + "\n")
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(ds, indent=2))
    return {"model": str(model_dir), "sft": str(sft), "pref": str(pref), "zero3": str(root / "zero3.json")}
