"""Training DiNof models: the library side of training_scripts/train.py.

- `run_config`: `RunConfig`, `resolve_run_config(args)` (preset < pretrained model < flags) and `build_models(run)`.
- `losses`: `score_matching_loss`, `flow_nll_loss` (docs/DESIGN.md, "Training").
- `presets`: the published configurations (`get_preset`, `list_presets`).
- `data`: the data set of a run, its transforms, reproducible augmentation (`TrainingImages`).
- `checkpoints`: the run's counters, `checkpoint-<step>` folders and the saved pipeline, all written atomically.
- `samples`: the sample grids; `model_card`: the README.md beside the trained pipeline.
- `gaussian_prior`: `fit_gaussian_prior(run)`, `--train_component gaussian_prior` (a closed-form prior, no training).
"""

from .checkpoints import (
    TrainingState,
    checkpoint_to_resume,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
    save_pipeline_atomically,
)
from .losses import flow_marginal_sample, flow_nll_loss, nats_to_bits_per_dim, score_matching_loss
from .presets import PRESETS, TrainingPreset, get_preset, list_presets, nearest_published_preset
from .run_config import RunConfig, TrainingError, build_models, resolve_run_config

__all__ = [
    "PRESETS",
    "RunConfig",
    "TrainingError",
    "TrainingPreset",
    "TrainingState",
    "build_models",
    "checkpoint_to_resume",
    "flow_marginal_sample",
    "flow_nll_loss",
    "get_preset",
    "list_checkpoints",
    "list_presets",
    "nats_to_bits_per_dim",
    "nearest_published_preset",
    "prune_checkpoints",
    "resolve_run_config",
    "save_checkpoint",
    "save_pipeline_atomically",
    "score_matching_loss",
]
