"""The one exception type for user mistakes (bad flags, data, configs, checkpoints, paths), and the
boundary that reports it.

Library code raises ``UserError`` (or a subclass) with one line naming the file, line and field or
the flag; it never calls ``SystemExit``. Only ``medgpt_ds.cli.main`` and each tool's ``main``, both
wrapped in ``main_boundary``, turn it into ``error: ...`` on stderr and exit status 2 (the
traceback too with ``--debug`` or ``MEDGPT_DEBUG=1``). In a multi-rank job every rank usually meets
the same mistake: rank 0 reports at once, the others wait ``OTHER_RANK_DELAY_S`` first, so the launcher
(torchrun, deepspeed, srun --kill-on-bad-exit) has ended them and the user reads one line, not one per
rank; a mistake only another rank meets is still reported, after the delay, with its rank.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import sys
import time
import traceback
from typing import Callable, Iterator


# torchrun polls its ranks every 0.1 s, deepspeed's launcher every 1 s: both end the others well within this
OTHER_RANK_DELAY_S = 3.0


class UserError(ValueError):
    """A mistake the user can fix; the message is shown as ``error: <message>``."""


class PathNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError)."""


class CheckpointError(UserError):
    """A checkpoint (or its combination with other inputs) that cannot be loaded or converted."""


def main_boundary(main: Callable[[list[str]], object]) -> Callable[[list[str] | None], object]:
    """Wrap a command-line ``main(argv)``: ``--debug`` is taken out of argv; a UserError becomes
    exactly one line ``error: ...`` on stderr and the return value 2 (after its traceback with
    ``--debug`` or ``MEDGPT_DEBUG=1``). Anything else is a bug and propagates with its traceback.
    Returns ``main``'s own value otherwise."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> object:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv or os.environ.get("MEDGPT_DEBUG", "0") not in ("", "0")
        try:
            return main([a for a in argv if a != "--debug"])
        except UserError as e:
            if debug:
                traceback.print_exc()
            message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            rank = _launched_rank()
            if rank:
                # the launcher's SIGTERM must end us now: the trainer's preemption handler would only set a flag
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(OTHER_RANK_DELAY_S)
                message = f"(rank {rank}) {message}"
            print(f"error: {message}", file=sys.stderr, flush=True)
            return 2

    return wrapper


def _launched_rank() -> int:
    """This process's global rank in a multi-rank job started by a launcher (0 otherwise)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return int(os.environ.get("RANK", "0") or 0) if world > 1 else 0
    except ValueError:
        return 0


# Messages of torch's C++ file writer (torch.save) when a write fails: it raises a RuntimeError
# without errno ("unexpected pos N vs M" on a full disk here, "basic_ios::clear: iostream error" and
# "file write failed" elsewhere).
_WRITE_FAILED = ("unexpected pos", "iostream error", "file write failed", "No space left on device", "os error 28")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """A full disk (or quota) while writing ``path`` -> UserError("no space left on device writing
    <path>"), instead of a C++ stream error with no path."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"no space left on device writing {e.filename or path}"
                        f"{' (disk quota exceeded)' if e.errno == errno.EDQUOT else ''}") from e
    except Exception as e:  # noqa: BLE001 - torch/safetensors writers raise RuntimeError / their own types
        if not any(s in str(e) for s in _WRITE_FAILED):
            raise
        free = _free_bytes(path)
        if free is not None and free < 64 * 2**20:
            raise UserError(f"no space left on device writing {path} ({free // 2**20} MiB free)") from e
        raise UserError(f"could not write {path} ({str(e).splitlines()[0][:120]}): disk full or over quota?") from e


def _free_bytes(path: str) -> int | None:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None
