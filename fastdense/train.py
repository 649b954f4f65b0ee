"""The trainer's public names, where they have always been imported from.

The code lives in :mod:`fastdense.training` (one module per job: ``trainer``, ``update``,
``checkpointing``, ``outputs``, ``distributed``, ``engine``, ``run_dir``, ``tracking``, ``plots``,
``interrupt``) and :mod:`fastdense.data` (prompt loading); these are the same objects, so
patching ``fastdense.train.Trainer.run`` patches the trainer. The toy world's prompt helpers that
used to live here (``toy_train_prompts``, ``TOY_TRAIN_PROMPTS``, ``is_toy_model``) moved to
:mod:`fastdense.toy`; they stay importable from here, resolved by name on first use.
"""

from __future__ import annotations

from fastdense.data import load_prompts
from fastdense.training.distributed import SHM_ENV_VAR, DistInfo, init_distributed, resolve_device  # noqa: F401
from fastdense.training.engine import LRFactor, deepspeed_config  # noqa: F401
from fastdense.training.outputs import Evaluation  # noqa: F401
from fastdense.training.run_dir import (  # noqa: F401
    check_run_dir,
    default_run_dir,
    resolve_run_dir,
    resume_checkpoint,
)
from fastdense.training.trainer import LATENT_DTYPES, StepCallback, Trainer, TrainResult, train  # noqa: F401
from fastdense.training.update import MicroBatchResult

# Every name imported above is importable from here, as before; __all__ lists the public API.
__all__ = [
    "DistInfo",
    "MicroBatchResult",
    "TrainResult",
    "Trainer",
    "check_run_dir",
    "deepspeed_config",
    "default_run_dir",
    "init_distributed",
    "load_prompts",
    "train",
]

# Moved to the toy world (the trainer never imports it): resolved by name when asked for.
_MOVED = {
    "toy_train_prompts": "fastdense.toy.world:train_prompts",
    "TOY_TRAIN_PROMPTS": "fastdense.toy.world:TRAIN_PROMPT_COUNT",
    "is_toy_model": "fastdense.toy:is_toy_model",
}


def __getattr__(name: str):
    if name in _MOVED:
        from fastdense.data import resolve_provider

        return resolve_provider(_MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
