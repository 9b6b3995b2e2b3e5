"""Every shipped YAML recipe parses into a valid run config (unit)."""
import glob
import os

import pytest

from medgpt_ds.cli import STAGE_MODULES
from medgpt_ds.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "launch", "recipes", "*.yaml")))


@pytest.mark.unit
def test_found_the_recipes():
    """The parametrized test below runs once per recipe: an empty glob would pass by running nothing."""
    assert {os.path.basename(p) for p in RECIPES} >= {"pt.yaml", "sft_lora.yaml"}, RECIPES


@pytest.mark.unit
@pytest.mark.parametrize("path", RECIPES)
def test_recipe_parses(path, monkeypatch):
    import importlib

    import yaml

    stage = yaml.safe_load(open(path))["stage"]
    module = importlib.import_module(STAGE_MODULES[stage])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # hub ids in recipes are fine when online
    monkeypatch.chdir(ROOT)
    cfg = parse_args([path, "--train_file_dir", "data/demo/sft"], {stage: getattr(module, "Arguments", None)})
    assert cfg.train.stage == stage and cfg.train.output_dir
