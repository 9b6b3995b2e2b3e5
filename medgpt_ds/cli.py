"""`launch/train.py --stage ...`: parse the run config and hand it to the stage module."""
from __future__ import annotations

import importlib
import os

from medgpt_ds.config import STAGES, _split_stage, parse_args
from medgpt_ds.errors import UserError, main_boundary
from medgpt_ds.metrics import quiet_progress_bars_in_files, show_each_warning_once
from medgpt_ds.model import check_model_files

# stage -> module; each module has run(cfg) and may define `Arguments` (its own flags)
STAGE_MODULES = {s: f"medgpt_ds.stages.{s}" for s in STAGES}


@main_boundary
def main(argv: list[str]) -> int:
    """Run one stage. A user mistake (UserError) ends as one line ``error: ...`` and exit status 2,
    before any rank loads a model when the inputs allow it (see errors.main_boundary)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    show_each_warning_once()
    quiet_progress_bars_in_files()
    stage = _split_stage(argv)
    if stage not in STAGE_MODULES:
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    try:
        module = importlib.import_module(STAGE_MODULES[stage])
    except ModuleNotFoundError as e:
        if e.name == STAGE_MODULES[stage]:
            raise UserError(f"stage {stage!r} is not available in this version of medgpt-ds") from None
        raise
    cfg = parse_args(argv, {stage: getattr(module, "Arguments", None)})
    check_model_files(cfg.model)  # before any rank starts: a missing tokenizer or weights file, named
    state = module.run(cfg)
    _shutdown()
    return 0 if state is not None else 1


def _shutdown() -> None:
    """Tear the process group down before interpreter exit: leaving gloo's threads to static
    destructors can abort a finished run at exit ("terminate called without an active exception")."""
    import gc

    import torch

    # DeepSpeed engines live in reference cycles (module hooks): free them, and the pending
    # collective handles they keep, while the process group is still alive.
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
