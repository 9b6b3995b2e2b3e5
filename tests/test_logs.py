"""Logs that work in files (SLURM, nohup) and on a terminal: every logging line says how far the run
is (step/total, elapsed, ETA from a moving window, right after a resume), a third-party warning is
shown once per process, lines printed during training go above the tqdm bar on a terminal, and the
rm stage says in one line that its score head is new instead of transformers' coloured load report.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from tests.launch_utils import PY, ROOT, ds_config_copy, env, free_port

PROGRESS = re.compile(r"^step (\d+)/(\d+) \((\d+\.\d)%\) \| elapsed (\d+:\d\d:\d\d) \| eta (\d+:\d\d:\d\d|\?) \| "
                      r"loss \S+ \| lr \S+ \| tok/s \S+", re.M)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.mark.unit
def test_progress_line_elapsed_and_moving_window_eta():
    from medgpt_ds.metrics import Progress

    clock = Clock()
    p = Progress(400, 0, window=5, clock=clock)
    assert p.line(0) == "step 0/400 (0.0%) | elapsed 0:00:00 | eta ?"
    clock.t += 60.0  # a slow first step (warm-up)
    p.advance(1)
    assert p.eta(1) == pytest.approx(60.0 * 399)
    for step in range(2, 11):  # then 2 s per step
        clock.t += 2.0
        p.advance(step)
    # the window holds the last 5 steps only: the warm-up is gone from the ETA, not from elapsed
    assert p.eta(10) == pytest.approx(2.0 * 390)
    assert p.line(10) == "step 10/400 (2.5%) | elapsed 0:01:18 | eta 0:13:00"


@pytest.mark.unit
def test_progress_after_resume_counts_this_run_and_the_steps_left():
    from medgpt_ds.metrics import Progress

    clock = Clock()
    p = Progress(400, initial_step=390, window=20, clock=clock)  # resumed at step 390
    for step in range(391, 395):
        clock.t += 30.0
        p.advance(step)
    assert p.line(394) == "step 394/400 (98.5%) | elapsed 0:02:00 | eta 0:03:00"
    assert p.eta(400) == 0.0


_REPEATS = """
import warnings, sys
sys.path.insert(0, {root!r})
if {install}:
    from medgpt_ds.metrics import show_each_warning_once
    show_each_warning_once()
lib = {{"__name__": "somelib", "warnings": warnings}}  # a library module, not __main__
exec("def collective():\\n    warnings.warn('`reduce_scatter_tensor` is deprecated', FutureWarning)\\n"
     "def old_api():\\n    warnings.warn('ignored by the default filters', DeprecationWarning)\\n", lib)
third_party_collective = lib["collective"]
for step in range(5):
    third_party_collective()
    with warnings.catch_warnings():  # what libraries do all the time: it resets Python's once-per-location memory
        warnings.simplefilter("ignore", UserWarning)
warnings.warn("another one", UserWarning)
lib["old_api"]()
"""


@pytest.mark.unit
def test_each_warning_once_per_process_even_when_the_registry_is_reset():
    def stderr(install: bool) -> str:
        code = _REPEATS.format(root=ROOT, install=install)
        return subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env(), check=True, timeout=120).stderr

    plain = stderr(False)
    assert plain.count("reduce_scatter_tensor") == 5  # without it: once per "step"
    once = stderr(True)
    assert once.count("reduce_scatter_tensor") == 1 and once.count("another one") == 1
    assert "FutureWarning" in once and "DeprecationWarning" not in once  # the filters still decide


@pytest.mark.unit
def test_terminal_lines_go_above_the_bar(monkeypatch, tmp_path):
    """On a terminal the bar stays at the bottom: a log line, a logger message and a plain print
    from elsewhere (checkpoint rotation) each clear the bar, print, and redraw it."""
    from medgpt_ds import metrics

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.delenv("MEDGPT_NO_PROGRESS", raising=False)
    logger = metrics.MetricsLogger(str(tmp_path), "none", total_steps=10)
    assert logger.bar is not None and isinstance(sys.stdout, metrics._AboveBar)
    logger.advance()
    logger.log(1, {"loss": 2.5, "lr": 1e-4, "tokens_per_s": 812.0})
    print("save_total_limit=1: removed checkpoint-2")
    logger.info("exported model")
    logger.close()
    assert sys.stdout is term  # restored
    out = term.getvalue()
    for line in ("step 1/10 (10.0%) | elapsed ", "save_total_limit=1: removed checkpoint-2\n", "exported model\n"):
        at = out.index(line)
        before = out[:at]
        # the bar was cleared right before the line (carriage return, blanks, carriage return) ...
        assert re.search(r"\r\s+\r$", before) or before.endswith("\r"), repr(out[max(0, at - 200):at + 60])
        # ... and redrawn right after it
        rest = out[at:].split("\n", 1)[1]
        assert rest.startswith("\rtrain:"), repr(rest[:80])
    assert "loss 2.5 | lr 0.0001 | tok/s 812" in out


@pytest.mark.unit
def test_rm_head_line():
    from medgpt_ds.stages.rm import describe_head

    new = describe_head({"missing": {"score.weight"}, "unexpected": {"lm_head.weight"}, "mismatched": set()}, "base")
    assert new == "rm: the score head (score.weight) is new, randomly initialised, as expected for a reward model built on base"
    assert describe_head({"missing": set(), "unexpected": set(), "mismatched": set()}, "rm0") == \
        "rm: the score head is loaded from rm0"
    bad = describe_head({"missing": {"score.weight", "model.layers.1.mlp.up_proj.weight"},
                         "unexpected": {"lm_head.weight", "model.vision.proj.weight"}, "mismatched": set()}, "base")
    lines = bad.splitlines()
    assert len(lines) == 3 and lines[0].startswith("rm: the score head (score.weight) is new")
    assert lines[1] == "warning: 1 weights are missing from base and start random: model.layers.1.mlp.up_proj.weight"
    assert lines[2] == "warning: 1 weights in base are not used by the reward model: model.vision.proj.weight"


@pytest.mark.distributed
def test_rm_zero3_log_in_a_file(tmp_path, tiny_base_dir):
    """A short ZeRO-3 rm run on 2 ranks with stdout/stderr going to a file, as under SLURM or nohup.
    PYTHONWARNINGS=always makes Python repeat DeepSpeed's per-step FutureWarning on every call (what
    a registry reset by any library did in the issue's 180-step log): still once per rank here."""
    z3 = ds_config_copy(tmp_path, "zero3", stage3_param_persistence_threshold=0)
    out, log = tmp_path / "rm", tmp_path / "train.log"
    steps = 6
    cmd = [os.path.join(os.path.dirname(PY), "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "launch", "train.py"), "--stage", "rm", "--model_name_or_path", tiny_base_dir,
           "--template_name", "chatml", "--train_file_dir", os.path.join(ROOT, "data", "demo", "reward"),
           "--per_device_train_batch_size", "2", "--max_steps", str(steps), "--logging_steps", "2", "--save_steps", "4",
           "--save_total_limit", "1", "--deepspeed", z3, "--report_to", "none", "--output_dir", str(out)]
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env(PYTHONWARNINGS="always::FutureWarning"), stdout=f,
                           stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert p.returncode == 0, text[-6000:]
    rows = PROGRESS.findall(text)
    assert [int(r[0]) for r in rows] == [2, 4, 6] and all(int(r[1]) == steps for r in rows), text[-3000:]
    assert [r[2] for r in rows] == ["33.3", "66.7", "100.0"]
    assert rows[-1][4] == "0:00:00"  # nothing left at the last step
    # each third-party warning once per process (2 ranks), however often it is raised
    assert text.count("reduce_scatter_tensor` is deprecated") == 2, text[-6000:]
    # the score head in one plain line, no coloured load report (and no library progress bars in a file)
    assert "\x1b[" not in text and "LOAD REPORT" not in text and "\r" not in text
    assert text.count("rm: the score head (score.weight) is new, randomly initialised, as expected") == 1
    assert "save_total_limit=1: removed checkpoint-4" in text
