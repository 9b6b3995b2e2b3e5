"""The ONLY place that reads RANK / LOCAL_RANK / WORLD_SIZE / SLURM_*.

Supports `deepspeed`, `torchrun`, `srun python` (SLURM variables mapped here) and plain
`python` (one rank on a free local port).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import zlib
from typing import Any

import torch

_initialized = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _map_slurm_env() -> None:
    """srun starts plain processes: derive the torch.distributed variables from SLURM's."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    needed = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    missing = [k for k in needed if k not in env]
    if missing:
        raise RuntimeError(f"SLURM launch detected but {', '.join(missing)} unset; launch with srun (one task per rank)")
    rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    if not 0 <= rank < world:
        raise RuntimeError(f"inconsistent SLURM variables: SLURM_PROCID={rank} SLURM_NTASKS={world}")
    if "MASTER_ADDR" not in env:
        raise RuntimeError(
            "srun launch needs MASTER_ADDR (the first node's address, e.g. from `scontrol show node`) "
            "and MASTER_PORT exported by the batch script"
        )
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def init(timeout_s: int = 1800) -> None:
    """Initialise torch.distributed through DeepSpeed (nccl on GPU, gloo on CPU)."""
    global _initialized
    if _initialized:
        return
    _map_slurm_env()
    env = os.environ
    if "RANK" not in env:  # plain `python launch/train.py`: a world of one
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if not 0 <= rank < world:
        raise RuntimeError(f"inconsistent launcher variables: RANK={rank} WORLD_SIZE={world}")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    _initialized = True
    unlink_cpu_shm_segment()


def unlink_cpu_shm_segment() -> None:
    """DeepSpeed's CPU all-reduce (when every rank is on one host, LOCAL_SIZE == WORLD_SIZE) gives
    each rank a ~69 MB POSIX shared-memory segment, `/dev/shm/deepspeed_allreduce_buffer_<uid>_
    <MASTER_ADDR>_<MASTER_PORT>_<rank>`, and never unlinks it: every CPU run left 69 MB of RAM per
    rank in /dev/shm until reboot (20 GB after a day of test runs here). Once every rank has mapped
    every other rank's segment (init_distributed returned everywhere: the barrier), the names are
    not needed any more: each rank unlinks its own. The mappings stay valid until the process exits,
    and nothing is left behind even when a rank is killed."""
    from deepspeed.accelerator import get_accelerator

    local_size = os.environ.get("LOCAL_SIZE", "")
    if get_accelerator().device_name() != "cpu" or not local_size.isdigit() or int(local_size) != world_size():
        return
    torch.distributed.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # the shm op is not built/compatible here: DeepSpeed used plain gloo
        pass


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


# --- sequence parallelism (Ulysses) -------------------------------------------------------------
# Ranks [g*N, (g+1)*N) form sequence-parallel group g: they share one sample's tokens, and group g is
# data-parallel rank g. DeepSpeed's parallel_state_sp builds the groups; its module is the `mpu`
# deepspeed.initialize takes (ZeRO then partitions and reduces over all ranks and averages over the
# data-parallel size).

_sp_size = 1


def init_sequence_parallel(size: int) -> None:
    """Build the sequence-parallel groups (after init); size 1 is a no-op. The world size must be a
    multiple of ``size`` (checked, as a user error naming both numbers)."""
    global _sp_size
    if size <= 1 or _sp_size == size:
        return
    if world_size() % size:
        from medgpt_ds.errors import UserError

        raise UserError(f"--sequence_parallel_size {size} does not divide the world size {world_size()}: "
                        f"launch a multiple of {size} ranks")
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size=size)
    _sp_size = size


def sp_size() -> int:
    return _sp_size


def sp_rank() -> int:
    return rank() % _sp_size


def dp_world_size() -> int:
    """Data-parallel size: ranks that see different samples (world / sequence-parallel size)."""
    return world_size() // _sp_size


def dp_rank() -> int:
    return rank() // _sp_size


def sp_mpu():
    """DeepSpeed's sequence-parallel state module (the `mpu` for deepspeed.initialize), or None."""
    if _sp_size == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    return parallel_state_sp


def sp_group():
    return sp_mpu().get_sequence_parallel_group()


def sp_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over this rank's sequence-parallel group, differentiably (the gradient of every
    rank's copy flows back to every rank's contribution); ``t`` itself without sequence parallelism."""
    if _sp_size == 1:
        return t
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=sp_group())


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def on_cuda() -> bool:
    return device().type == "cuda"


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned)."""
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def all_reduce_dict(values: dict[str, Any]) -> dict[str, float]:
    """Sum named numbers (floats or 0-dim tensors) over all ranks in one float64 collective: dict in,
    dict out, same names in the same order. Every rank must pass the same names; a mismatch is an
    error, never a silent mix-up of metrics."""
    names = sorted(values)
    check = float(zlib.crc32("\0".join(names).encode()))  # exact in float64, also summed over ranks
    t = torch.tensor([float(values[k]) for k in names] + [check], dtype=torch.float64, device=device())
    all_reduce_sum(t)
    out = dict(zip(names, t[:-1].tolist()))
    if torch.distributed.is_initialized() and world_size() > 1 and t[-1].item() != check * world_size():
        raise RuntimeError(f"all_reduce_dict: ranks passed different names (rank {rank()}: {', '.join(names)})")
    return {k: out[k] for k in values}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (torch.distributed.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not (torch.distributed.is_initialized() and world_size() > 1):
        return [obj]
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def hostname() -> str:
    return socket.gethostname()


def announce() -> None:
    """Every rank says where it runs (cluster logs need this to debug placement)."""
    print(f"rank {rank()}/{world_size()} on host {hostname()} (local_rank {local_rank()}, device {device()})",
          file=sys.stdout, flush=True)
