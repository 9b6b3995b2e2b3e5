"""The generation layer (generation.py) and the scoring of rollouts (scoring.py), in one process
without a launcher: response masks at stop tokens and stop strings, left-padding invariance of
log-probs / values / reward scores, the clear errors for ds_hybrid and vllm, reward function wiring,
and a backend added the documented way (one file, one BACKENDS line) driven through --stage grpo.
"""
from __future__ import annotations

import json
import subprocess
import threading

import pytest
import torch

from medgpt_ds.config import RolloutArguments
from medgpt_ds.engine import DSConfigError
from medgpt_ds.errors import UserError
from medgpt_ds.generation import (Generation, HFBackend, SamplingParams, StopCriterion, _assemble, check_backend,
                                  left_pad, make_backend)
from medgpt_ds.rewards import rule_reward_functions
from medgpt_ds.scoring import LastTokenScore, critic_values, in_chunks, policy_logprobs
from tests.helpers import make_rl_assets
from tests.launch_utils import PY, ROOT, env, metrics

pytestmark = pytest.mark.unit


class _Engine:
    """Just enough of a DeepSpeed engine for the backends (ZeRO-0)."""

    def __init__(self, module):
        self.module = module

    def eval(self):
        self.module.eval()

    def train(self, mode=True):
        self.module.train(mode)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tiny_llama):
    tok = tiny_tokenizer
    model = tiny_llama(len(tok), seed=5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    prompts = [tok("What is fever?")["input_ids"], tok("cough")["input_ids"], tok("How should I take the tablet")["input_ids"]]
    return tok, model, prompts


def _params(tok, **kw):
    base = dict(max_new_tokens=10, pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id])
    return SamplingParams(**{**base, **kw})


def test_left_pad_and_generation_layout():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    # two generate() chunks of different widths; row 1 stopped after 2 tokens, rows 0 and 2 hit the limit
    parts = [(torch.tensor([[11, 12, 13], [21, 22, 0]]), torch.tensor([-1, 2])), (torch.tensor([[31, 32]]), torch.tensor([-1]))]
    ids3, mask3 = left_pad([[5, 6, 7], [8], [9, 9]], pad_id=0)
    gen = _assemble(ids3, mask3, parts, pad_id=0)
    assert gen.prompt_length == 3 and gen.response_mask.tolist() == [[True, True, True], [True, True, False],
                                                                      [True, True, False]]
    assert gen.has_eos.tolist() == [False, True, False]
    assert gen.responses() == [[11, 12, 13], [21, 22], [31, 32]]
    assert gen.attention_mask.tolist()[1] == [0, 0, 1, 1, 1, 0]
    assert gen.position_ids.tolist()[1] == [0, 0, 0, 1, 2, 2]  # positions count attended tokens only
    sub = gen.select([2])
    assert sub.responses() == [[31, 32]] and len(sub) == 1


def test_stop_token_and_stop_string_end_responses(setup):
    tok, model, prompts = setup
    torch.manual_seed(0)
    free = HFBackend(_Engine(model), tok, _params(tok, max_new_tokens=12), zero3=False).generate(prompts)
    assert free.response_mask.all() and not free.has_eos.any()  # nothing stops a random model in 12 tokens
    # make the 4th token of row 0 an end-of-turn: replay with a stop id, greedy for a fixed path
    greedy = HFBackend(_Engine(model), tok, _params(tok, temperature=0.0, max_new_tokens=12), zero3=False)
    path = greedy.generate(prompts).responses()
    stop_id = path[0][3]
    stopped = HFBackend(_Engine(model), tok, _params(tok, temperature=0.0, max_new_tokens=12,
                                                             stop_token_ids=[stop_id]), zero3=False).generate(prompts)
    for row, full, ended in zip(stopped.responses(), path, stopped.has_eos.tolist()):
        cut = full.index(stop_id) + 1 if stop_id in full else len(full)
        assert row == full[:cut] and ended == (stop_id in full)
    assert stopped.response_mask[0].sum() == 4
    # a stop string: the response ends at the token that completes it
    text0 = tok.decode(path[0])
    needle = text0[len(tok.decode(path[0][:5])) - 1:len(tok.decode(path[0][:5]))]
    assert needle
    by_string = HFBackend(_Engine(model), tok, _params(tok, temperature=0.0, max_new_tokens=12,
                                                               stop_strings=[needle]), zero3=False).generate(prompts)
    row0 = by_string.responses()[0]
    assert needle in tok.decode(row0) and needle not in tok.decode(row0[:-1]) and by_string.has_eos[0]
    # chunked generation gives the same greedy responses
    chunked_gen = HFBackend(_Engine(model), tok, _params(tok, temperature=0.0, max_new_tokens=12),
                                    zero3=False, batch_size=2).generate(prompts)
    assert chunked_gen.responses() == path


def test_logprobs_values_and_rewards_ignore_left_padding(setup, tiny_llama):
    tok, model, prompts = setup
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaForTokenClassification

    torch.manual_seed(1)
    gen = HFBackend(_Engine(model), tok, _params(tok, max_new_tokens=6), zero3=False).generate(prompts)
    logps, logits = policy_logprobs(model, gen, temperature=0.7)
    assert logps.shape == gen.response_mask.shape and logits.shape[:2] == gen.response_mask.shape
    cfg = LlamaConfig(**{**model.config.to_dict(), "num_labels": 1, "classifier_dropout": 0.0})
    torch.manual_seed(2)
    critic = LlamaForTokenClassification(cfg).eval()
    rm = LlamaForSequenceClassification(cfg).eval()
    values = critic_values(critic, gen)
    scores = LastTokenScore(rm)(gen.sequences, gen.attention_mask, gen.position_ids)
    for i, (p, r) in enumerate(zip(prompts, gen.responses())):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp = (model(ids).logits[0, len(p) - 1:-1] / 0.7).log_softmax(-1)
            expect = lp.gather(-1, torch.tensor(r)[:, None])[:, 0]
            v = critic(ids).logits[0, len(p) - 1:-1, 0]
            s = rm(ids).logits[0, 0]  # transformers' own pooling on the unpadded sequence
        assert torch.allclose(logps[i, :len(r)], expect, atol=1e-5)
        assert torch.allclose(values[i, :len(r)], v, atol=1e-5)
        assert torch.allclose(scores[i], s, atol=1e-5)
    assert torch.equal(in_chunks(lambda g: critic_values(critic, g), gen, 2), values)


def test_reward_model_reads_before_a_final_pad_id(tiny_llama):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = tiny_llama(64)
    cfg = LlamaConfig(**{**model.config.to_dict(), "num_labels": 1, "pad_token_id": 9})
    rm = LlamaForSequenceClassification(cfg).eval()
    ids = torch.tensor([[3, 4, 5, 9], [3, 4, 5, 6]])  # row 0 ends in the pad id (pad == eos tokenizers)
    mask = torch.ones_like(ids)
    pos = torch.arange(4).expand(2, 4)
    with torch.no_grad():
        ours = LastTokenScore(rm)(ids, mask, pos)
        theirs = rm(ids).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_ds_hybrid_and_vllm_fail_clearly(setup, monkeypatch):
    with pytest.raises(DSConfigError, match="CUDA kernels only.*--rollout_backend hybrid"):
        check_backend("ds_hybrid", model_type="llama", device_type="cpu", use_peft=False)
    with pytest.raises(DSConfigError, match="no inference container for model_type 'qwen2'"):
        check_backend("ds_hybrid", model_type="qwen2", device_type="cuda", use_peft=False)
    with pytest.raises(DSConfigError, match="PEFT"):
        check_backend("ds_hybrid", model_type="llama", device_type="cuda", use_peft=True)
    check_backend("ds_hybrid", model_type="opt", device_type="cuda", use_peft=False)
    check_backend("hybrid", model_type="qwen2", device_type="cpu", use_peft=True)
    # vllm: colocate mode is CUDA only (one clear error on CPU), a server on GPUs needs GPUs of its own
    from types import SimpleNamespace

    def run_cfg(**kw):
        return SimpleNamespace(stage_args=RolloutArguments(rollout_backend="vllm", **kw))

    with pytest.raises(UserError, match="colocate .* needs CUDA GPUs.*--vllm_mode server"):
        check_backend("vllm", model_type="llama", device_type="cpu", use_peft=False, cfg=run_cfg(vllm_mode="colocate"))
    from medgpt_ds import vllm_server

    monkeypatch.setattr(vllm_server, "resolve_vllm_python", lambda explicit=None: "/opt/vllm/bin/python")
    with pytest.raises(UserError, match="--vllm_devices"):
        check_backend("vllm", model_type="llama", device_type="cuda", use_peft=False, cfg=run_cfg())
    check_backend("vllm", model_type="llama", device_type="cpu", use_peft=False, cfg=run_cfg())
    check_backend("vllm", model_type="llama", device_type="cuda", use_peft=False,
                  cfg=run_cfg(vllm_server_url="http://127.0.0.1:1"))
    # a CPU server: vLLM's CPU attention has a fixed set of head sizes (another one fails the first request)
    from transformers import AutoConfig, LlamaConfig

    head16 = LlamaConfig(hidden_size=64, num_attention_heads=4)
    with pytest.raises(UserError, match="head size is 16, .* supports 32, 64, .*--rollout_backend hybrid"):
        check_backend("vllm", model_type="llama", device_type="cpu", use_peft=False, cfg=run_cfg(), model_config=head16)
    check_backend("vllm", model_type="llama", device_type="cuda", use_peft=False, cfg=run_cfg(vllm_devices="1"),
                  model_config=head16)  # GPU kernels take it
    check_backend("vllm", model_type="llama", device_type="cpu", use_peft=False, cfg=run_cfg(),
                  model_config=LlamaConfig(hidden_size=64, num_attention_heads=2))
    qwen35 = AutoConfig.for_model("qwen3_5", text_config={"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16})
    with pytest.raises(UserError, match="head size is 16"):  # a composite config: its text model's heads
        check_backend("vllm", model_type="qwen3_5", device_type="cpu", use_peft=False, cfg=run_cfg(), model_config=qwen35)
    tok, model, _ = setup
    with pytest.raises(UserError, match="built by the ppo/grpo stages"):
        make_backend("vllm", _Engine(model), tok, _params(tok), zero3=False)
    with pytest.raises(RuntimeError, match="hybrid_engine block"):
        make_backend("ds_hybrid", _Engine(model), tok, _params(tok), zero3=False)


def test_rollout_arguments_and_reward_functions():
    with pytest.raises(ValueError, match="rollout_backend"):
        RolloutArguments(rollout_backend="fast")
    with pytest.raises(ValueError, match="unknown reward 'speed'"):
        RolloutArguments(reward_funcs="format,speed")
    with pytest.raises(ValueError, match="1 values for 2"):
        RolloutArguments(reward_funcs="format,answer_choice", reward_weights="0.5")
    with pytest.raises(ValueError, match="kl_estimator"):
        RolloutArguments(kl_estimator="k4")
    assert RolloutArguments(stop="</answer>,\n\n").stop_strings() == ["</answer>", "\n\n"]
    assert RolloutArguments(stop=r"</answer>, \n\n").stop_strings() == ["</answer>", " \n\n"]
    fns = rule_reward_functions(["format", "answer_choice", "tests.helpers:starts_with_space"],
                                [0.5, 1.0, 2.0])
    assert [f.__name__ for f, _ in fns] == ["format", "answer_choice", "starts_with_space"]
    from medgpt_ds.rewards import combine_rewards

    total, parts = combine_rewards(fns, ["<think>x</think><answer>B</answer>", " no"], ["B", "C"])
    assert total == [0.5 + 1.0 + 0.0, 0.0 + 0.0 + 2.0]
    assert parts == {"format": [1.0, 0.0], "answer_choice": [1.0, 0.0], "starts_with_space": [0.0, 1.0]}


def test_sampling_kwargs():
    p = SamplingParams(max_new_tokens=5, pad_token_id=0, stop_token_ids=[1, 2], temperature=0.0, top_k=3)
    kw = p.generate_kwargs()
    assert kw["do_sample"] is False and kw["top_k"] is None and kw["use_cache"] is True and p.logit_temperature == 1.0
    p = SamplingParams(max_new_tokens=5, pad_token_id=0, stop_token_ids=[1], temperature=0.8, top_p=0.9, top_k=3)
    kw = p.generate_kwargs()
    assert kw["do_sample"] and kw["top_k"] == 3 and kw["top_p"] == 0.9 and p.logit_temperature == 0.8


def test_generation_dataclass_is_the_boundary():
    # what every backend returns; stages only use these fields
    g = Generation(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                   torch.tensor([[True, False], [True, True]]), torch.tensor([True, False]), steps=2)
    assert g.response_ids.shape == (2, 2) and g.attention_mask.shape == (2, 5) and len(g) == 2


class _CancelAfter:
    """A streamer that sets ``event`` once ``n`` generated tokens went by (as a consumer that leaves)."""

    def __init__(self, event: threading.Event, n: int):
        self.event, self.n, self.puts = event, n, 0

    def put(self, value):
        self.puts += 1
        if self.puts > self.n:  # the first put is the prompt
            self.event.set()

    def end(self):
        pass


def test_cancellation_is_checked_every_token(setup):
    tok, model, prompts = setup
    cancel = threading.Event()
    backend = HFBackend(_Engine(model), tok, _params(tok, temperature=0.0, max_new_tokens=12), zero3=False,
                        streamer=_CancelAfter(cancel, 3), cancel=cancel)
    gen = backend.generate(prompts[:1])
    # generate checks the criteria before it hands a token to the streamer: the event set while the
    # 3rd token was streamed ends the row at the 4th, not at max_new_tokens
    assert cancel.is_set() and gen.response_mask.sum() == 4 and not gen.has_eos[0]
    # the criterion alone: rows that did not stop keep end -1, and all rows end once cancelled
    crit = StopCriterion(tok, 2, [7], [], 2, "cpu", cancel=threading.Event())
    assert crit(torch.tensor([[1, 2, 7], [1, 2, 5]]), None).tolist() == [True, False]
    crit.cancel.set()
    assert crit(torch.tensor([[1, 2, 7, 0], [1, 2, 5, 6]]), None).tolist() == [True, True]
    assert crit.end.tolist() == [1, -1]


@pytest.mark.smoke
def test_a_new_backend_is_one_file_and_one_line_through_grpo(tmp_path, demo_tokenizer_dir, tiny_llama):
    # tests/fake_rollout.py is the one file; the BACKENDS line is added in the launched process
    assets = make_rl_assets(str(tmp_path / "assets"), demo_tokenizer_dir, tiny_llama)
    out, log = tmp_path / "echo", tmp_path / "calls.jsonl"
    register = ("import runpy; from medgpt_ds import generation; "
                "generation.BACKENDS['echo'] = 'tests.fake_rollout:EchoBackend'; "
                "runpy.run_path('launch/train.py', run_name='__main__')")
    cmd = [PY, "-c", register, "--stage", "grpo", "--model_name_or_path", assets["actor"], "--template_name", "chatml",
           "--train_file_dir", "data/demo/grpo", "--rollout_backend", "echo", "--reward_funcs",
           "tests.helpers:starts_with_space", "--num_generations", "4", "--per_device_train_batch_size", "8",
           "--max_steps", "3", "--save_steps", "0", "--logging_steps", "1", "--report_to", "none",
           "--output_dir", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(FAKE_ROLLOUT_LOG=str(log)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # one rollout per step, the weights pushed after every optimizer step, closed once at the end
    assert [(c["call"], c.get("weight_version", c.get("step"))) for c in calls] == [
        ("generate", -1), ("update_weights", 1), ("generate", 1), ("update_weights", 2), ("generate", 2),
        ("update_weights", 3), ("close", None)]
    for c in calls[::2][:3]:  # 2 prompts x 4 responses, each group adjacent
        p = c["prompts"]
        assert len(p) == 8 and p[0] == p[1] == p[2] == p[3] and p[4] == p[5] == p[6] == p[7] and p[0] != p[4]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["actor"])
    lengths = [len(tok(" yes", add_special_tokens=False)["input_ids"]) + 1, len(tok("no", add_special_tokens=False)["input_ids"]) + 1]
    rec = metrics(out)
    assert [r["step"] for r in rec] == [1, 2, 3]
    for r in rec:  # the backend's rows, scored as they were returned: " yes" (reward 1) and "no" (0) alternate
        assert r["reward"] == 0.5 and r["reward/starts_with_space"] == 0.5 and r["reward_std"] == 0.5
        assert r["frac_reward_zero_std"] == 0.0 and r["eos_fraction"] == 1.0
        assert r["response_length"] == sum(lengths) / 2 and r["generation_steps_max"] == max(lengths)
    assert (out / "model.safetensors").is_file()
