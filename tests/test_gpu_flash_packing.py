"""bench/gpu_flash_packing.py --dry-run: the GPU packing check's code runs on CPU (sdpa, tiny shapes)
and its checks hold; the GPU suite (bench/gpu_suite.sh) runs it for real on a CUDA machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.launch_utils import ROOT, env

pytestmark = pytest.mark.smoke


def test_dry_run(tmp_path):
    out = tmp_path / "flash.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_flash_packing.py"), "--json", str(out),
                        "--dry-run"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    checks = res["checks"]
    assert res["ok"] and res["mode"] == "dry_run" and "error" not in res
    assert checks["packed_vs_alone"]["layout"] == "rows" and checks["packed_vs_alone"]["rows"] == [3, 5]
    for name in ("packed_vs_alone", "flat_vs_alone"):
        assert checks[name]["max_abs"] < 1e-4 and checks[name]["tokens"] > 100, checks[name]
    assert checks["leak_control"]["max_abs"] > 1e-3  # the check can see a leak
    assert checks["sdpa_vs_flash"]["rel_diff"] < 1e-5
    assert "skipped" in checks["linear_attention"]
