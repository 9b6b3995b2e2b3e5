"""tools/make_hostfile.py: SLURM hostlist expansion and hostfile text (no cluster needed)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from make_hostfile import expand_nodelist, make_hostfile, slots_from_env  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-02,05],login1", ["gpu01", "gpu02", "gpu05", "login1"]),
    ("n[009-011]", ["n009", "n010", "n011"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("dgx-a100-[3-4]", ["dgx-a100-3", "dgx-a100-4"]),
])
def test_expand_nodelist_matches_scontrol(nodelist, hosts):
    # the expected lists are what `scontrol show hostnames` prints (checked against slurm 22.05)
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-2", "node1-2]", "node[2-1]", "node[a-b]", "node[1-2],node2"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_slots_from_env_order():
    assert slots_from_env({"GPUS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "8"}) == 4
    assert slots_from_env({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert slots_from_env({"SLURM_GPUS_PER_NODE": "h100:8"}) == 8
    assert slots_from_env({}) is None
    with pytest.raises(ValueError):
        slots_from_env({"SLURM_GPUS_PER_NODE": "lots"})


def test_make_hostfile_text_parses_with_deepspeed():
    from deepspeed.launcher.runner import _parse_hostfile

    text = make_hostfile(["gpu01", "gpu02"], 8)
    assert text == "gpu01 slots=8\ngpu02 slots=8\n"
    assert dict(_parse_hostfile(text.splitlines())) == {"gpu01": 8, "gpu02": 8}
    with pytest.raises(ValueError):
        make_hostfile(["a"], 0)


def test_cli_from_slurm_env(tmp_path):
    out = tmp_path / "hf"
    env = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "2", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(REPO / "tools/make_hostfile.py"), "-o", str(out)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "node1 slots=2\nnode2 slots=2\n"
    r = subprocess.run([sys.executable, str(REPO / "tools/make_hostfile.py")], env={"PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "SLURM_JOB_NODELIST" in r.stderr
