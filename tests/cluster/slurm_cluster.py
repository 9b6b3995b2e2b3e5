"""A real two-node SLURM cluster on one machine, for the `cluster` tests.

Each "host" is a set of namespaces held open by one `unshare --net --mount --uts` process:
its own network stack (a veth pair joins the two: 10.200.0.1 <-> 10.200.0.2, named eth0 on
both sides), its own hostname and its own /etc/hosts (bind-mounted in its private mount
namespace). slurmctld and the first slurmd live on host 1, the second slurmd on host 2, munged
serves both through a socket in the run directory. The filesystem is shared, as on a cluster.

Everything is private to this run: the namespaces are new (so slurm's ports cannot collide with
another run), the run directory, munge key/socket and cluster name carry the pid. Every process
started here is a child started with PR_SET_PDEATHSIG and is stopped by pid in `stop()`; anything
a job left behind in our namespaces is found by its network-namespace inode and killed by pid.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
# DeepSpeed's JIT ops (deepspeed_shm_comm on CPU): `make test` shares .cache/torch_extensions
# (built by the earlier tests); run alone, the cluster tests use a directory of their own, since
# the venv's ninja (1.13) and Debian's (1.11) hash build commands differently and processes that
# find different ninjas first on PATH rebuild a shared directory back and forth (1-2 min each).
TORCH_EXT_DIR = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or REPO / ".cache" / "torch_extensions_cluster")


def job_env(**extra: str) -> dict[str, str]:
    """Environment for sbatch/deepspeed in tests: the project's venv first on PATH, CPU-sized."""
    path = os.environ.get("PATH", "")
    if VENV_BIN.is_dir():
        path = f"{VENV_BIN}:{path}"
    env = {
        "PATH": path,
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": str(TORCH_EXT_DIR),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "REPO_DIR": str(REPO),
    }
    env.update(extra)
    return env


SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "munged")
SYS_TOOLS = ("ip", "nsenter", "unshare", "setpriv")
SUBNET = "10.200.0"
# Job credential lifetime. slurmd revokes a finished job's credential and refuses a launch whose
# credential is not newer than the revocation; slurmctld therefore holds a requeued job back for
# cred_expire + 1 s (120 s by default). A short lifetime keeps that protection and lets a requeued
# job start ~11 s later (sched_interval=2 below: the queue is scanned every 2 s instead of 60).
# Forcing an earlier start with `scontrol update StartTime=now` races the revocation: under load
# the relaunch is refused and the job ends FAILED.
CRED_EXPIRE = 10


def missing_requirements() -> str | None:
    """Why the cluster cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "cluster tests need root (network namespaces, slurm daemons); run as root"
    missing = [b for b in SLURM_BINARIES + SYS_TOOLS if shutil.which(b) is None]
    if missing:
        return f"missing {', '.join(missing)}: run `bash .ci/cluster_setup.sh` (as root) first"
    return None


def _pdeathsig():
    # Children die with the test process even when pytest is killed hard.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class SlurmCluster:
    """Start with `start()`, always `stop()`; `run(cmd)` runs a client command on host 1."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 64, gpus_per_node: int = 8, root: str | None = None):
        self.tag = f"mg{os.getpid()}"
        self.root = Path(root or tempfile.mkdtemp(prefix=f"medgpt-slurm-{os.getpid()}-", dir="/tmp"))
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        # Nodes are declared like the GPU nodes the templates ask for (64 CPUs, 8 "gpu" GRES,
        # config_overrides: slurmd does not check them), so the unmodified #SBATCH headers are
        # accepted; the tests scale the work itself down through the templates' variables.
        self.cpus = cpus_per_node
        self.gpus = gpus_per_node
        self.root.chmod(0o755)  # munged (its own user) must reach its socket directory below
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.holders: list[subprocess.Popen] = []
        self.daemons: dict[str, subprocess.Popen] = {}
        self.ifname = "eth0"
        self.failure_logs = ""

    # ------------------------------------------------------------------ hosts
    def hosts_file(self, name: str) -> Path:
        """The file bind-mounted as /etc/hosts on host `name` (rewrite it in place to change it)."""
        return self.root / f"hosts-{name}"

    def write_hosts(self, loopback_own_name: bool = False):
        """Correct entries for every node; or, like Debian's default, each node's own name on
        127.0.1.1 (the case where gloo/NCCL advertise a loopback address to their peers)."""
        for name in self.nodes:
            lines = ["127.0.0.1 localhost"]
            lines += [f"127.0.1.1 {name}"] if loopback_own_name else []
            lines += [f"{a} {n}" for a, n in zip(self.addrs, self.nodes) if not (loopback_own_name and n == name)]
            with open(self.hosts_file(name), "w") as f:  # same inode: the bind mounts see it
                f.write("\n".join(lines) + "\n")

    def _start_hosts(self):
        self.write_hosts()
        for name in self.nodes:
            hosts = self.hosts_file(name)
            ready = self.root / f"{name}.ready"
            script = (f"hostname {name} && mount --bind {hosts} /etc/hosts && ip link set lo up "
                      f"&& touch {ready} && exec sleep infinity")
            p = subprocess.Popen(
                ["unshare", "--net", "--mount", "--uts", "--propagation", "private", "--kill-child",
                 "--", "sh", "-c", script],
                preexec_fn=_pdeathsig, stdout=subprocess.DEVNULL, stderr=open(self.root / f"{name}.holder.log", "w"))
            self.holders.append(p)
            (self.root / f"{name}.holder.pid").write_text(str(p.pid))
            _wait_for(lambda: ready.exists() or p.poll() is not None, 20, f"namespaces of {name}")
            if p.poll() is not None:
                raise RuntimeError(f"namespace holder for {name} died: {(self.root / f'{name}.holder.log').read_text()}")
        # veth pair: created in the root namespace under unique names, moved and renamed eth0.
        ends = [f"{self.tag}{c}"[-15:] for c in "ab"]
        subprocess.run(["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], check=True)
        for end, holder, addr in zip(ends, self.holders, self.addrs):
            subprocess.run(["ip", "link", "set", end, "netns", str(holder.pid)], check=True)
            for cmd in (["ip", "link", "set", end, "name", self.ifname],
                        ["ip", "addr", "add", f"{addr}/24", "dev", self.ifname],
                        ["ip", "link", "set", self.ifname, "up"]):
                self.host_run(cmd, host=self.holders.index(holder), cwd="/", check=True)

    def host_cmd(self, cmd: list[str], host: int = 0, cwd: str | None = None) -> list[str]:
        """`cmd` as run on host `host` (its network, mount and uts namespaces), in `cwd`."""
        return (["nsenter", "-t", str(self.holders[host].pid), "-n", "-m", "-u", f"--wd={cwd or os.getcwd()}", "--"]
                + [str(c) for c in cmd])

    def host_run(self, cmd, host: int = 0, cwd: str | None = None, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        env = {**os.environ, "SLURM_CONF": str(self.conf), **(kw.pop("env", None) or {})}
        return subprocess.run(self.host_cmd(cmd, host, cwd), env=env, **kw)

    def host_popen(self, cmd, host: int = 0, cwd: str | None = None, **kw) -> subprocess.Popen:
        env = {**os.environ, "SLURM_CONF": str(self.conf), **(kw.pop("env", None) or {})}
        return subprocess.Popen(self.host_cmd(cmd, host, cwd), env=env, preexec_fn=_pdeathsig, **kw)

    # ------------------------------------------------------------------ daemons
    def _start_munge(self):
        mdir = self.munge_socket.parent
        mdir.mkdir()
        mdir.chmod(0o711)  # munged insists that everyone may traverse its socket directory
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(mdir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        cmd = ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "--pdeathsig=KILL", "munged", "-F",
               f"--socket={self.munge_socket}", f"--key-file={key}", f"--log-file={mdir / 'munged.log'}",
               f"--pid-file={mdir / 'munged.pid'}", f"--seed-file={mdir / 'munged.seed'}"]
        self._daemon("munged", cmd)
        _wait_for(lambda: self.munge_socket.exists() or self.daemons["munged"].poll() is not None,
                  20, "munged socket")
        if not self.munge_socket.exists():
            raise RuntimeError(f"munged died:\n{(self.root / 'munged.out').read_text()}")

    def _write_conf(self):
        state = self.root / "state"
        state.mkdir()
        (self.root / "spool").mkdir()
        conf = f"""\
ClusterName={self.tag}
SlurmctldHost={self.nodes[0]}({self.addrs[0]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
StateSaveLocation={state}
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
GresTypes=gpu
"""
        for name, addr in zip(self.nodes, self.addrs):
            conf += (f"NodeName={name} NodeAddr={addr} NodeHostname={name} CPUs={self.cpus} "
                     f"RealMemory=64000 Gres=gpu:{self.gpus} State=UNKNOWN\n")
        conf += f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO\n"
        self.conf.write_text(conf)
        # slurm drops file-less GPUs: give it device nodes (copies of /dev/null, harmless).
        dev = self.root / "dev"
        dev.mkdir()
        for i in range(self.gpus):
            os.mknod(dev / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (self.root / "gres.conf").write_text(f"Name=gpu File={dev}/gpu[0-{self.gpus - 1}]\n")

    def _daemon(self, name: str, cmd: list[str]):
        log = open(self.root / f"{name}.out", "w")
        p = subprocess.Popen(cmd, env={**os.environ, "SLURM_CONF": str(self.conf)}, preexec_fn=_pdeathsig,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons[name] = p
        (self.root / f"{name}.daemon.pid").write_text(str(p.pid))

    def start(self) -> "SlurmCluster":
        """Bring up hosts, munged, slurmctld, both slurmds; on any failure stop what started."""
        try:
            return self._start()
        except BaseException:
            self.failure_logs = self.logs()
            self.stop()
            raise

    def _start(self) -> "SlurmCluster":
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self._start_hosts()
        self._start_munge()
        self._write_conf()
        self._daemon("slurmctld", self.host_cmd(["slurmctld", "-D", "-i", "-f", self.conf], 0, self.root))
        for i, name in enumerate(self.nodes):
            self._daemon(f"slurmd-{name}", self.host_cmd(["slurmd", "-D", "-f", self.conf, "-N", name], i, self.root))

        def idle():
            for n, p in self.daemons.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{n} exited {p.returncode}:\n{self.logs()}")
            r = self.host_run(["sinfo", "-h", "-N", "-o", "%N %t"])
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            return len(states) == len(self.nodes) and all(s == "idle" for s in states.values())

        _wait_for(idle, 60, "both slurm nodes idle")
        return self

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script: str, *args: str, env: dict | None = None, cwd: str | None = None) -> int:
        r = self.host_run(["sbatch", "--parsable", *args, script], env=env, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, Restarts, ...)."""
        r = self.host_run(["scontrol", "show", "job", "-o", str(job_id)])
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait_job(self, job_id: int, timeout: float = 300, states=("COMPLETED", "FAILED", "CANCELLED",
                                                                   "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        """Poll until the job reaches one of `states`; returns its final `scontrol` record."""
        def done():
            info = self.job(job_id)
            return info if info.get("JobState") in states else None
        try:
            return _wait_for(done, timeout, f"job {job_id} to reach {'/'.join(states)}", interval=0.5)
        except TimeoutError:
            self.host_run(["scancel", str(job_id)])
            raise

    def job_steps_alive(self, job_id: int) -> list[int]:
        """Pids of this job's slurmstepd processes (batch and steps) still on our hosts."""
        tag = f"slurmstepd: [{job_id}.".encode()
        alive = []
        for pid in self._netns_pids():
            try:
                if open(f"/proc/{pid}/cmdline", "rb").read().startswith(tag):
                    alive.append(pid)
            except OSError:
                pass
        return alive

    def cancel_all(self):
        self.host_run(["scancel", "--full", "-u", "root"])

    def logs(self) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            out.append(f"==> {f} <==\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    # ------------------------------------------------------------------ teardown
    def _netns_pids(self) -> list[int]:
        """Pids of processes living in our hosts' network namespaces (job leftovers included)."""
        inodes = set()
        for h in self.holders:
            try:
                inodes.add(os.stat(f"/proc/{h.pid}/ns/net").st_ino)
            except OSError:
                pass
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid():
                try:
                    if os.stat(f"/proc/{d}/ns/net").st_ino in inodes:
                        pids.append(int(d))
                except OSError:
                    pass
        return pids

    def stop(self):
        """Cancel jobs, stop daemons by pid, kill leftovers in our namespaces, drop the veth."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except Exception:
                pass
        order = [n for n in self.daemons if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.daemons.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid in self._netns_pids():
            if pid not in {h.pid for h in self.holders}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for h in self.holders:
            if h.poll() is None:
                h.kill()  # unshare --kill-child takes the sleep with it; the namespaces and veth go too
                h.wait(10)
        keep = os.environ.get("MEDGPT_KEEP_CLUSTER_DIR")
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def reap_stale(tmp: str = "/tmp"):
    """Stop daemons of earlier runs whose test process died without teardown (by their pid files)."""
    for d in Path(tmp).glob("medgpt-slurm-*"):
        owner = d / "owner.pid"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{pid}").exists():
            continue
        for pf in list(d.glob("*.daemon.pid")) + list(d.glob("*.holder.pid")):
            try:
                os.kill(int(pf.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------- jobs in tests
def submit(cluster: SlurmCluster, template: str, tmp_path: Path, env: dict[str, str], *sbatch_args: str) -> tuple[int, Path]:
    """sbatch a project template from the repo root with `env`; returns (job id, its output file)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "job-%j.out"
    job = cluster.sbatch(str(REPO / template), f"--output={log}", *sbatch_args, env=env, cwd=str(REPO))
    return job, tmp_path / f"job-{job}.out"


def run_template(cluster: SlurmCluster, template: str, tmp_path: Path, env: dict[str, str], *sbatch_args: str,
                 timeout: float = 240) -> tuple[dict, str]:
    """Submit, wait for the end; returns (final `scontrol show job` record, the job's output)."""
    job, log = submit(cluster, template, tmp_path, env, *sbatch_args)
    info = cluster.wait_job(job, timeout)
    return info, log.read_text(errors="replace") if log.exists() else ""


def wait_for_log(cluster, job, log, needle, timeout=180, after=""):
    """Poll the job's output until `needle` appears (after the last `after`, when given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if after:
            text = text[text.rindex(after):] if after in text else ""
        if needle in text:
            return
        if cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} never appeared in {log}:\n" + (log.read_text() if log.exists() else "(no log)"))


def wait_requeued(cluster, job, restarts=1, timeout=240):
    """Wait until the job was requeued `restarts` times and runs (or ran) again.

    No shortcut: slurmctld starts the rerun once the hold-off (CRED_EXPIRE + 1 s) has passed,
    exactly as on a production cluster."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        n, state = int(info.get("Restarts", "0")), info.get("JobState")
        if n >= restarts and state in ("RUNNING", "COMPLETING", "COMPLETED"):
            return info
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY") or \
                (n < restarts and state == "COMPLETED"):
            raise AssertionError(f"job {job} ended {state} after {n} requeues, expected {restarts}: {info}\n"
                                 f"{cluster.logs()}")
        if info.get("Reason", "").startswith(("launch_failed", "JobHeld")):
            raise AssertionError(f"job {job} was held after requeue {n}: {info}\n{cluster.logs()}")
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not run again after {restarts} requeue(s) within {timeout}s: "
                         f"{cluster.job(job)}\n{cluster.logs()}")


if __name__ == "__main__":  # manual smoke: python tests/cluster/slurm_cluster.py
    c = SlurmCluster()
    try:
        t = time.monotonic()
        c.start()
        print(f"cluster up in {time.monotonic() - t:.1f}s at {c.root}")
        print(c.host_run(["sinfo"]).stdout)
        print(json.dumps(c.job(1)))
    finally:
        c.stop()
