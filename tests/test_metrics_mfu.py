"""Model FLOPs and MFU (medgpt_ds/metrics.py) against numbers derived by hand for small configs."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False)
    cfg.update(kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def _linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_full_training_llama_gqa_by_hand():
    from medgpt_ds.metrics import model_flops

    model = _llama()
    f = model_flops(model)
    # per layer: q 64x(4x16) + k,v 2 x 64x(2x16) + o 64x64 = 12288; gated MLP 3 x 64 x 176 = 33792
    # 2 layers + lm_head 1000 x 64 = 2 x 46080 + 64000 = 156160 (embeddings excluded)
    assert f.matmul_params == 156160 == _linear_weights(model)
    assert f.trained_params == 156160
    assert f.attention == ((None, 2, 64, 64),)
    # one sample of 8 tokens: keys attended 1 + 2 + ... + 8 = 36
    # 6 x 156160 x 8 + 3 x 2 x 2 layers x (64 + 64) x 36 = 7495680 + 55296
    assert f.training_flops(8, {None: 36}) == 7_550_976


def test_lora_counts_frozen_base_at_4n_and_adapters_at_6n():
    from peft import LoraConfig, get_peft_model

    from medgpt_ds.metrics import model_flops

    model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    f = model_flops(model)
    # q: A 4x64 + B 64x4 = 512; v: A 4x64 + B 32x4 = 384; x 2 layers = 1792 adapter weights
    assert f.trained_params == 1792
    assert f.matmul_params == 156160 + 1792
    per_token = f.training_flops(1, {None: 0})
    assert per_token == 4 * 157952 + 2 * 1792 == 635392
    # the old 6N formula overstated LoRA FLOPs by ~1.5x
    assert 6 * 156160 / per_token == pytest.approx(1.4746, rel=1e-3)


def test_tied_lm_head_is_a_matmul_embeddings_are_not():
    from medgpt_ds.metrics import model_flops

    model = _llama(tie_word_embeddings=True)
    assert model_flops(model).matmul_params == 156160


def test_qwen3_explicit_head_dim():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from medgpt_ds.metrics import model_flops

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    f = model_flops(model)
    # q 64 x 128 + k, v 2 x 64 x 64 + o 128 x 64 = 24576; MLP 3 x 64 x 96 = 18432; lm_head 6400
    assert f.matmul_params == 24576 + 18432 + 6400 == _linear_weights(model)
    assert f.attention == ((None, 1, 128, 128),)


def test_moe_counts_active_experts_only():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from medgpt_ds.metrics import model_flops

    cfg = Qwen3MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1])
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    f = model_flops(model)
    # attention 2 x 3072; layer 0 MoE: router 32 x 8 + 2 active experts x 3 x 32 x 16 = 3328;
    # layer 1 dense MLP 3 x 32 x 64 = 6144; lm_head 3200
    assert f.matmul_params == 2 * 3072 + 3328 + 6144 + 3200 == 18816
    # cross-check with the real parameters: stacked experts scaled by top-k / E
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    router = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert _linear_weights(model) + router + experts * 2 // 8 == f.matmul_params


def test_sliding_window_layers_cap_attended_keys():
    from transformers import Gemma3TextConfig

    from medgpt_ds.metrics import attention_groups

    cfg = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4)
    groups = dict((w, n) for w, n, *_ in attention_groups(cfg))
    assert groups == {4: 5, None: 1}  # gemma3: 5 local layers per global one


def test_unknown_architecture_reports_no_flops():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from medgpt_ds.metrics import Throughput, model_flops

    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                           q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    model = DeepseekV3ForCausalLM(cfg)
    assert model_flops(model) is None  # MLA is not guessed at
    thr = Throughput.for_model(model)
    thr.add(10, 10)
    assert "mfu" not in thr.read() and thr.peak is None


def test_zero3_partitioned_params_count_as_full():
    from medgpt_ds.metrics import model_flops

    model = _llama()
    for p in model.parameters():  # what ZeRO-3 leaves on a rank: empty data, full shape in ds_shape
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    assert model_flops(model).matmul_params == 156160


def test_peak_table_by_device_and_dtype():
    from medgpt_ds.metrics import peak_flops

    assert peak_flops("bf16", "NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("bf16", "NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("bf16", "NVIDIA GH200 480GB") == pytest.approx(989.4e12)
    assert peak_flops("bf16", "NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert peak_flops("bf16", "NVIDIA H20") == pytest.approx(148e12)
    assert peak_flops("tf32", "NVIDIA A100-SXM4-80GB") == pytest.approx(156e12)
    assert peak_flops("fp32", "NVIDIA A100-SXM4-80GB") == pytest.approx(19.5e12)
    assert peak_flops("fp16", "NVIDIA A10") == pytest.approx(125e12)
    assert peak_flops("bf16", "NVIDIA A10G") is None  # not in the table: no guess
    assert peak_flops("bf16", "Tesla V100-SXM2-32GB") is None  # no bf16 tensor cores
    if not torch.cuda.is_available():
        assert peak_flops("bf16") is None  # CPU: no MFU


def test_compute_dtype():
    from medgpt_ds.metrics import compute_dtype

    assert compute_dtype({"bf16": {"enabled": True}, "fp16": {"enabled": False}}) == "bf16"
    assert compute_dtype({"fp16": {"enabled": True}}) == "fp16"
    assert compute_dtype({}, torch.bfloat16) == "bf16"
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert compute_dtype({"bf16": {"enabled": False}}) == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        torch.set_float32_matmul_precision("high")
        assert compute_dtype({}) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


def test_attended_keys_packed_and_padded_batches():
    from medgpt_ds.data.packing import PackedCollator, PaddedCollator
    from medgpt_ds.metrics import attended_keys

    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    c = {"input_ids": [4, 4, 4, 4, 4, 4], "labels": [4] * 6}
    packed = PackedCollator(pad_token_id=0)([[a, b], [c]])  # row 0 is padded by a pad run of 1
    n, keys = attended_keys(packed, [None, 2], pad_token_id=0)
    # row 0: (1+2+3) + (1+2); row 1: 1+...+6; pad run excluded
    assert n == 11 and keys[None] == 6 + 3 + 21
    assert keys[2] == (1 + 2 + 2) + (1 + 2) + (1 + 2 + 2 + 2 + 2 + 2)
    padded = PaddedCollator(pad_token_id=0)([a, b])
    n, keys = attended_keys(padded, [None], pad_token_id=0)
    assert n == 5 and keys[None] == 6 + 3


def test_throughput_mfu_against_hand_count():
    from medgpt_ds.data.packing import PackedCollator
    from medgpt_ds.metrics import Throughput, model_flops

    model = _llama()
    thr = Throughput(1, flops=model_flops(model), dtype="bf16", pad_token_id=0, device_name="NVIDIA H100 80GB HBM3")
    batch = PackedCollator(pad_token_id=0)([[{"input_ids": list(range(1, 9)), "labels": list(range(1, 9))}]])
    thr.add(8, 8, [batch])
    thr.t0 -= 2.0  # pretend the step took 2 s
    out = thr.read()
    flops = 7_550_976  # test_full_training_llama_gqa_by_hand
    assert out["tflops"] == pytest.approx(flops / 2.0 / 1e12, rel=1e-3)
    assert out["mfu"] == pytest.approx(flops / 2.0 / 989.4e12, rel=1e-3)
    cpu = Throughput(1, flops=model_flops(model), dtype="bf16", device_name="cpu")
    cpu.add(8, 8, [batch])
    assert "mfu" not in cpu.read()


def test_mfu_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medgpt_ds.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), "tensorboard")
    logger.log(3, {"loss": 1.0, "tflops": 12.5, "mfu": 0.42})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "logs"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/mfu")] == [pytest.approx(0.42)]
    assert [e.step for e in acc.Scalars("train/tflops")] == [3]
