"""Every shipped YAML recipe parses into a valid run config (unit)."""
import glob
import os

import pytest

from medgpt_ds.cli import STAGE_MODULES
from medgpt_ds.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.unit
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "launch", "recipes", "*.yaml"))))
def test_recipe_parses(path, monkeypatch):
    import importlib

    import yaml

    stage = yaml.safe_load(open(path))["stage"]
    module = importlib.import_module(STAGE_MODULES[stage])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # hub ids in recipes are fine when online
    monkeypatch.chdir(ROOT)
    cfg = parse_args([path, "--train_file_dir", "data/demo/sft"], {stage: getattr(module, "Arguments", None)})
    assert cfg.train.stage == stage and cfg.train.output_dir
