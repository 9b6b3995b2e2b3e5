"""MedicalGPT's and TRL's flag names and forms (unit): aliases, space-separated lists, -1 = all, the
notices for defaults that differ, what --do_eval resolves to, --flash_attn's fallback, and the
--report_to backends (tensorboard, wandb, mlflow for real when installed; swanlab through a fake
module, since the package downgrades protobuf in the shared environment)."""
import glob
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import pytest

from medgpt_ds.config import STAGES, ModelArguments, parse_args
from medgpt_ds.errors import UserError
from medgpt_ds.stages import dpo, grpo, orpo, ppo

pytestmark = pytest.mark.unit
STAGE_ARGS = {"dpo": dpo.Arguments, "orpo": orpo.Arguments, "ppo": ppo.Arguments, "grpo": grpo.Arguments}


def parse(tmp_path, stage, *extra):
    return parse_args(["--stage", stage, "--model_name_or_path", str(tmp_path), "--tokenizer_name_or_path",
                       str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra], STAGE_ARGS)


def test_trl_names_and_space_separated_lists(tmp_path):
    cfg = parse(tmp_path, "grpo", "--dtype", "bfloat16", "--lora_r", "16", "--lora_target_modules", "q_proj", "k_proj",
                "v_proj", "--train_samples", "-1", "--max_completion_length", "512", "--use_vllm", "False",
                "--num_generations", "4", "--beta", "0.001", "--lr_scheduler_type", "cosine")
    assert cfg.model.torch_dtype == "bfloat16" and cfg.lora.lora_rank == 16
    assert cfg.lora.target_modules == "q_proj,k_proj,v_proj"
    assert cfg.data.max_train_samples is None  # -1 = all
    a = cfg.stage_args
    assert a.max_new_tokens == 512 and a.num_generations == 4 and a.beta == 0.001
    assert a.rollout_backend == "hybrid"  # --use_vllm False: the default generation
    assert cfg.train.lr_scheduler_type == "cosine"
    # --target_modules takes space- and comma-separated lists, and --modules_to_save too
    cfg = parse(tmp_path, "sft", "--target_modules", "q_proj,", "k_proj", "--modules_to_save", "embed_tokens", "lm_head",
                "--max_train_samples", "0")
    assert cfg.lora.target_modules == "q_proj,k_proj" and cfg.lora.modules_to_save == "embed_tokens,lm_head"
    assert cfg.data.max_train_samples is None
    assert parse(tmp_path, "sft", "--target_modules=q_proj,v_proj").lora.target_modules == "q_proj,v_proj"


def test_max_completion_length_per_stage_and_its_hint(tmp_path):
    assert parse(tmp_path, "ppo", "--max_completion_length", "64").stage_args.max_new_tokens == 64
    assert parse(tmp_path, "dpo", "--max_completion_length", "64").data.max_target_length == 64
    with pytest.raises(UserError, match=r"unknown flag --max_completion_length for --stage sft \(the response length "
                                        r"of ppo/grpo.*--model_max_length"):
        parse(tmp_path, "sft", "--max_completion_length", "64")
    with pytest.raises(UserError, match=r"unknown flag --use_vllm for --stage dpo"):
        parse(tmp_path, "dpo", "--use_vllm", "True")


def test_use_vllm_true_selects_the_vllm_backend_or_says_in_one_line_why_not(tmp_path, capsys):
    for flag in (["--use_vllm", "True"], ["--use_vllm"], ["--use_vllm=true"]):
        if importlib.util.find_spec("medgpt_ds.vllm_rollout") is None:  # the backend is its own issue
            with pytest.raises(UserError, match=r"^--use_vllm True: the vLLM rollout backend \(medgpt_ds/vllm_rollout.py\) "
                                                r"is not part of this version of medgpt-ds; pass --use_vllm False"):
                parse(tmp_path, "grpo", *flag)
        else:
            assert parse(tmp_path, "grpo", *flag).stage_args.rollout_backend == "vllm"
            assert "--use_vllm True: rollouts are generated with --rollout_backend vllm" in capsys.readouterr().err
    with pytest.raises(UserError, match="--use_vllm expects True or False"):
        parse(tmp_path, "grpo", "--use_vllm", "maybe")


def test_medicalgpt_opd_script_gets_one_line_naming_the_stage(tmp_path):
    """run_opd.sh's flags (the opd stage is its own issue): one error naming the stage, not a flag list."""
    if "opd" in STAGES:
        pytest.skip("the opd stage exists: its own tests run run_opd.sh")
    with pytest.raises(UserError) as e:
        parse(tmp_path, "opd", "--teacher_model_name_or_path", "Qwen/Qwen3.5-7B-Instruct", "--teacher_load_in_4bit",
              "True", "--opd_lambda", "0.5", "--max_prompt_length", "1024", "--temperature", "0.9")
    assert str(e.value) == ("--stage must be one of pt, sft, rm, ppo, dpo, orpo, grpo, got 'opd' (on-policy "
                            "distillation, MedicalGPT's run_opd.sh / opd_training.py, is not in this version of medgpt-ds)")
    with pytest.raises(UserError) as e:  # an unknown flag's value is not reported again as an argument
        parse(tmp_path, "sft", "--opd_lambda", "0.5", "--teacher_load_in_4bit", "True")
    assert "unexpected argument" not in str(e.value) and str(e.value).count("unknown flag") == 2


def test_defaults_that_differ_from_medicalgpt_are_named_once(tmp_path, capsys):
    parse(tmp_path, "dpo", "--use_peft", "True", "--max_steps", "100")
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "differ from MedicalGPT's dpo_training.py" in x]
    assert len(line) == 1
    assert "--learning_rate 2e-05 (MedicalGPT: 0.0005)" in line[0] and "--warmup_steps 0 (MedicalGPT: 100)" in line[0]
    assert "--use_peft" not in line[0] and "--max_steps" not in line[0]  # given flags are not named
    parse(tmp_path, "dpo", "--learning_rate", "5e-4", "--warmup_steps", "100", "--logging_steps", "1",
          "--use_peft", "True", "--max_source_length", "2048", "--max_target_length", "512", "--max_steps", "200",
          "--gradient_accumulation_steps", "4", "--gradient_checkpointing", "True", "--lora_alpha", "16")
    assert "differ from MedicalGPT" not in capsys.readouterr().err  # MedicalGPT's values: nothing to say
    parse(tmp_path, "grpo")
    err = capsys.readouterr().err
    assert "--loss_type grpo (MedicalGPT: dapo)" in err and "--system_prompt none (MedicalGPT: think_answer)" in err
    parse(tmp_path, "sft")  # full fine-tuning: MedicalGPT's LoRA default is named, its lora_alpha is moot
    err = capsys.readouterr().err
    assert "--use_peft False (MedicalGPT: True)" in err and "--lora_alpha" not in err
    parse_args(["--stage", "pt", "--model_config", "tiny", "--tokenizer_name_or_path", str(tmp_path), "--output_dir",
                str(tmp_path / "out")])  # from scratch: no adapter to suggest
    assert "--use_peft" not in capsys.readouterr().err


def test_do_eval_never_silently_does_nothing(tmp_path, capsys):
    cfg = parse(tmp_path, "orpo", "--do_eval")  # MedicalGPT's orpo script: --do_eval, no validation folder
    assert cfg.data.validation_split_percentage == 1
    assert "1% of the training records is held out" in capsys.readouterr().err
    assert parse(tmp_path, "sft").data.validation_split_percentage == 0  # no evaluation asked: nothing held out
    assert parse(tmp_path, "sft", "--eval_steps", "5").data.validation_split_percentage == 1
    with pytest.raises(UserError, match="no validation data"):
        parse(tmp_path, "sft", "--do_eval", "--validation_split_percentage", "0")
    cfg = parse(tmp_path, "ppo", "--eval_steps", "100", "--validation_file_dir", str(tmp_path))
    err = capsys.readouterr().err
    assert "--eval_steps 100: ppo runs no evaluation pass" in err
    assert "--stage ppo trains PPO with a critic" in err and "TRL's RLOO" in err


def test_flash_attn_falls_back_to_sdpa_with_one_warning(capsys):
    from medgpt_ds import model

    model._warned_flash_attn = False
    args = ModelArguments(flash_attn=True)
    assert model.resolve_attn_implementation(args) == "sdpa"
    assert model.resolve_attn_implementation(args) == "sdpa"
    out = capsys.readouterr().out
    assert out.count("--flash_attn True: flash_attention_2 cannot run here") == 1
    with pytest.raises(UserError, match="flash_attention_2 needs a CUDA GPU"):  # an explicit choice stays an error
        model.resolve_attn_implementation(ModelArguments(attn_implementation="flash_attention_2"))
    assert model.resolve_attn_implementation(ModelArguments(flash_attn=True, attn_implementation="eager")) == "eager"


# --- --report_to ----------------------------------------------------------------------------------


def test_report_to_names(tmp_path, monkeypatch):
    from medgpt_ds import report

    assert parse(tmp_path, "sft", "--report_to", "tensorboard", "mlflow").train.report_to == "tensorboard,mlflow"
    with pytest.raises(UserError, match="--report_to 'comet' is not one of tensorboard, wandb, swanlab, mlflow"):
        parse(tmp_path, "sft", "--report_to", "comet")
    with pytest.raises(UserError, match="none and all stand alone"):
        parse(tmp_path, "sft", "--report_to", "none,wandb")
    monkeypatch.setattr(report, "installed", lambda name: name == "tensorboard")
    assert report.resolve_report_to("all") == ["tensorboard"]
    assert report.resolve_report_to("none") == [] and report.resolve_report_to("jsonl") == []
    with pytest.raises(UserError, match=r"--report_to wandb: the wandb package is not installed \(pip install "
                                        r"'medgpt-ds\[wandb\]'\)"):
        parse(tmp_path, "sft", "--report_to", "wandb")


@pytest.fixture
def fake_swanlab(monkeypatch):
    """A stand-in `swanlab` module recording init / log / finish (the real package is an optional extra)."""
    calls = []
    mod = types.ModuleType("swanlab")
    mod.__spec__ = importlib.machinery.ModuleSpec("swanlab", None)
    mod.init = lambda **kw: calls.append(("init", kw)) or object()
    mod.log = lambda data, step=None: calls.append(("log", dict(data), step))
    mod.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "swanlab", mod)
    return calls


def test_metrics_logger_reports_to_every_backend_offline(tmp_path, fake_swanlab, monkeypatch):
    """--report_to all: TensorBoard events, the swanlab calls (fake module), and wandb / mlflow runs
    written offline under the logging dir and read back, when those packages are installed."""
    from medgpt_ds import report
    from medgpt_ds.metrics import MetricsLogger

    for var in ("WANDB_MODE", "SWANLAB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    names = report.resolve_report_to("all")
    assert "tensorboard" in names and "swanlab" in names
    out = tmp_path / "run-a"
    logger = MetricsLogger(str(out), "all", config={"train": {"learning_rate": 1e-4, "stage": "sft"}})
    logger.log(1, {"loss": 2.5, "lr": 1e-4, "skipped": float("nan")})
    logger.log(2, {"loss": 2.0}, prefix="eval")
    logger.close()
    log_dir = out / "logs"
    assert glob.glob(str(log_dir / "events.out.tfevents.*"))
    init = [c for c in fake_swanlab if c[0] == "init"][0][1]
    assert init["mode"] == "offline" and init["logdir"] == str(log_dir / "swanlog") and init["experiment_name"] == "run-a"
    assert init["config"]["train"]["learning_rate"] == 1e-4
    assert ("log", {"train/loss": 2.5, "train/lr": 1e-4}, 1) in fake_swanlab  # non-finite values are not sent
    assert ("log", {"eval/loss": 2.0}, 2) in fake_swanlab and fake_swanlab[-1] == ("finish",)
    with open(log_dir / "metrics.jsonl") as f:
        assert [json.loads(x)["split"] for x in f] == ["train", "eval"]
    if "mlflow" in names:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri="file:" + str(log_dir / "mlruns"))
        exp = client.get_experiment_by_name("medgpt-ds")
        run = client.search_runs([exp.experiment_id])[0]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 2.5)]
        assert run.data.params["train.learning_rate"] == "0.0001" and run.info.run_name == "run-a"
    if "wandb" in names:
        # wandb has no reader for offline runs: the run file holds the protobuf records, names in clear
        files = glob.glob(str(log_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        assert len(files) == 1
        data = open(files[0], "rb").read()
        assert b"train/loss" in data and b"eval/loss" in data and b"learning_rate" in data


def test_report_backend_protocol_is_one_file_per_backend():
    from medgpt_ds import report

    root = os.path.dirname(report.__file__)
    for name, (target, _, _) in report.BACKENDS.items():
        module, cls = target.split(":")
        assert os.path.isfile(os.path.join(root, module.rsplit(".", 1)[1] + ".py"))
        assert all(callable(getattr(getattr(__import__(module, fromlist=[cls]), cls), m)) for m in ("log", "close"))
