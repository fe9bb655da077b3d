#!/usr/bin/env python
# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Train a DiNof model: a score network and a normalizing flow prior of x(t*) (Zand et al., TMLR 2024).

Structured like diffusers' examples/unconditional_image_generation/train_unconditional.py. Three modes:

- `--train_component joint` (the published recipe): score network and flow prior from scratch (or from a
  pretrained pipeline), one Adam optimiser on the sum of the score-matching loss and the flow's NLL, gradient clipping
  over both networks, an EMA of each.
- `--train_component score`: the score network only (the flow prior of a pretrained DiNof pipeline is kept as is).
- `--train_component flow`: the flow prior only, on a frozen pretrained score network (a DiNof pipeline, a diffusers
  pipeline with a `unet`, or a plain `UNet2DModel`), which is copied unchanged into the output pipeline.

Examples:

    # the embedded digits (no download), the tiny CPU preset
    accelerate launch training_scripts/train.py --num_channels 1 --resolution 16 --max_train_steps 3000 \\
        --output_dir outputs/digits

    # CIFAR-10, NCSN++ with the VE SDE, as published
    accelerate launch training_scripts/train.py --dataset_name cifar10 --image_column img \\
        --unet_config ncsnpp-cifar10-ve --random_flip --output_dir dinof-cifar10-ve

    # a flow prior for an existing score model
    accelerate launch training_scripts/train.py --train_component flow \\
        --pretrained_model_name_or_path google/ncsnpp-celebahq-256 --dataset_name <celeba-hq> --output_dir out
"""

import argparse
import copy
import json
import logging
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from datasets import load_dataset
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from huggingface_hub import create_repo, hf_hub_download, upload_folder
from huggingface_hub.utils import EntryNotFoundError
from torchvision import transforms
from tqdm.auto import tqdm

from dinof_diffusers.data import load_digits_dataset
from dinof_diffusers.image_utils import image_grid, save_image_atomically
from dinof_diffusers.model_card import create_model_card
from dinof_diffusers.models.flow_prior import FlowPriorModel
from dinof_diffusers.pipelines.dinof import DiNofPipeline
from dinof_diffusers.schedulers import DiNofScheduler
from dinof_diffusers.training_presets import get_preset, list_presets, nearest_published_preset
from dinof_diffusers.training_utils import (
    TrainingImages,
    TrainingState,
    flow_marginal_sample,
    flow_nll_loss,
    list_checkpoints,
    nats_to_bits_per_dim,
    remove_stale_temporary_folders,
    save_checkpoint,
    save_pipeline_atomically,
    score_matching_loss,
    state_dict_hashes,
)

logger = get_logger(__name__, log_level="INFO")

TRAIN_COMPONENTS = ("joint", "score", "flow")


class TrainingError(Exception):
    """A problem the user can fix (arguments that do not fit the model or data, diverging training); no traceback."""


# flag -> the DiNofScheduler / FlowPriorModel setting it overrides
SCHEDULER_FLAGS = {
    "sde": "sde_type",
    "continuous": "continuous",
    "flow_start": "flow_start",
    "sigma_max": "sigma_max",
    "snr": "snr",
}
FLOW_FLAGS = {"flow_num_levels": "num_levels", "flow_depth": "flow_depth", "flow_hidden_channels": "hidden_channels"}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None (those defaults are the preset's, as the help says)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or not action.help:
            return action.help
        return super()._get_help_string(action)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Train a DiNof model (score network + normalizing flow prior).", formatter_class=_HelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A data set on the Hub, or a local folder `datasets.load_dataset` understands. With neither this nor "
        "--train_data_dir: the embedded digits (no download).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="The config of the data set.")
    data.add_argument(
        "--train_data_dir", type=str, default=None, help="A folder of images, read as a `datasets` imagefolder."
    )
    data.add_argument("--image_column", type=str, default="image", help="The data set column holding the images.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded data sets and models are stored.")
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image side length; default: the preset's, or the pretrained UNet's `sample_size`.",
    )
    data.add_argument("--center_crop", action="store_true", help="Center-crop (rather than randomly crop) to size.")
    data.add_argument("--random_flip", action="store_true", help="Randomly flip the images horizontally.")
    data.add_argument(
        "--num_channels",
        type=int,
        default=None,
        choices=[1, 3],
        help="1 (grey) or 3 (RGB): the images are converted to it. Default: 1 for the embedded digits, else the "
        "UNet config's in_channels. A pretrained UNet fixes it.",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses.")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--unet_config",
        type=str,
        default=None,
        help=f"A preset name ({', '.join(list_presets())}) or a JSON file of UNet2DModel arguments. Default: "
        "'tiny' unless --pretrained_model_name_or_path is given.",
    )
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Start from a DiNof pipeline (folder or Hub id with model_index.json; its unet, flow_prior and "
        "scheduler settings), another diffusers pipeline with a `unet` subfolder, or a plain UNet2DModel (config.json).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument(
        "--sde", type=str, default=None, choices=["ve", "vp", "subvp"], help="The SDE; default: the preset's."
    )
    model.add_argument(
        "--continuous",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Continuous-time training (else the discrete SMLD / DDPM chain); default: the preset's.",
    )
    model.add_argument(
        "--flow_start", type=float, default=None, help="t* / T where the flow hands over; default: the preset's (0.6)."
    )
    model.add_argument("--sigma_max", type=float, default=None, help="VE sigma_max; default: the preset's.")
    model.add_argument("--snr", type=float, default=None, help="Langevin corrector snr; default: the preset's.")
    model.add_argument("--flow_num_levels", type=int, default=None, help="Glow levels L; default: the preset's.")
    model.add_argument("--flow_depth", type=int, default=None, help="Glow steps per level K; default: the preset's.")
    model.add_argument(
        "--flow_hidden_channels", type=int, default=None, help="Glow coupling width; default: the preset's."
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--train_component",
        type=str,
        default="joint",
        choices=TRAIN_COMPONENTS,
        help="joint: both networks, one optimiser (published); score: the UNet only; flow: the flow prior only, on "
        "the frozen UNet of --pretrained_model_name_or_path.",
    )
    training.add_argument("--output_dir", type=str, default="dinof-model", help="Pipeline, checkpoints and logs.")
    training.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, data order and noise.")
    training.add_argument(
        "--train_batch_size", type=int, default=None, help="Batch size per process; default: the preset's."
    )
    training.add_argument("--num_epochs", type=int, default=100, help="Ignored when --max_train_steps is given.")
    training.add_argument("--max_train_steps", type=int, default=None, help="Optimisation steps in total.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimisation step.")
    training.add_argument("--learning_rate", type=float, default=None, help="Adam learning rate (preset: 2e-4).")
    training.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant_with_warmup",
        help="A diffusers learning rate schedule; the published one is linear warm-up, then constant.",
    )
    training.add_argument("--lr_warmup_steps", type=int, default=None, help="Warm-up steps (preset: 5000).")
    training.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    training.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    training.add_argument("--adam_weight_decay", type=float, default=0.0, help="Adam (L2) weight decay.")
    training.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping over all networks.")
    training.add_argument(
        "--loss_reduction",
        type=str,
        default=None,
        choices=["mean", "sum"],
        help="Per-sample score loss: mean over dimensions or 0.5 * sum; default: the preset's.",
    )
    training.add_argument(
        "--score_time_range",
        type=str,
        default="t_star",
        choices=["t_star", "full"],
        help="Times the score network is trained on: t_star: U(eps, T) * flow_start, as published (the DiNof "
        "sampler never goes above t*); full: U(eps, T), so that the baseline sampler from T (use_flow_prior=False) "
        "can be run with the same network, e.g. to compare the two.",
    )
    training.add_argument(
        "--flow_loss_weight", type=float, default=1.0, help="Weight of the flow NLL (nats) in the summed loss."
    )
    training.add_argument(
        "--use_ema", action=argparse.BooleanOptionalAction, default=True, help="EMA of each trained network."
    )
    training.add_argument("--ema_decay", type=float, default=None, help="EMA decay; default: the preset's.")
    training.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast precision; default: accelerate's configuration.",
    )
    training.add_argument(
        "--max_consecutive_nonfinite",
        type=int,
        default=20,
        help="Stop after this many optimisation steps in a row skipped for a non-finite loss or gradient norm.",
    )

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument("--checkpointing_steps", type=int, default=500, help="Save the training state every N.")
    checkpoints.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    checkpoints.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint folder, or 'latest' for the newest in --output_dir (a fresh start if there is none).",
    )

    logs = parser.add_argument_group("logging and samples")
    logs.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, inside --output_dir.")
    logs.add_argument("--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', 'all' or 'none'.")
    logs.add_argument("--save_images_steps", type=int, default=500, help="Sample a grid every N steps.")
    logs.add_argument("--num_sample_images", type=int, default=16, help="Images in the sample grid.")
    logs.add_argument(
        "--sample_num_inference_steps", type=int, default=None, help="Reverse steps of the grid; default: N*t*."
    )
    logs.add_argument("--sample_seed", type=int, default=0, help="Seed of the sample grids.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub at the end.")
    hub.add_argument("--hub_model_id", type=str, default=None, help="Repository id; default: the output folder name.")
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token; default: the stored login.")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")

    debug = parser.add_argument_group("debugging (used by the tests)")
    debug.add_argument(
        "--debug_hash_dir",
        type=str,
        default=None,
        help="At the end, every process writes `rank<i>.json` here: SHA-256 of every parameter, buffer and EMA "
        "weight, to check that the replicas are identical.",
    )
    debug.add_argument(
        "--debug_nonfinite_steps",
        type=int,
        nargs="*",
        default=[],
        help="Make the loss NaN on the first micro-batch of these optimisation steps (1-based).",
    )

    args = parser.parse_args(input_args)
    validate_args(parser, args)
    return args


def validate_args(parser, args):
    """Checks the arguments before anything heavy is loaded; `parser.error` names the offending flag."""
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("--dataset_name and --train_data_dir are exclusive: give one of them (or neither for digits).")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        parser.error(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
    if args.unet_config is not None and args.pretrained_model_name_or_path is not None:
        parser.error(
            "--unet_config and --pretrained_model_name_or_path are exclusive: a pretrained UNet has a config."
        )
    if args.train_component == "flow" and args.pretrained_model_name_or_path is None:
        parser.error(
            "--train_component flow trains the flow on a frozen score network: give it with "
            "--pretrained_model_name_or_path."
        )
    if args.pretrained_model_name_or_path is not None:
        path = args.pretrained_model_name_or_path
        if os.path.isdir(path):
            if not any(os.path.isfile(os.path.join(path, f)) for f in ("model_index.json", "config.json")):
                parser.error(f"--pretrained_model_name_or_path {path!r} has neither model_index.json nor config.json.")
        elif os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
            parser.error(f"--pretrained_model_name_or_path {path!r} is neither a model folder nor a Hub id.")
    if args.pretrained_model_name_or_path is None and args.unet_config is None:
        args.unet_config = "tiny"

    positive = [
        "resolution", "train_batch_size", "num_epochs", "max_train_steps", "gradient_accumulation_steps",
        "checkpointing_steps", "checkpoints_total_limit", "save_images_steps", "num_sample_images",
        "sample_num_inference_steps", "max_consecutive_nonfinite", "flow_num_levels", "flow_depth",
        "flow_hidden_channels",
    ]  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}.")
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.flow_start is not None and not 0.0 < args.flow_start <= 1.0:
        parser.error(f"--flow_start must lie in (0, 1], got {args.flow_start}.")
    for name in ("learning_rate", "sigma_max", "snr", "max_grad_norm"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}.")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema_decay must lie in [0, 1), got {args.ema_decay}.")
    if args.flow_loss_weight < 0:
        parser.error(f"--flow_loss_weight must be >= 0, got {args.flow_loss_weight}.")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        parser.error(f"--report_to must be 'tensorboard', 'wandb', 'all' or 'none', got {args.report_to!r}.")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a folder (or 'latest').")

    # The UNet config, when it comes from a preset or a file, is checked here; a pretrained one after loading.
    if args.unet_config is not None:
        try:
            unet_config, base_preset = load_unet_config(args.unet_config)
        except (KeyError, OSError, ValueError) as error:
            parser.error(f"--unet_config: {error}")
        resolution = args.resolution or unet_config.get("sample_size") or base_preset.resolution
        num_levels = args.flow_num_levels or base_preset.flow_config["num_levels"]
        sde = args.sde or base_preset.scheduler_config["sde_type"]
        try:
            check_model_settings(unet_config, resolution, num_levels, sde)
        except ValueError as error:
            parser.error(str(error))


def public_config(config):
    """A diffusers config as a plain dict, without its private `_*` entries."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def load_unet_config(unet_config):
    """A preset name or a JSON file -> (UNet2DModel kwargs, the preset giving the remaining defaults)."""
    if unet_config.endswith(".json") or os.path.isfile(unet_config):
        with open(unet_config) as handle:
            config = json.load(handle)
        if not isinstance(config, dict):
            raise ValueError(f"{unet_config!r} must hold a JSON object of UNet2DModel arguments.")
        return public_config(config), nearest_published_preset(config.get("time_embedding_type", "positional"))
    preset = get_preset(unet_config)
    return preset.get_unet_config(), preset


def check_model_settings(unet_config, resolution, num_levels, sde):
    """Raises `ValueError` naming the flags if the resolution, the flow depth and the SDE do not fit the UNet."""
    unet_factor = 2 ** (len(unet_config.get("down_block_types", ())) - 1)
    flow_factor = 2**num_levels
    if resolution % flow_factor:
        raise ValueError(
            f"--resolution {resolution} must be divisible by 2 ** --flow_num_levels = {flow_factor} (the flow "
            "squeezes the image once per level)."
        )
    if resolution % unet_factor:
        raise ValueError(f"--resolution {resolution} must be divisible by {unet_factor}, the UNet's downsampling.")
    if unet_config.get("time_embedding_type", "positional") == "fourier" and sde != "ve":
        raise ValueError(
            f"--sde {sde} needs an epsilon-prediction UNet (positional time embedding); this UNet has a Fourier "
            "time embedding and divides its output by sigma, a VE score model (use --sde ve)."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def translate_scheduler_config(config):
    """DiNofScheduler settings equivalent to another diffusers scheduler's config (ScoreSdeVe, DDPM/DDIM linear)."""
    name = config.get("_class_name", "")
    if name == "DiNofScheduler":
        return public_config(config)
    if name == "ScoreSdeVeScheduler":
        settings = {"sde_type": "ve", "continuous": True, "prediction_type": "score"}
        for key in ("sigma_min", "sigma_max", "snr", "num_train_timesteps"):
            if key in config:
                settings[key] = config[key]
        return settings
    if name in ("DDPMScheduler", "DDIMScheduler") and config.get("beta_schedule", "linear") == "linear":
        steps = config.get("num_train_timesteps", 1000)
        return {
            "sde_type": "vp",
            "continuous": False,
            "prediction_type": "epsilon",
            "num_train_timesteps": steps,
            "beta_min": config.get("beta_start", 1e-4) * steps,
            "beta_max": config.get("beta_end", 0.02) * steps,
        }
    return {}


def load_pretrained(args):
    """-> (unet, flow_prior or None, scheduler settings) from --pretrained_model_name_or_path."""
    path = args.pretrained_model_name_or_path
    hub_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}

    def find(filename):
        if os.path.isdir(path):
            local = os.path.join(path, filename)
            return local if os.path.isfile(local) else None
        try:
            return hf_hub_download(path, filename, **hub_kwargs)
        except EntryNotFoundError:
            return None

    index_file = find("model_index.json")
    if index_file is None:  # a plain UNet2DModel
        return UNet2DModel.from_pretrained(path, **hub_kwargs), None, {}
    with open(index_file) as handle:
        index = json.load(handle)
    if index.get("_class_name") == "DiNofPipeline":
        pipeline = DiNofPipeline.from_pretrained(path, **hub_kwargs)
        return pipeline.unet, pipeline.flow_prior, translate_scheduler_config(dict(pipeline.scheduler.config))
    unet = UNet2DModel.from_pretrained(path, subfolder="unet", **hub_kwargs)
    scheduler_file = find("scheduler/scheduler_config.json")
    settings = {}
    if scheduler_file is not None:
        with open(scheduler_file) as handle:
            settings = translate_scheduler_config(json.load(handle))
    return unet, None, settings


def build_models(args, is_digits):
    """The UNet, the flow prior (or None) and the scheduler; resolves every preset default into `args`."""
    flow_prior, pretrained_scheduler = None, {}
    if args.pretrained_model_name_or_path is not None:
        unet, flow_prior, pretrained_scheduler = load_pretrained(args)
        preset = nearest_published_preset(unet.config.time_embedding_type)
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        if args.resolution not in (None, size):
            raise TrainingError(
                f"--resolution {args.resolution} differs from the pretrained UNet's sample_size {size}."
            )
        if args.num_channels not in (None, unet.config.in_channels):
            raise TrainingError(
                f"--num_channels {args.num_channels} differs from the pretrained UNet's in_channels "
                f"{unet.config.in_channels}."
            )
        args.resolution = size
    else:
        unet_config, preset = load_unet_config(args.unet_config)
        args.resolution = args.resolution or unet_config.get("sample_size") or preset.resolution
        channels = args.num_channels or (1 if is_digits else unet_config.get("in_channels", 3))
        unet_config.update(sample_size=args.resolution, in_channels=channels, out_channels=channels)
        unet = UNet2DModel(**unet_config)
    args.num_channels = unet.config.in_channels

    # training settings: explicit flags, else the preset (or the published preset nearest to the pretrained UNet)
    for name in ("train_batch_size", "learning_rate", "lr_warmup_steps", "loss_reduction", "ema_decay"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))

    # scheduler: preset < pretrained model's scheduler < flags; the UNet's time embedding fixes the parameterisation
    scheduler_config = {**preset.scheduler_config, **pretrained_scheduler}
    for flag, key in SCHEDULER_FLAGS.items():
        if getattr(args, flag) is not None:
            scheduler_config[key] = getattr(args, flag)
    scheduler_config["prediction_type"] = "score" if unet.config.time_embedding_type == "fourier" else "epsilon"
    try:
        scheduler = DiNofScheduler(**scheduler_config)
    except ValueError as error:
        raise TrainingError(
            f"the scheduler settings (--sde, --continuous, --flow_start, --sigma_max, --snr): {error}"
        ) from None
    for flag, key in SCHEDULER_FLAGS.items():
        setattr(args, flag, scheduler.config[key])

    # flow prior: the pretrained pipeline's, else a new one (not for score-only training from a bare score network)
    if flow_prior is not None:
        for flag, key in FLOW_FLAGS.items():
            if getattr(args, flag) not in (None, flow_prior.config[key]):
                raise TrainingError(
                    f"--{flag} {getattr(args, flag)} differs from the pretrained flow prior's {key} "
                    f"{flow_prior.config[key]}; the pretrained flow is trained further as it is."
                )
            setattr(args, flag, flow_prior.config[key])
    else:
        for flag, key in FLOW_FLAGS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, preset.flow_config[key])
        if args.train_component != "score":
            flow_prior = FlowPriorModel(
                sample_size=args.resolution,
                in_channels=args.num_channels,
                num_levels=args.flow_num_levels,
                flow_depth=args.flow_depth,
                hidden_channels=args.flow_hidden_channels,
            )
    try:
        check_model_settings(dict(unet.config), args.resolution, args.flow_num_levels, args.sde)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    return unet, flow_prior, scheduler


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_training_dataset(args):
    """The training images as a `datasets.Dataset`, and a description of them for the model card."""
    if args.dataset_name is not None:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        description = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
    elif args.train_data_dir is not None:
        dataset = load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir, split="train")
        description = f"the images in {args.train_data_dir}"
    else:
        dataset = load_digits_dataset(resolution=args.resolution)
        description = "the scikit-learn handwritten digits (embedded, 1797 images)"
    if args.image_column not in dataset.column_names:
        raise TrainingError(
            f"--image_column {args.image_column!r} is not a column of the data set: {dataset.column_names}."
        )
    return dataset, description


def image_transforms(args, data_range, augment=True):
    """PIL image -> tensor (C, H, W) in `data_range`, with C = --num_channels."""
    low, high = data_range
    steps = [
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution)
        if args.center_crop or not augment
        else transforms.RandomCrop(args.resolution),
    ]
    if args.random_flip and augment:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Lambda(lambda x: x * (high - low) + low)]
    compose = transforms.Compose(steps)
    mode = "L" if args.num_channels == 1 else "RGB"
    return lambda image: compose(image.convert(mode))


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def averaged_copy(model, ema):
    """A copy of the (unwrapped) `model` for inference and saving, with the EMA weights when there is an EMA."""
    if model is None:
        return None
    averaged = copy.deepcopy(model).eval()
    if ema is not None:
        ema.copy_to(averaged.parameters())
    return averaged


def make_pipeline(unet, flow_prior, scheduler):
    """A DiNofPipeline around the given networks (with a scheduler of its own: sampling sets its timesteps)."""
    pipeline = DiNofPipeline(unet=unet, scheduler=DiNofScheduler.from_config(scheduler.config), flow_prior=flow_prior)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_images(args, pipeline, scheduler, reference_images):
    """The sample grid's images (B, C, H, W) in [0, 1] (fixed seed), and the number of network evaluations.

    Without a flow prior, x(t*) is drawn from the data marginal at t* of fixed training images, which shows what the
    score network alone does from t*.
    """
    generator = torch.Generator(device="cpu").manual_seed(args.sample_seed)
    prior_sample = None
    if pipeline.flow_prior is None:
        prior_sample = flow_marginal_sample(scheduler, reference_images, generator=generator)
    output = pipeline(
        batch_size=args.num_sample_images,
        num_inference_steps=args.sample_num_inference_steps,
        generator=generator,
        prior_sample=prior_sample,
        output_type="pt",
    )
    return output.images, output.nfe


def main(args):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # The data order depends on (seed, epoch) only, so that a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_stale_temporary_folders(args.output_dir)
    set_seed(args.seed)

    # 1. models and scheduler
    is_digits = args.dataset_name is None and args.train_data_dir is None
    unet, flow_prior, scheduler = build_models(args, is_digits)
    train_unet = args.train_component in ("joint", "score")
    train_flow = args.train_component in ("joint", "flow")
    trained_models = ([unet] if train_unet else []) + ([flow_prior] if train_flow else [])
    for model in (unet, flow_prior):
        if model is not None:
            model.requires_grad_(model in trained_models)
            model.train(model in trained_models)
    if not train_unet:
        unet.to(accelerator.device)
    if flow_prior is not None and not train_flow:
        flow_prior.to(accelerator.device)

    # the score network's training times: those of a scheduler with t* = T for --score_time_range full
    score_scheduler = scheduler
    if args.score_time_range == "full":
        score_scheduler = DiNofScheduler.from_config(scheduler.config, flow_start=1.0)

    # 2. data
    dataset, dataset_description = load_training_dataset(args)
    # fixed images whose x(t*) starts the sample grids when there is no flow prior (no augmentation, no RNG)
    plain = image_transforms(args, scheduler.data_range, augment=False)
    reference_images = torch.stack(
        [plain(dataset[i % len(dataset)][args.image_column]) for i in range(args.num_sample_images)]
    )
    train_images = TrainingImages(
        dataset, args.image_column, image_transforms(args, scheduler.data_range), seed=args.seed
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_images,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        # the loader's own generator, so that creating an iterator (which draws a worker seed) leaves the global RNG
        # alone: a resumed run creates one at a different point of the run than the original
        generator=torch.Generator().manual_seed(args.seed),
    )

    # 3. optimiser: one Adam over every trained network (the published joint recipe), linear warm-up
    trained_parameters = [p for model in trained_models for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(
        trained_parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    prepared = accelerator.prepare(*trained_models, optimizer, train_dataloader)
    *trained_models, optimizer, train_dataloader = prepared
    if train_unet:
        unet = trained_models[0]
    if train_flow:
        flow_prior = trained_models[-1]
    if len(train_dataloader) == 0:
        raise TrainingError(
            f"The data set has {len(dataset)} images, fewer than one batch per process (--train_batch_size "
            f"{args.train_batch_size})."
        )

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # Stepped once per optimisation step by this script (not through accelerate, which would step it once per
    # process), so warm-up counts optimisation steps whatever the number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer.optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )

    # 4. EMA of every trained network (created after `prepare`, which made the replicas identical)
    networks = {"unet": unet, "flow_prior": flow_prior}  # None for a missing flow prior; prepared when trained
    emas = {}
    if args.use_ema:
        for name, trained in (("unet", train_unet), ("flow_prior", train_flow)):
            if trained:
                emas[name] = EMAModel(accelerator.unwrap_model(networks[name]).parameters(), decay=args.ema_decay)
    state = TrainingState()
    accelerator.register_for_checkpointing(lr_scheduler, state, *emas.values())

    # 5. resume
    if args.resume_from_checkpoint is not None:
        if args.resume_from_checkpoint == "latest":
            checkpoints = list_checkpoints(args.output_dir)
            path = checkpoints[-1] if checkpoints else None
        else:
            path = args.resume_from_checkpoint
        if path is None:
            logger.info("No checkpoint in %s: starting a new run.", args.output_dir)
        else:
            logger.info("Resuming from %s", path)
            accelerator.load_state(path)
            for ema in emas.values():
                ema.to(accelerator.device)
    # Every process draws its own noise from here on (and a resumed run restores these RNG states).
    if args.resume_from_checkpoint is None or state.global_step == 0:
        set_seed(args.seed, device_specific=True)
    first_epoch = state.global_step // steps_per_epoch
    skip_batches = (state.global_step % steps_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process:
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("dinof", config=tracker_config)

    num_dims = args.num_channels * args.resolution**2
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training (%s) *****", args.train_component)
    logger.info("  Examples = %d, total batch size = %d", len(dataset), total_batch)
    logger.info("  Optimisation steps = %d, starting at %d", args.max_train_steps, state.global_step)
    logger.info("  UNet parameters = %d", sum(p.numel() for p in accelerator.unwrap_model(unet).parameters()))
    if flow_prior is not None:
        logger.info(
            "  Flow parameters = %d", sum(p.numel() for p in accelerator.unwrap_model(flow_prior).parameters())
        )

    def averaged_networks():
        """Copies of the UNet and the flow prior (or None) with the EMA weights of the trained ones."""
        return [
            averaged_copy(accelerator.unwrap_model(model) if model is not None else None, emas.get(name))
            for name, model in networks.items()
        ]

    last_grid = {}  # step -> (grid, nfe) of the latest grid, reused for the model card at the end

    def save_sample_grid(step):
        """Samples with the EMA weights on the main process; writes the grid and logs it."""
        if step in last_grid:
            return last_grid[step]
        pipeline = make_pipeline(*averaged_networks(), scheduler)
        images, nfe = sample_images(args, pipeline, scheduler, reference_images.to(accelerator.device))
        grid = image_grid(images, scale=max(1, 64 // args.resolution))
        save_image_atomically(grid, os.path.join(args.output_dir, "samples", f"step-{step:07d}.png"))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": images.cpu().numpy()}, step=step, dataformats="NCHW")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [grid]}, step=step)
        last_grid.clear()
        last_grid[step] = (grid, nfe)
        return grid, nfe

    # 6. the training loop
    progress_bar = tqdm(
        total=args.max_train_steps, initial=state.global_step, disable=not accelerator.is_local_main_process
    )
    progress_bar.set_description("Steps")
    window_losses, window_batches, window_finite = torch.zeros(2, device=accelerator.device), 0, True
    consecutive_nonfinite = 0
    for epoch in range(first_epoch, num_epochs):
        if state.global_step >= args.max_train_steps:
            break
        train_dataloader.set_epoch(epoch)  # the order of the batches
        train_images.set_epoch(epoch)  # their augmentation
        epoch_dataloader = train_dataloader
        if epoch == first_epoch and skip_batches > 0:
            epoch_dataloader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in epoch_dataloader:
            clean_images = batch["input"]
            with accelerator.accumulate(*trained_models):
                # per-sample losses, (B, 2): score matching, flow NLL in nats (zero for a network not trained)
                losses = torch.zeros(clean_images.shape[0], 2, device=clean_images.device)
                loss = 0.0
                if train_unet:
                    score_losses = score_matching_loss(unet, score_scheduler, clean_images, reduce=args.loss_reduction)
                    loss, losses[:, 0] = loss + score_losses.mean(), score_losses.detach()
                if train_flow:
                    flow_nlls = flow_nll_loss(flow_prior, scheduler, clean_images)
                    loss, losses[:, 1] = loss + args.flow_loss_weight * flow_nlls.mean(), flow_nlls.detach()
                if window_batches == 0 and state.global_step + 1 in args.debug_nonfinite_steps:
                    loss, losses = loss * float("nan"), losses * float("nan")
                accelerator.backward(loss)

                # the same decision on every process: from the losses of all of them
                gathered = accelerator.gather(losses)
                window_finite = window_finite and bool(torch.isfinite(gathered).all())
                window_losses += gathered.mean(dim=0)
                window_batches += 1

                stepped, grad_norm = False, None
                if accelerator.sync_gradients:
                    if window_finite:
                        grad_norm = accelerator.clip_grad_norm_(trained_parameters, args.max_grad_norm)
                        # with fp16 the grad scaler skips inf/nan gradients itself (and lowers its scale)
                        if args.mixed_precision != "fp16" and not torch.isfinite(grad_norm):
                            window_finite = False
                    if window_finite:
                        optimizer.step()
                        stepped = not accelerator.optimizer_step_was_skipped
                    optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue

            # one optimisation step is over (taken or skipped)
            state.global_step += 1
            progress_bar.update(1)
            learning_rate = lr_scheduler.get_last_lr()[0]  # the one this step used
            if stepped:
                lr_scheduler.step()
                for name, ema in emas.items():
                    ema.step(accelerator.unwrap_model(networks[name]).parameters())
            if not window_finite:
                state.nonfinite_steps += 1
                consecutive_nonfinite += 1
                logger.warning("Step %d skipped: non-finite loss or gradient norm.", state.global_step)
            else:
                consecutive_nonfinite = 0

            window_losses /= window_batches
            logs = {"lr": learning_rate, "nonfinite_steps": state.nonfinite_steps}
            if train_unet:
                logs["score_loss"] = window_losses[0].item()
            if train_flow:
                logs["flow_nll_bpd"] = nats_to_bits_per_dim(window_losses[1].item(), num_dims)
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm.item()
            if emas and next(iter(emas.values())).cur_decay_value is not None:
                logs["ema_decay"] = next(iter(emas.values())).cur_decay_value
            progress_bar.set_postfix(**{k: logs[k] for k in ("score_loss", "flow_nll_bpd") if k in logs})
            accelerator.log(logs, step=state.global_step)
            window_losses, window_batches, window_finite = torch.zeros(2, device=accelerator.device), 0, True

            if consecutive_nonfinite >= args.max_consecutive_nonfinite:
                checkpoints = list_checkpoints(args.output_dir)
                accelerator.end_training()
                raise TrainingError(
                    f"Stopping at step {state.global_step}: {consecutive_nonfinite} optimisation steps in a row had a "
                    f"non-finite loss or gradient norm (--max_consecutive_nonfinite {args.max_consecutive_nonfinite}). "
                    f"No weights were updated by them; the last checkpoint is "
                    f"{checkpoints[-1] if checkpoints else 'none (no checkpoint was saved yet)'}."
                )

            if state.global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(accelerator, args.output_dir, state.global_step, args.checkpoints_total_limit)
                logger.info("Saved state to %s", path)

            if state.global_step % args.save_images_steps == 0:
                if accelerator.is_main_process:
                    save_sample_grid(state.global_step)
                accelerator.wait_for_everyone()

            if state.global_step >= args.max_train_steps:
                break
    progress_bar.close()
    accelerator.wait_for_everyone()

    # 7. the end: per-process hashes (debugging), then the pipeline with the EMA weights and its model card
    if args.debug_hash_dir is not None:
        hashes = {}
        for (name, model), averaged in zip(networks.items(), averaged_networks()):
            if model is not None:
                hashes[name] = state_dict_hashes(accelerator.unwrap_model(model))
                hashes[f"ema_{name}"] = state_dict_hashes(averaged)
        os.makedirs(args.debug_hash_dir, exist_ok=True)
        with open(os.path.join(args.debug_hash_dir, f"rank{accelerator.process_index}.json"), "w") as handle:
            json.dump(hashes, handle, indent=1, sort_keys=True)

    if accelerator.is_main_process:
        grid, nfe = save_sample_grid(state.global_step)
        final_unet, final_flow = averaged_networks()
        pipeline = make_pipeline(final_unet, final_flow, scheduler)

        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        training_config = {
            "train_component": args.train_component,
            "steps": state.global_step,
            "nonfinite_steps_skipped": state.nonfinite_steps,
            "total_batch_size": total_batch,
            "unet": args.unet_config or args.pretrained_model_name_or_path,
            "resolution": args.resolution,
            "num_channels": args.num_channels,
            "scheduler": public_config(pipeline.scheduler.config),
            "flow_prior": public_config(final_flow.config) if final_flow is not None else None,
            "optimizer": {
                "name": "Adam",
                "learning_rate": args.learning_rate,
                "lr_scheduler": args.lr_scheduler,
                "lr_warmup_steps": args.lr_warmup_steps,
                "betas": [args.adam_beta1, args.adam_beta2],
                "eps": args.adam_epsilon,
                "weight_decay": args.adam_weight_decay,
                "max_grad_norm": args.max_grad_norm,
            },
            "loss_reduction": args.loss_reduction,
            "score_time_range": "[eps, T]" if args.score_time_range == "full" else "[eps, T] * flow_start",
            "flow_loss_weight": args.flow_loss_weight,
            "ema_decay": args.ema_decay if args.use_ema else None,
            "mixed_precision": accelerator.mixed_precision,
            "seed": args.seed,
        }
        training_config = json.loads(json.dumps(training_config, default=str))
        card = create_model_card(
            repo_id if args.push_to_hub else args.output_dir,
            dataset_description,
            training_config,
            args.train_component,
            hub_datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else None,
            samples_description=(
                f"{args.num_sample_images} samples of the {'EMA ' if emas else ''}weights after {state.global_step} "
                f"steps, seed {args.sample_seed}, {nfe} score-network evaluations per image."
            ),
            base_model=args.pretrained_model_name_or_path,
            score_trained_to_T=args.score_time_range == "full",
        )
        save_pipeline_atomically(
            pipeline,
            args.output_dir,
            extra_files={"README.md": card.save, "samples.png": lambda path: grid.save(path)},
        )
        logger.info("Saved the pipeline to %s", args.output_dir)

        if args.push_to_hub:
            repo_id = create_repo(repo_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message=f"DiNof, {state.global_step} steps",
                ignore_patterns=["checkpoint-*", ".tmp-*", f"{args.logging_dir}/*", "samples/*"],
                token=args.hub_token,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except TrainingError as error:
        sys.exit(f"error: {error}")
