"""The memory estimator's arithmetic on a small Llama config counted by hand (parameters, DeepSpeed's
model-state formulas, activations, logits, the longest-sequence search) and tools/estimate_memory.py
end to end from a config.json. Measured peaks are compared in bench/bench_memory.py (not a test)."""
import json
import os
import subprocess
import sys

import pytest

from medgpt_ds import memory
from medgpt_ds.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
# By hand: embeddings 1000*64 + untied head 64*1000 = 128000; a layer: q 64*64 + k 64*32 + v 64*32 + o 64*64
# = 12288, MLP 3 * 64*128 = 24576, two norms 128 -> 36992; final norm 64.
P = 128000 + 2 * 36992 + 64  # 202048
LARGEST = 64000  # the embedding (and the head): DeepSpeed's "largest layer"
# LoRA r=8 on every linear but the head: r*(in+out) = q 1024, k 768, v 768, o 1024, gate/up/down 1536 each
LORA = 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192)  # 16384


@pytest.fixture(scope="module")
def arch():
    from transformers import AutoConfig

    kw = dict(CONFIG)
    return memory.arch_from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))


@pytest.mark.unit
def test_architecture_counted_from_the_config(arch):
    assert (arch.total_params, arch.largest_layer_params) == (P, LARGEST)
    assert (arch.q_dim, arch.kv_dim, arch.mlp_dim, arch.num_layers, arch.vocab_size) == (64, 32, 128, 2, 1000)
    from transformers import AutoConfig

    kw = dict(CONFIG)
    assert memory.arch_from_config(AutoConfig.for_model(kw.pop("model_type"), **kw), lora_rank=8).lora_params == LORA


@pytest.mark.unit
def test_model_states_are_deepspeeds_numbers(arch):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    s = memory.Setup(zero=3, num_gpus=8, nodes=2, dtype_bytes=2)
    ms = memory.model_states(arch, s)
    # DeepSpeed ZeRO-3, no offload: 4 * largest layer + 18 bytes * P / 16 GPUs
    assert ms["total"] == 4 * LARGEST + int(18 * P / 16) == estimate_zero3_model_states_mem_needs(
        P, LARGEST, 8, 2, cpu_offload=False, cpu_offload_params=False)[1]
    assert (ms["params"], ms["grads"], ms["optimizer"]) == (4 * LARGEST, 6 * P // 16, 12 * P // 16)
    assert ms["params"] + ms["grads"] + ms["optimizer"] == ms["total"]
    # ZeRO-2 over 16 GPUs: 2P + 18P/16; optimizer offload: only the 16-bit params stay, CPU holds the rest
    assert memory.model_states(arch, memory.Setup(zero=2, num_gpus=8, nodes=2))["total"] == 2 * P + int(18 * P / 16)
    off = memory.model_states(arch, memory.Setup(zero=2, num_gpus=8, nodes=2, offload_optimizer=True))
    assert off["total"] == off["params"] == 2 * P and off["grads"] == off["optimizer"] == 0
    assert off["cpu_per_node"] == estimate_zero2_model_states_mem_needs(P, 8, 2, cpu_offload=True)[0]
    # ZeRO-3 with params and optimizer on CPU: the GPU holds one gathered layer
    both = memory.model_states(arch, memory.Setup(zero=3, num_gpus=8, nodes=2, offload_optimizer=True, offload_param=True))
    assert both["total"] == 4 * LARGEST and both["cpu_per_node"] == int(P * 18 / 2 * 1.5)
    # ZeRO-1 keeps full 16-bit gradients
    assert memory.model_states(arch, memory.Setup(zero=1, num_gpus=4, nodes=1))["total"] == 2 * P + int(18 * P / 4) + 2 * P - 2 * P // 4
    with pytest.raises(UserError, match="needs --zero 3"):
        memory.model_states(arch, memory.Setup(zero=2, offload_param=True))


@pytest.mark.unit
def test_fp32_and_lora_states(arch):
    # fp32 ZeRO-0 on one rank (the CPU path): 4 params + 4 grads + 8 Adam bytes per parameter
    assert memory.model_states(arch, memory.Setup(zero=0, num_gpus=1, dtype_bytes=4))["total"] == 16 * P
    # fp32 ZeRO-3 over 2 ranks: 4 + 4 + 12 (fp32 partition + Adam) bytes / 2, plus the gathered largest layer
    z3 = memory.model_states(arch, memory.Setup(zero=3, num_gpus=2, dtype_bytes=4))
    assert z3["total"] == 4 * P // 2 + 4 * LARGEST + 4 * P // 2 + 12 * P // 2
    # LoRA: DeepSpeed's estimate for the adapter only, plus the frozen 16-bit base (sharded under ZeRO-3)
    lora = memory.Arch(**{**arch.__dict__, "lora_params": LORA})
    z2 = memory.model_states(lora, memory.Setup(zero=2, num_gpus=4, nodes=1))
    assert z2["total"] == 2 * LORA + int(18 * LORA / 4) + 2 * (P - LORA)
    z3 = memory.model_states(lora, memory.Setup(zero=3, num_gpus=4, nodes=1))
    assert z3["total"] == 4 * LARGEST + int(18 * LORA / 4) + 2 * (P - LORA) // 4


@pytest.mark.unit
def test_activations_and_logits_by_hand(arch):
    s = memory.Setup(seq_len=1024, micro_batch=1, dtype_bytes=2, chunked_loss=False)
    # per token per layer: (4.4*q + 2*kv + 4*i) * 2 bytes + two norms (4 + 2) * h
    per_token_layer = (4.4 * 64 + 2 * 32 + 4 * 128) * 2 + 2 * 6 * 64  # 2483.2 bytes
    assert memory.layer_bytes_per_token(arch, s) == pytest.approx(per_token_layer)
    act = memory.activations(arch, s)
    grad_buffer = 2 * LARGEST  # the embedding's gradient before it is accumulated
    assert act["activations"] == int(per_token_layer * 1024 * 2 + 2 * 2 * 64 * 1024 + grad_buffer)
    assert act["logits"] == 14 * 1024 * 1000  # fp32 log-softmax, its grad, the logits' grad + 16-bit copy
    chunked = memory.activations(arch, memory.Setup(seq_len=1024, dtype_bytes=2, loss_chunk_size=256))
    assert chunked["logits"] == 14 * 256 * 1000
    assert act["recompute"] == 0
    gc_setup = memory.Setup(seq_len=1024, dtype_bytes=2, gradient_checkpointing=True, chunked_loss=False)
    gc = memory.activations(arch, gc_setup)
    assert gc["activations"] == int(2 * 64 * 1024 * 2 + 2 * 2 * 64 * 1024 + grad_buffer)  # layer inputs + ...
    assert gc["recompute"] == int(per_token_layer * 1024)  # one layer again, after the loss's backward
    est = memory.estimate(arch, memory.Setup(**{**gc_setup.__dict__, "overhead_gib": 0.0}))
    assert est.per_gpu == est.deepspeed_states + gc["activations"] + max(gc["recompute"], gc["logits"])
    off = memory.activations(arch, memory.Setup(seq_len=1024, dtype_bytes=2, gradient_checkpointing=True,
                                                offload_activations=True))
    assert off["offloaded"] == 2 * 64 * 1024 * 2 and off["activations"] == gc["activations"] - off["offloaded"]
    sp = memory.activations(arch, memory.Setup(seq_len=1024, dtype_bytes=2, sequence_parallel=4))
    assert sp["tokens_per_rank"] == 256
    assert sp["activations"] - grad_buffer == pytest.approx((act["activations"] - grad_buffer) / 4, abs=1)
    tiled = memory.layer_bytes_per_token(arch, memory.Setup(dtype_bytes=2, tiled_mlp=True))
    assert tiled == pytest.approx((4.4 * 64 + 2 * 32 + 64) * 2 + 2 * 6 * 64)
    eager = memory.activations(arch, memory.Setup(seq_len=1024, dtype_bytes=2, attn="eager", chunked_loss=False))
    assert eager["activations"] - act["activations"] == 2 * 2 * 1 * 4 * 1024 ** 2 * 2  # scores + probs, 4 heads, 2 layers


@pytest.mark.unit
def test_longest_sequence_search(arch):
    s = memory.Setup(zero=3, num_gpus=8, nodes=2, gradient_checkpointing=True, overhead_gib=0.0)
    budget = 64 * 2 ** 20
    n = memory.max_seq_len(arch, s, budget)
    assert n > 0 and n % 256 == 0
    assert memory.estimate(arch, memory.Setup(**{**s.__dict__, "seq_len": n})).per_gpu <= budget
    assert memory.estimate(arch, memory.Setup(**{**s.__dict__, "seq_len": n + 256})).per_gpu > budget
    assert memory.max_seq_len(arch, s, 1000) == 0  # not even the model states fit
    sp = memory.Setup(**{**s.__dict__, "sequence_parallel": 4})
    assert memory.max_seq_len(arch, sp, budget) > 3 * n  # a quarter of the tokens per rank


@pytest.mark.smoke
def test_estimate_memory_tool(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIG))
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "estimate_memory.py"), "--model_name_or_path", str(tmp_path),
           "--zero", "3", "--offload", "optimizer", "--num_gpus", "8", "--nodes", "2", "--seq_len", "4096",
           "--gradient_checkpointing", "--gpu_memory", "0.05,0.1", "--overhead_gib", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "= model states (DeepSpeed estimator)" in p.stdout and "longest sequence on 0.05 GiB GPUs" in p.stdout
    p = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    out = json.loads(p.stdout)
    assert out["total_params"] == P and out["deepspeed_states"] == 4 * LARGEST + 2 * P // 16
    assert out["per_gpu"] == out["deepspeed_states"] + out["activations"] + max(out["recompute"], out["logits"])
    assert 0 < out["max_seq_len"]["0.05"] < out["max_seq_len"]["0.1"]
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model_name_or_path")
    bad = subprocess.run(cmd + ["--offload", "param", "--zero", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "needs --zero 3" in bad.stderr
