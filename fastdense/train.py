"""The trainer's public names, where they have always been imported from.

The code lives in :mod:`fastdense.training` (one module per job: ``trainer``, ``update``,
``checkpointing``, ``outputs``, ``distributed``, ``engine``, ``run_dir``, ``tracking``, ``plots``,
``interrupt``) and :mod:`fastdense.data` (prompt loading); these are the same objects, so
patching ``fastdense.train.Trainer.run`` patches the trainer.
"""

from __future__ import annotations

from fastdense.data import TOY_TRAIN_PROMPTS, is_toy_model, load_prompts, toy_train_prompts  # noqa: F401
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
    "is_toy_model",
    "load_prompts",
    "toy_train_prompts",
    "train",
]
