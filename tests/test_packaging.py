"""setup.py allows only what CI tests: each dependency's floor is the version requirements.txt
pins (and the Makefile installs for torch)."""
from __future__ import annotations

import ast
import os
import re

import pytest
from packaging.version import Version

from tests.launch_utils import ROOT

pytestmark = pytest.mark.unit


def _install_requires() -> dict[str, str]:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    reqs = next(k.value for k in call.keywords if k.arg == "install_requires")
    out = {}
    for spec in ast.literal_eval(reqs):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:>=(\S+))?", spec)
        assert m, spec
        out[m.group(1).lower()] = m.group(2)
    return out


def test_floors_are_the_tested_versions():
    floors = _install_requires()
    pins = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.split("#")[0].strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    pins["torch"] = re.search(r"torch==(\S+)", open(os.path.join(ROOT, "Makefile")).read()).group(1)
    for pkg in ("torch", "deepspeed", "transformers", "peft", "trl", "datasets"):
        floor, pin = floors[pkg], pins[pkg]
        assert floor is not None, f"{pkg} has no floor in setup.py"
        # the floor names the tested release (5.23 for 5.23.0); trailing zeros may be left out
        f, p = Version(floor).release, Version(pin).release
        assert p[:len(f)] == f and not any(p[len(f):]), (pkg, floor, pin)
