"""User mistakes end as ONE line `error: ...` naming the file or flag, exit status 2, no traceback
(errors.main_boundary), and lose nothing: a full disk leaves `latest` on the last complete
checkpoint; a hostile pickle in a checkpoint folder is refused before anything unpickles it.

Each case runs the way the user does it: `launch/train.py` or a tool as a subprocess, or `cli.main` /
a tool's `main` in-process where the error surfaces before any rank or model starts. The launches
that need a saved checkpoint share one 1-step run and go in parallel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.launch_utils import PY, ROOT, env, free_port

DEMO = os.path.join(ROOT, "data", "demo")
MARKER = "PWNED"


def error_line(err: str) -> str:
    """The one `error:` line of a failed run (and no traceback next to it)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def failed(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout
    return error_line(proc.stderr)


def call(main, argv: list[str], capsys) -> str:
    """A cli/tool main in-process: it must return 2 and print exactly one error line."""
    capsys.readouterr()
    assert main(argv) == 2
    return error_line(capsys.readouterr().err)


def tool(name: str):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def pt_args(tok: str, out: Path, *extra: str) -> list[str]:
    return ["--stage", "pt", "--tokenizer_name_or_path", tok, "--train_file_dir", f"{DEMO}/pretrain",
            "--block_size", "64", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--output_dir", str(out), *extra]


def hostile_pickle(path: Path, marker: Path) -> None:
    """Add to a real checkpoint file an object whose unpickling writes ``marker`` (any code could run)."""

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('code from the checkpoint ran')",)

    sd = torch.load(path, weights_only=False)
    sd["payload"] = Payload()
    torch.save(sd, path)


def small_fs(mountpoint: Path, size: str) -> list[str] | None:
    """Command prefix running a command with a `size` tmpfs mounted on `mountpoint` (a real full
    disk: ENOSPC from the kernel), through a private mount namespace; None where that is not allowed."""
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
        try:
            probe = subprocess.run([*unshare, "sh", "-c", script, "sh", size, str(mountpoint), "true"],
                                   capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if probe.returncode == 0:
            return [*unshare, "sh", "-c", script, "sh", size, str(mountpoint)]
    return None


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_tokenizer_dir) -> Path:
    """One complete 1-step pt run from scratch (ZeRO-0): checkpoint-1, latest and the HF export."""
    out = tmp_path_factory.mktemp("errors") / "run"
    p = subprocess.run([PY, f"{ROOT}/launch/train.py", *pt_args(demo_tokenizer_dir, out, "--model_config", "tiny",
                                                                  "--max_steps", "1", "--save_steps", "1")],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "latest").read_text() == "checkpoint-1" and (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def launches(run, demo_tokenizer_dir) -> dict:
    """The failing launches that need a model or a checkpoint, run in parallel: name -> (process, paths)."""
    root = run.parent
    tok = demo_tokenizer_dir
    # a model one size smaller than the checkpoint's
    smaller = root / "smaller.json"
    smaller.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    # a copy of the run whose next checkpoint lands on a full disk
    full = root / "full"
    shutil.copytree(run, full)
    (full / "checkpoint-2").mkdir()
    prefix = small_fs(full / "checkpoint-2", "64k")
    # a copy of the run whose checkpoint carries code
    hostile = root / "hostile"
    shutil.copytree(run, hostile)
    hostile_pickle(hostile / "checkpoint-1" / "mp_rank_00_model_states.pt", root / MARKER)
    train = [PY, f"{ROOT}/launch/train.py"]
    cmds = {
        "size_mismatch": train + pt_args(tok, root / "mismatch", "--model_config", str(smaller), "--max_steps", "2",
                                         "--resume_from_checkpoint", str(run / "checkpoint-1")),
        "hostile_resume": train + pt_args(tok, hostile, "--model_config", "tiny", "--max_steps", "2",
                                          "--resume_from_checkpoint", "auto"),
        # 2 ranks meet the same mistake: still one line (the other rank waits, and the launcher ends it)
        "target_modules": [os.path.join(os.path.dirname(PY), "deepspeed"), "--num_gpus", "2", "--master_port",
                           str(free_port()), f"{ROOT}/launch/train.py", "--stage", "sft", "--model_name_or_path", str(run), "--train_file_dir",
                                   f"{DEMO}/sft", "--template_name", "chatml", "--max_steps", "1", "--use_peft",
                                   "--target_modules", "nonexistent_proj", "--report_to", "none",
                                   "--output_dir", str(root / "lora")],
    }
    if prefix:
        cmds["disk_full"] = prefix + train + pt_args(tok, full, "--model_config", "tiny", "--max_steps", "2",
                                                     "--save_steps", "1", "--resume_from_checkpoint", "auto")

    def go(cmd):
        return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cmds, pool.map(go, cmds.values())))
    return {"procs": procs, "full": full, "hostile": hostile, "root": root}


# --- through the trainer (subprocesses) --------------------------------------------------------

@pytest.mark.smoke
def test_resume_of_a_different_model_size_names_checkpoint_and_tensor(launches, run):
    line = failed(launches["procs"]["size_mismatch"])
    assert line == (f"error: --resume_from_checkpoint {run}/checkpoint-1 was saved from a different model: "
                    "model.embed_tokens.weight is (600, 64) in the checkpoint but (600, 32) in this model "
                    "(resume with the model the run was started with)")


@pytest.mark.smoke
def test_full_disk_while_saving_keeps_latest_on_the_last_complete_checkpoint(launches):
    if "disk_full" not in launches["procs"]:
        pytest.skip("no mount namespace here (needs `unshare -m` as root or unprivileged user namespaces) "
                    "to put the checkpoint on a small tmpfs")
    line = failed(launches["procs"]["disk_full"])
    full = launches["full"]
    assert line.startswith(f"error: no space left on device writing {full}/checkpoint-2"), line
    assert (full / "latest").read_text() == "checkpoint-1"
    assert (full / "checkpoint-1" / "trainer_state.json").is_file()


@pytest.mark.smoke
def test_hostile_pickle_in_a_resumed_checkpoint_is_refused_before_it_runs(launches):
    line = failed(launches["procs"]["hostile_resume"])
    bad = launches["hostile"] / "checkpoint-1" / "mp_rank_00_model_states.pt"
    assert line.startswith(f"error: {bad}: refused to load: it references ") and "--trust_checkpoint" in line
    assert not (launches["root"] / MARKER).exists()  # the payload never ran


@pytest.mark.smoke
def test_lora_target_module_not_in_the_model(launches):
    line = failed(launches["procs"]["target_modules"])
    assert line == ("error: --target_modules nonexistent_proj: nonexistent_proj not found in LlamaForCausalLM; its "
                    "linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj "
                    "(or pass --target_modules all)")


@pytest.mark.unit
def test_chat_on_a_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert call(tool("chat").main, ["--model_name_or_path", str(missing), "--prompt", "hi"], capsys) == (
        f"error: --model_name_or_path {missing}: no such directory (and not in the hub cache)")


@pytest.mark.unit
def test_chat_batch_input_mistakes_name_file_line_and_field(model_dir, tmp_path, capsys):
    """tools/chat.py --input_file: every bad file or row is one line naming file:line and the field,
    found before the model loads (and before an hour of generating)."""
    chat = tool("chat").main
    src = tmp_path / "q.jsonl"

    def batch(content: str | bytes, *extra: str, name: str = "q.jsonl") -> str:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return call(chat, ["--model_name_or_path", str(model_dir), "--input_file", str(path), *extra], capsys)

    ok = '{"question": "What is a fever?"}\n'
    assert batch(ok + "{oops\n") == f"error: {src}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    assert batch(ok + "\n" + '{"answer": "x", "id": 3}\n') == (
        f"error: {src}:3: no prompt: expected a non-empty messages, conversations, prompt, question, instruction or "
        "text field (keys: answer, id)")
    assert batch(ok + '{"question": "  "}\n').startswith(f"error: {src}:2: no prompt")
    assert batch('{"messages": "hi"}\n') == (
        f"error: {src}:1: field 'messages': expected a list of {{role, content}} objects")
    assert batch('{"messages": [{"role": "assistant", "content": "ref"}]}\n') == f"error: {src}:1: no user turn to answer"
    assert batch(ok + '["a list"]\n') == f"error: {src}:2: expected a JSON object, got list"
    assert batch(ok.encode() + b'{"question": "caf\xe9"}\n') == f"error: {src}:2: not valid UTF-8 (byte 18 of the line)"
    assert batch("\n\n") == f"error: --input_file {src}: no records"
    assert batch(ok, "--output_file", str(tmp_path / "nope" / "a.jsonl")) == (
        f"error: --output_file {tmp_path / 'nope' / 'a.jsonl'}: no folder {tmp_path / 'nope'}")
    js = tmp_path / "q.json"
    assert batch('[\n  {"question": "a"},\n  {"question": }\n]\n', name="q.json") == (
        f"error: {js}:3: invalid JSON: Expecting value (column 16)")
    assert batch('[{"question": "a"}, {"id": 2}]', name="q.json").startswith(f"error: {js}: record 2: no prompt")
    missing = tmp_path / "missing.jsonl"
    assert call(chat, ["--model_name_or_path", str(model_dir), "--input_file", str(missing)], capsys) == (
        f"error: {missing}: no such file")


@pytest.mark.unit
def test_a_mistake_only_another_rank_meets_is_reported_with_its_rank(monkeypatch, capsys):
    """Rank 0 reports at once; another rank (which usually meets the same mistake and is ended by the
    launcher meanwhile) reports after the delay, with its rank, so a rank-only mistake is never lost."""
    from medgpt_ds import errors

    @errors.main_boundary
    def main(argv):
        raise errors.UserError(f"{argv[0]}:3: field 'x': bad")

    monkeypatch.setattr(errors, "OTHER_RANK_DELAY_S", 0.0)
    for rank, prefix in (("0", ""), ("1", "(rank 1) ")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert call(main, ["a.jsonl"], capsys) == f"error: {prefix}a.jsonl:3: field 'x': bad"
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process (RANK left over from somewhere): no label
    assert call(main, ["a.jsonl"], capsys) == "error: a.jsonl:3: field 'x': bad"


# --- cli.main in-process: refused while parsing / before any rank starts --------------------------

@pytest.fixture
def sft(tiny_base_dir, tmp_path):
    def argv(*extra: str, model: str | None = None) -> list[str]:
        return ["--stage", "sft", "--model_name_or_path", model or tiny_base_dir, "--train_file_dir", f"{DEMO}/sft",
                "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *extra]
    return argv


@pytest.mark.unit
def test_bad_flags(sft, tmp_path, capsys):
    from medgpt_ds.cli import main

    assert call(main, sft("--lr_scheduler_type", "bogus"), capsys).startswith(
        "error: --lr_scheduler_type 'bogus' is not a transformers scheduler: use one of linear, cosine,")
    assert call(main, sft("--learning_rate=-1e-3"), capsys) == "error: --learning_rate must be >= 0, got -0.001"
    assert call(main, sft("--template_name", "nonexistent"), capsys).startswith(
        "error: --template_name 'nonexistent' is not a known template: use one of base, chatml, qwen,")
    (tmp_path / "a_file").write_text("x")
    argv = sft()
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "a_file")
    assert call(main, argv, capsys) == f"error: --output_dir {tmp_path / 'a_file'} is a file, not a folder"
    assert call(main, ["--stage", "xyz"], capsys) == ("error: --stage must be one of pt, sft, rm, ppo, dpo, orpo, "
                                                      "grpo, opd, got 'xyz'")


@pytest.mark.unit
def test_incomplete_model_folders(sft, tiny_base_dir, tmp_path, capsys):
    from medgpt_ds.cli import main

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_base_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert call(main, sft(model=str(no_weights)), capsys) == (
        f"error: --model_name_or_path {no_weights} is not a complete model folder: no weights (model.safetensors, "
        "model-*-of-*.safetensors or pytorch_model.bin) (it holds chat_template.jinja, config.json, "
        "generation_config.json, tokenizer.json, tokenizer_config.json)")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(Path(tiny_base_dir) / "config.json", only_config)
    line = call(main, sft(model=str(only_config)), capsys)
    assert line.startswith(f"error: --model_name_or_path {only_config} is not a complete model folder: no weights")
    assert "and no tokenizer files" in line and "sentencepiece" not in line


@pytest.mark.unit
def test_debug_shows_the_traceback(sft, capsys, monkeypatch):
    from medgpt_ds.cli import main

    monkeypatch.delenv("MEDGPT_DEBUG", raising=False)
    assert main(sft("--lr_scheduler_type", "bogus", "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: --lr_scheduler_type 'bogus'")
    monkeypatch.setenv("MEDGPT_DEBUG", "1")
    assert main(sft("--lr_scheduler_type", "bogus")) == 2
    assert "Traceback" in capsys.readouterr().err


# --- tools in-process ----------------------------------------------------------------------------

@pytest.mark.unit
def test_chat_on_a_training_checkpoint_says_what_to_pass(run, capsys):
    ckpt = run / "checkpoint-1"
    assert call(tool("chat").main, ["--model_name_or_path", str(ckpt), "--prompt", "hi"], capsys) == (
        f"error: --model_name_or_path {ckpt} is a DeepSpeed training checkpoint, not a Hugging Face model: pass the "
        f"run's final export {run}, or a folder converted with: python tools/zero_to_hf.py --checkpoint_dir {ckpt} "
        f"--output_dir {ckpt}-hf")


@pytest.mark.unit
def test_zero_to_hf_truncated_shard(run, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", ckpt)
    shard = ckpt / "mp_rank_00_model_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    line = call(tool("zero_to_hf").main, ["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "hf")], capsys)
    assert line.startswith(f"error: {shard}: truncated or damaged ({len(data) // 2} bytes; ")
    assert line.endswith("the save did not finish or the copy is incomplete")


@pytest.mark.unit
def test_zero_to_hf_refuses_unknown_classes_unless_trusted(run, tmp_path, capsys):
    """An object outside the allow-list (a harmless datetime here) is refused by default, and
    --trust_checkpoint converts it (the flag is honoured)."""
    import datetime

    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", ckpt)
    shard = ckpt / "mp_rank_00_model_states.pt"
    sd = torch.load(shard, weights_only=False)
    sd["saved_at"] = datetime.date(2025, 1, 1)
    torch.save(sd, shard)
    z2h = tool("zero_to_hf")
    argv = ["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "hf")]
    assert call(z2h.main, argv, capsys) == (
        f"error: {shard}: refused to load: it references datetime.date, which no DeepSpeed or medgpt-ds checkpoint "
        "holds, and loading it could run code. If you trust where this checkpoint comes from, pass --trust_checkpoint")
    assert z2h.main(argv + ["--trust_checkpoint"]) == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "hf" / "model.safetensors"))["model.embed_tokens.weight"],
                       load_file(str(run / "model.safetensors"))["model.embed_tokens.weight"])


@pytest.mark.unit
def test_validate_data_tool(tmp_path, capsys):
    vd = tool("validate_data")
    assert call(vd.main, ["--stage", "sft", f"{DEMO}/sft", "--tokenizer", str(tmp_path / "nope")], capsys) == (
        f"error: --tokenizer {tmp_path / 'nope'}: no such directory (and not in the hub cache)")
    # invalid UTF-8 is listed with file:line like every other bad record, and the run goes on
    good = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    bad = tmp_path / "data.jsonl"
    bad.write_bytes((good + "\n").encode() + b'{"conversations": "caf\xe9"}\n' + (good + "\n").encode())
    assert vd.main(["--stage", "sft", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: invalid UTF-8 at column 23" in out  # the trainer's own reader (data/formats.py)
    assert "3 rows, 2 valid records, 1 errors" in out


@pytest.mark.unit
def test_serve_refuses_a_public_address_without_a_key(tmp_path, capsys, monkeypatch):
    serve = tool("serve")
    monkeypatch.delenv("MEDGPT_API_KEY", raising=False)
    assert call(serve.main, ["--model_name_or_path", str(tmp_path / "m"), "--host", "0.0.0.0"], capsys) == (
        "error: --host 0.0.0.0 is reachable from other machines and no API key is set: anyone who can reach port "
        "8000 could use the model. Set MEDGPT_API_KEY (clients send it as a bearer key), or pass "
        "--allow_public_without_key")
    # past that gate with the explicit flag (the next check is the model path: nothing is served here)
    line = call(serve.main, ["--model_name_or_path", str(tmp_path / "m"), "--host", "0.0.0.0",
                             "--allow_public_without_key"], capsys)
    assert line.startswith(f"error: --model_name_or_path {tmp_path / 'm'}: no such directory")


@pytest.mark.unit
def test_web_demo_password_never_on_the_command_line(tmp_path, capsys, monkeypatch):
    web = tool("web_demo")
    monkeypatch.delenv("MEDGPT_WEB_AUTH", raising=False)
    args = ["--model_name_or_path", str(tmp_path / "m")]
    assert call(web.main, args + ["--auth", "doc:secret"], capsys).startswith(
        "error: --auth puts the password on the command line")
    assert web.read_auth(web.parse_args(args)) is None
    monkeypatch.setenv("MEDGPT_WEB_AUTH", "doc:s3cret:x")
    assert web.read_auth(web.parse_args(args)) == ("doc", "s3cret:x")
    monkeypatch.delenv("MEDGPT_WEB_AUTH")
    (tmp_path / "auth").write_text("nurse:pw\n")
    assert web.read_auth(web.parse_args(args + ["--auth_file", str(tmp_path / "auth")])) == ("nurse", "pw")
    (tmp_path / "auth").write_text("no-colon\n")
    assert call(web.main, args + ["--auth_file", str(tmp_path / "auth")], capsys) == (
        f"error: --auth_file {tmp_path / 'auth'} must hold user:password")


@pytest.mark.unit
def test_writing_maps_a_full_disk(tmp_path):
    import stat

    from medgpt_ds.errors import UserError, writing

    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("/dev/full is not the full-disk device here")

    with pytest.raises(UserError, match=f"^no space left on device writing {tmp_path / 'ckpt'}$"):
        with writing(str(tmp_path / "ckpt")), open("/dev/full", "wb") as f:
            f.write(b"x" * 65536)
            f.flush()
    # torch's zip writer reports a failed write without errno: the path is named all the same
    with pytest.raises(UserError, match=f"^could not write {tmp_path / 'ckpt'} .*disk full or over quota"):
        with writing(str(tmp_path / "ckpt")):
            torch.save({"w": torch.zeros(1000)}, "/dev/full")
