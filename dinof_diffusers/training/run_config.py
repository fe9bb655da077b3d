"""The settings of a training run, resolved once: preset < pretrained model < flags.

`resolve_run_config(args)` turns the parsed flags of `training_scripts/train.py` (any object with those attributes;
missing ones take their defaults) into a frozen `RunConfig`: every default filled in from the preset or the
pretrained model, every flag checked, every contradiction between flags an error that names both. It reads only
configuration files (config.json, model_index.json, scheduler_config.json), so a bad run stops before any weights or
data are loaded. `build_models(run)` then makes the score network, the flow prior and the scheduler.

Where a setting comes from:
- the score network: `--unet_config` (a preset name or a JSON file of the network's arguments, whose `_class_name`
  is "UNet2DModel" (the default) or "NCSNppModel"; "tiny" by default), or `--pretrained_model_name_or_path`: a DiNof
  pipeline (its unet, flow_prior and scheduler settings, e.g. one written by dinof-convert-checkpoint), another
  diffusers pipeline with a `unet` (its scheduler translated when it is ScoreSdeVe or linear DDPM / DDIM) or a plain
  `UNet2DModel` / `NCSNppModel` folder. A pretrained network's defaults are those of the published preset nearest to
  it.
- the scheduler: the preset's settings < the pretrained model's < `--sde`, `--continuous`, `--flow_start`,
  `--sigma_max`, `--snr`. The network fixes the parameterisation and the conditioning: a UNet2DModel with a Fourier
  time embedding is a VE score model, any other an epsilon model, conditioned as diffusers does
  (`model_conditioning="diffusers"`); an NCSNppModel follows the published `get_score_fn` (what its preset and the
  converted configs say): VE networks output the score, VP / sub-VP networks the noise, discrete ones take the
  published labels (`model_conditioning="score_sde"`), and a new one gets the scheduler's SMLD noise levels.
- the flow prior: the pretrained pipeline's (trained further as it is), else a new one of the preset's size unless
  `--flow_*` say otherwise; none for score-only training from a network without one. `--train_component
  gaussian_prior` fits a `GaussianPriorModel` in closed form instead (`training.gaussian_prior`), no flow.
"""

import argparse
import dataclasses
import inspect
import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple

from diffusers import UNet2DModel
from diffusers.optimization import SchedulerType

from ..code_bundle import package_model_index
from ..config_utils import public_config
from ..data import DIGITS_SPLITS
from ..hub_utils import is_local_path, model_file
from ..models.flow_prior import FlowPriorModel
from ..models.gaussian_prior import COVARIANCE_TYPES
from ..models.ncsnpp import NCSNppModel
from ..schedulers.scheduling_dinof import SDE_TYPES, DiNofScheduler
from ..validation import check_choice, check_int, check_number, check_positive_int
from .losses import LOSS_REDUCTIONS
from .presets import UNET_CLASS_NAMES, TrainingPreset, get_preset, list_presets, nearest_published_preset

TRAIN_COMPONENTS = ("joint", "score", "flow", "gaussian_prior")
SCORE_TIME_RANGES = ("t_star", "full")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# flag -> the DiNofScheduler / FlowPriorModel setting it overrides
SCHEDULER_FLAGS = {
    "sde": "sde_type",
    "continuous": "continuous",
    "flow_start": "flow_start",
    "sigma_max": "sigma_max",
    "snr": "snr",
}
FLOW_FLAGS = {"flow_num_levels": "num_levels", "flow_depth": "flow_depth", "flow_hidden_channels": "hidden_channels"}
UNET_CLASSES = {"UNet2DModel": UNet2DModel, "NCSNppModel": NCSNppModel}
# The SMLD noise levels an NCSNppModel shares with its scheduler (its positional labels index them).
_NCSNPP_NOISE_LEVELS = {"sigma_min": "sigma_min", "sigma_max": "sigma_max", "num_scales": "num_train_timesteps"}


class TrainingError(Exception):
    """A problem the user can fix (flags that contradict each other or do not fit the model or data, diverging
    training); the scripts report it without a traceback."""


def _flag(default, help_text: str, group: Optional[str] = None, **argparse_kwargs):
    """A flag of train.py: its default, its --help text, the argparse group it opens, and `add_argument` keywords."""
    metadata = {"help": help_text, "argparse": argparse_kwargs, **({"group": group} if group else {})}
    return field(default=default, metadata=metadata)


def _resolved(default=None):
    """A setting worked out by `resolve_run_config`, not a flag."""
    return field(default=default, metadata={"resolved": True})


_PRESETS_DEFAULT = "default: the preset's"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a training run, resolved.

    The fields up to `debug_nonfinite_steps` are the flags of training_scripts/train.py, with their defaults and
    help (`train.py --help`; `run_config_parser` builds the parser from them); `None` stands for "the preset's" or
    "not given". After `resolve_run_config` none of the model, scheduler, flow and optimisation settings is `None`
    (except `max_train_steps`, for which `num_epochs` stands in).

    The resolved fields:
        unet_class (`str`): the score network's class, "UNet2DModel" or "NCSNppModel".
        unet_kwargs (`Mapping`, *optional*): the arguments of a new score network (`None` for a pretrained one).
        pretrained_kind (`str`, *optional*): "dinof" (a DiNof pipeline), "pipeline" (another diffusers pipeline with
            a `unet`) or "unet" (a `UNet2DModel` / `NCSNppModel` folder); `None` without a pretrained model.
        scheduler_config (`Mapping`): the `DiNofScheduler` configuration.
        flow_prior (`str`, *optional*): "pretrained" (the pretrained pipeline's), "new", "gaussian" (a
            `GaussianPriorModel` to fit) or `None` (no flow prior).
    """

    dataset_name: Optional[str] = _flag(
        None,
        "A data set on the Hub, or a local folder `datasets.load_dataset` understands. With neither this nor "
        "--train_data_dir: the embedded digits (no download).",
        group="data",
    )
    dataset_config_name: Optional[str] = _flag(None, "The config of the data set.")
    train_data_dir: Optional[str] = _flag(
        None, "A folder of images, read as a `datasets` imagefolder (a metadata.csv in it selects the images)."
    )
    strict_images: bool = _flag(
        False,
        "Check that every image decodes before training and stop with the list of those that do not; by default an "
        "unreadable image is logged and replaced by the next readable one.",
        action="store_true",
    )
    digits_split: Optional[str] = _flag(
        None,
        "The embedded digits only: which part of their fixed 1,500 / 297 split to train on. Default: train, so that "
        "the 297 test digits stay held out for evaluation (evaluate.py --digits_split test); all: the 1,797.",
        choices=DIGITS_SPLITS,
    )
    image_column: str = _flag("image", "The data set column holding the images.")
    cache_dir: Optional[str] = _flag(None, "Where downloaded data sets and models are stored.")
    resolution: Optional[int] = _flag(
        None, "Image side length; default: the preset's, or the pretrained UNet's `sample_size`.", type=int
    )
    center_crop: bool = _flag(False, "Center-crop (rather than randomly crop) to size.", action="store_true")
    random_flip: bool = _flag(False, "Randomly flip the images horizontally.", action="store_true")
    num_channels: Optional[int] = _flag(
        None,
        "1 (grey) or 3 (RGB): the images are converted to it. Default: 1 for the embedded digits, else the UNet "
        "config's in_channels. A pretrained UNet fixes it.",
        type=int,
        choices=[1, 3],
    )
    dataloader_num_workers: int = _flag(0, "Data loading subprocesses.", type=int)

    unet_config: Optional[str] = _flag(
        None,
        f"A preset name ({', '.join(list_presets())}) or a JSON file of the score network's arguments (its "
        "`_class_name`: UNet2DModel, the default, or NCSNppModel). Default: 'tiny' unless "
        "--pretrained_model_name_or_path is given.",
        group="model (default: the preset's settings, or those of the pretrained model)",
    )
    pretrained_model_name_or_path: Optional[str] = _flag(
        None,
        "Start from a DiNof pipeline (folder or Hub id with model_index.json; its unet, flow_prior and scheduler "
        "settings; e.g. the output of dinof-convert-checkpoint), another diffusers pipeline with a `unet` subfolder, "
        "or a plain UNet2DModel / NCSNppModel folder (config.json).",
    )
    revision: Optional[str] = _flag(None, "Revision of the pretrained model on the Hub.")
    sde: Optional[str] = _flag(None, "The SDE.", choices=SDE_TYPES)
    continuous: Optional[bool] = _flag(
        None,
        "Continuous-time training (else the discrete SMLD / DDPM chain).",
        action=argparse.BooleanOptionalAction,
    )
    flow_start: Optional[float] = _flag(None, "t* / T where the flow hands over (published: 0.6).", type=float)
    sigma_max: Optional[float] = _flag(None, "VE sigma_max.", type=float)
    snr: Optional[float] = _flag(None, "Signal-to-noise ratio of the Langevin corrector.", type=float)
    flow_num_levels: Optional[int] = _flag(None, "Glow levels L.", type=int)
    flow_depth: Optional[int] = _flag(None, "Glow steps per level K.", type=int)
    flow_hidden_channels: Optional[int] = _flag(None, "Glow coupling width.", type=int)

    train_component: str = _flag(
        "joint",
        "joint: both networks, one optimiser (published); score: the UNet only; flow: the flow prior only, on the "
        "frozen UNet of --pretrained_model_name_or_path; gaussian_prior: no training, the moment-matched Gaussian "
        "prior of x(t*) fitted in closed form to the data (seconds) for the frozen UNet of "
        "--pretrained_model_name_or_path, saved as the pipeline's flow_prior (the control for the flow).",
        group="training",
        choices=TRAIN_COMPONENTS,
    )
    gaussian_covariance: Optional[str] = _flag(
        None,
        "--train_component gaussian_prior: the covariance of the Gaussian prior, full (default; rank 256 + isotropic "
        "above 4096 dimensions) or diagonal.",
        choices=COVARIANCE_TYPES,
    )
    output_dir: str = _flag("dinof-model", "Pipeline, checkpoints and logs.")
    seed: int = _flag(0, "Seed of the initialisation, data order and noise.", type=int)
    train_batch_size: Optional[int] = _flag(None, f"Batch size per process; {_PRESETS_DEFAULT}.", type=int)
    num_epochs: int = _flag(100, "Ignored when --max_train_steps is given.", type=int)
    max_train_steps: Optional[int] = _flag(None, "Optimisation steps in total.", type=int)
    gradient_accumulation_steps: int = _flag(1, "Batches per optimisation step.", type=int)
    learning_rate: Optional[float] = _flag(None, f"Adam learning rate; {_PRESETS_DEFAULT} (2e-4).", type=float)
    lr_scheduler: str = _flag(
        "constant_with_warmup",
        "A diffusers learning rate schedule; the published one is linear warm-up, then constant.",
        choices=[schedule.value for schedule in SchedulerType],
    )
    lr_warmup_steps: Optional[int] = _flag(None, f"Warm-up steps; {_PRESETS_DEFAULT} (5000).", type=int)
    adam_beta1: float = _flag(0.9, "Adam beta1.", type=float)
    adam_beta2: float = _flag(0.999, "Adam beta2.", type=float)
    adam_weight_decay: float = _flag(0.0, "Adam (L2) weight decay.", type=float)
    adam_epsilon: float = _flag(1e-8, "Adam epsilon.", type=float)
    max_grad_norm: float = _flag(1.0, "Gradient clipping over all networks.", type=float)
    loss_reduction: Optional[str] = _flag(
        None,
        f"Per-sample score loss: mean over dimensions or 0.5 * sum; {_PRESETS_DEFAULT}.",
        choices=LOSS_REDUCTIONS,
    )
    score_time_range: str = _flag(
        "t_star",
        "Times the score network is trained on: t_star: U(eps, T) * flow_start, as published (the DiNof sampler "
        "never goes above t*); full: U(eps, T), so that the baseline sampler from T (use_flow_prior=False) can be "
        "run with the same network, e.g. to compare the two.",
        choices=SCORE_TIME_RANGES,
    )
    flow_loss_weight: float = _flag(1.0, "Weight of the flow NLL (nats) in the summed loss.", type=float)
    use_ema: bool = _flag(True, "EMA of each trained network.", action=argparse.BooleanOptionalAction)
    ema_decay: Optional[float] = _flag(None, f"EMA decay; {_PRESETS_DEFAULT}.", type=float)
    mixed_precision: Optional[str] = _flag(
        None, "Autocast precision; default: accelerate's configuration.", choices=MIXED_PRECISIONS
    )
    max_consecutive_nonfinite: int = _flag(
        20,
        "Stop after this many optimisation steps in a row skipped for a non-finite loss or gradient norm.",
        type=int,
    )
    max_nonfinite_fraction: float = _flag(
        0.1,
        "Stop when more than this fraction of the steps were skipped for a non-finite loss or gradient norm, judged "
        "over the steps so far but never over fewer than the first 100 (or all, in a shorter run).",
        type=float,
    )

    checkpointing_steps: int = _flag(500, "Save the training state every N.", group="checkpoints", type=int)
    checkpoints_total_limit: Optional[int] = _flag(None, "Keep at most N checkpoints.", type=int)
    resume_from_checkpoint: Optional[str] = _flag(
        None, "A checkpoint folder, or 'latest' for the newest in --output_dir (a fresh start if there is none)."
    )

    logging_dir: str = _flag("logs", "Tracker folder, inside --output_dir.", group="logging and samples")
    report_to: str = _flag("tensorboard", "Where the trackers log.", choices=REPORT_TO)
    save_images_steps: int = _flag(500, "Sample a grid every N steps.", type=int)
    num_sample_images: int = _flag(16, "Images in the sample grid.", type=int)
    sample_num_inference_steps: Optional[int] = _flag(
        None, "Reverse steps of the grid, at most (and by default) the scheduler's int(N * flow_start).", type=int
    )
    sample_seed: int = _flag(0, "Seed of the sample grids.", type=int)

    push_to_hub: bool = _flag(
        False, "Upload the output folder to the Hub at the end.", group="hub", action="store_true"
    )
    hub_model_id: Optional[str] = _flag(None, "Repository id; default: the output folder name.")
    hub_token: Optional[str] = _flag(None, "Hub token; default: the stored login.")
    hub_private_repo: bool = _flag(False, "Create the repository as private.", action="store_true")

    debug_hash_dir: Optional[str] = _flag(
        None,
        "At the end, every process writes `rank<i>.json` here: SHA-256 of every parameter, buffer and EMA weight, "
        "to check that the replicas are identical.",
        group="debugging (used by the tests)",
    )
    debug_nonfinite_steps: Tuple[int, ...] = _flag(
        (),
        "Make the loss NaN on the first micro-batch of these optimisation steps (1-based).",
        type=int,
        nargs="*",
    )

    unet_class: str = _resolved("UNet2DModel")
    unet_kwargs: Optional[Mapping[str, Any]] = _resolved()
    pretrained_kind: Optional[str] = _resolved()
    scheduler_config: Optional[Mapping[str, Any]] = _resolved()
    flow_prior: Optional[str] = _resolved()

    @classmethod
    def flag_defaults(cls) -> Dict[str, Any]:
        """flag name -> default, for `argparse.ArgumentParser.set_defaults`."""
        return {f.name: f.default for f in dataclasses.fields(cls) if not f.metadata.get("resolved")}

    @property
    def is_digits(self) -> bool:
        """Whether the run trains on the embedded digits (neither --dataset_name nor --train_data_dir)."""
        return self.dataset_name is None and self.train_data_dir is None

    @property
    def train_unet(self) -> bool:
        return self.train_component in ("joint", "score")

    @property
    def train_flow(self) -> bool:
        return self.train_component in ("joint", "flow")

    @property
    def unet_source(self) -> str:
        """Where the score network comes from: the preset / JSON file, or the pretrained model."""
        return self.unet_config or self.pretrained_model_name_or_path

    @property
    def flow_kwargs(self) -> Dict[str, Any]:
        """The `FlowPriorModel` arguments of a new flow prior."""
        flow = {key: getattr(self, flag) for flag, key in FLOW_FLAGS.items()}
        return {"sample_size": self.resolution, "in_channels": self.num_channels, **flow}

    def tracker_config(self) -> Dict[str, Any]:
        """The flags but the Hub token as plain values (numbers, strings, booleans; anything else as a string) for the
        trackers."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("resolved")}
        values.pop("hub_token")  # a secret
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None (those defaults are the preset's, as the help says)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or not action.help:
            return action.help
        return super()._get_help_string(action)


def run_config_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser of train.py: one flag `--<name>` per flag field of `RunConfig`, with its default, its help
    and its group; `resolve_run_config(parser.parse_args())` turns the result into the run's settings."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    group = parser
    for flag in dataclasses.fields(RunConfig):
        if flag.metadata.get("resolved"):
            continue
        if "group" in flag.metadata:
            group = parser.add_argument_group(flag.metadata["group"])
        kwargs = flag.metadata["argparse"]
        group.add_argument(f"--{flag.name}", default=flag.default, help=flag.metadata["help"], **kwargs)
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------------------------


def resolve_run_config(args) -> RunConfig:
    """The `RunConfig` of parsed flags: preset < pretrained model < flags, every check done once.

    Args:
        args: an `argparse.Namespace` (or any object) whose attributes are flags of train.py; missing ones take
            their defaults.

    Raises:
        TrainingError: a bad value, two flags that contradict each other (both named), a flag that contradicts the
            preset or the pretrained model, or a pretrained model that cannot be read.
    """
    defaults = RunConfig.flag_defaults()
    given = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TrainingError(f"Unknown training settings: {unknown}.")
    flags = {**defaults, **given}
    flags["debug_nonfinite_steps"] = tuple(flags["debug_nonfinite_steps"] or ())
    try:
        _check_flags(flags, defaults)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if flags["pretrained_model_name_or_path"] is None and flags["unet_config"] is None:
        flags["unet_config"] = "tiny"
    if flags["dataset_name"] is None and flags["train_data_dir"] is None and flags["digits_split"] is None:
        flags["digits_split"] = "train"

    source = _score_network_source(flags)
    resolved = _resolve_score_network(flags, source)
    preset = source["preset"]
    for name in ("train_batch_size", "learning_rate", "lr_warmup_steps", "loss_reduction", "ema_decay"):
        if flags[name] is None:
            flags[name] = getattr(preset, name)
    scheduler_config = _resolve_scheduler(flags, source)
    resolved["scheduler_config"] = MappingProxyType(scheduler_config)
    resolved["flow_prior"] = _resolve_flow(flags, source)
    unet = source["unet"]
    if resolved["unet_kwargs"] is not None:
        if source["unet_class"] == "NCSNppModel":  # a new network's SMLD labels index the scheduler's noise levels
            resolved["unet_kwargs"].update({k: scheduler_config[key] for k, key in _NCSNPP_NOISE_LEVELS.items()})
        unet = resolved["unet_kwargs"]
        resolved["unet_kwargs"] = MappingProxyType(unet)
    unet_flag = "--unet_config" if source["kind"] is None else "--pretrained_model_name_or_path"
    _check_model_settings(source["unet_class"], unet, scheduler_config, flags, unet_flag)
    return RunConfig(**flags, **resolved)


def _check_flags(flags: Dict[str, Any], defaults: Dict[str, Any]) -> None:
    """The checks that need no model: values, and flags that exclude or need each other. Raises `ValueError`."""

    def given(name):
        return flags[name] is not None

    def exclusive(first, second, reason):
        if given(first) and given(second):
            raise ValueError(f"--{first} and --{second} are exclusive: {reason}.")

    def needs(flag, other, reason):
        if flags[flag] not in (None, False) and not flags[other]:
            raise ValueError(f"--{flag} needs --{other}: {reason}.")

    exclusive("dataset_name", "train_data_dir", "give one of them (or neither for the embedded digits)")
    for data_flag in ("dataset_name", "train_data_dir"):
        exclusive("digits_split", data_flag, "--digits_split chooses among the embedded digits")
    exclusive("unet_config", "pretrained_model_name_or_path", "a pretrained UNet has a config")
    needs("dataset_config_name", "dataset_name", "it is the configuration of that data set")
    needs("revision", "pretrained_model_name_or_path", "it is the revision of that model")
    for flag in ("hub_model_id", "hub_token", "hub_private_repo"):
        needs(flag, "push_to_hub", "nothing is uploaded without it")
    if given("ema_decay") and not flags["use_ema"]:
        raise ValueError("--ema_decay and --no-use_ema contradict each other: without an EMA there is no decay.")
    component = flags["train_component"]
    if component in ("flow", "gaussian_prior") and not given("pretrained_model_name_or_path"):
        raise ValueError(
            f"--train_component {component} makes a prior for a frozen score network: give it with "
            "--pretrained_model_name_or_path."
        )
    if given("gaussian_covariance") and component != "gaussian_prior":
        raise ValueError(f"--gaussian_covariance is a setting of --train_component gaussian_prior, not {component}.")
    if component == "gaussian_prior" and any(given(flag) for flag in FLOW_FLAGS):
        raise ValueError("--flow_* set the size of a flow; --train_component gaussian_prior fits no flow.")
    if given("train_data_dir") and not os.path.isdir(flags["train_data_dir"]):
        raise ValueError(f"--train_data_dir {flags['train_data_dir']!r} is not a folder.")
    path = flags["pretrained_model_name_or_path"]
    if path is not None and os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in ("model_index.json", "config.json")):
            raise ValueError(f"--pretrained_model_name_or_path {path!r} has neither model_index.json nor config.json.")
    elif path is not None and is_local_path(path):
        raise ValueError(f"--pretrained_model_name_or_path {path!r} is neither a model folder nor a Hub id.")
    resume = flags["resume_from_checkpoint"]
    if resume not in (None, "latest") and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not a folder (or 'latest').")
    if os.path.exists(flags["output_dir"]) and not os.path.isdir(flags["output_dir"]):
        raise ValueError(f"--output_dir {flags['output_dir']!r} is a file, not a folder.")

    for flag in dataclasses.fields(RunConfig):  # the choices argparse offers (None where it means "not given")
        allowed = flag.metadata.get("argparse", {}).get("choices")
        if allowed is not None:
            check_choice(flags[flag.name], f"--{flag.name}", [*allowed, *([None] if flag.default is None else [])])
    positive = [
        "resolution", "train_batch_size", "num_epochs", "max_train_steps", "gradient_accumulation_steps",
        "checkpointing_steps", "checkpoints_total_limit", "save_images_steps", "num_sample_images",
        "sample_num_inference_steps", "max_consecutive_nonfinite", "flow_num_levels", "flow_depth",
        "flow_hidden_channels",
    ]  # fmt: skip
    for name in positive:  # None only where it means "the preset's" or "not given"
        check_positive_int(flags[name], f"--{name}", allow_none=defaults[name] is None)
    for name in ("lr_warmup_steps", "dataloader_num_workers", "seed", "sample_seed"):
        check_int(flags[name], f"--{name}", minimum=0, allow_none=defaults[name] is None)
    check_number(flags["flow_start"], "--flow_start", 0.0, 1.0, exclusive_minimum=True, allow_none=True)
    for name in ("learning_rate", "sigma_max", "snr", "max_grad_norm"):
        check_number(flags[name], f"--{name}", minimum=0.0, exclusive_minimum=True, allow_none=True)
    check_number(flags["ema_decay"], "--ema_decay", 0.0, 1.0, exclusive_maximum=True, allow_none=True)
    for name in ("adam_beta1", "adam_beta2"):
        check_number(flags[name], f"--{name}", 0.0, 1.0, exclusive_maximum=True)
    check_number(flags["adam_epsilon"], "--adam_epsilon", minimum=0.0, exclusive_minimum=True)
    for name in ("flow_loss_weight", "adam_weight_decay"):
        check_number(flags[name], f"--{name}", minimum=0.0)
    check_number(flags["max_nonfinite_fraction"], "--max_nonfinite_fraction", 0.0, 1.0)


def unet_class_name(config: Mapping[str, Any], source: str) -> str:
    """The score network's class named by a config's `_class_name` (UNet2DModel when it names none)."""
    name = config.get("_class_name", "UNet2DModel")
    if name not in UNET_CLASSES:
        raise TrainingError(
            f"The score network of {source} is a {name}; train.py trains {' or '.join(UNET_CLASS_NAMES)} "
            "(`_class_name`)."
        )
    return name


def _unet_settings(config: Mapping[str, Any], unet_class: str) -> Dict[str, Any]:
    """A score network config with its class's defaults for what it leaves out."""
    parameters = inspect.signature(UNET_CLASSES[unet_class].__init__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return {**defaults, **public_config(config)}


def load_unet_config(unet_config: str) -> Tuple[str, Dict[str, Any], TrainingPreset]:
    """A preset name or a JSON file -> (network class name, its kwargs, the preset giving the remaining defaults)."""
    if unet_config.endswith(".json") or os.path.isfile(unet_config):
        with open(unet_config) as handle:
            config = json.load(handle)
        if not isinstance(config, dict):
            raise ValueError(f"{unet_config!r} must hold a JSON object of the score network's arguments.")
        unet_class = unet_class_name(config, f"--unet_config {unet_config}")
        return unet_class, public_config(config), nearest_published_preset(unet_class, config)
    preset = get_preset(unet_config)
    return preset.unet_class, preset.get_unet_config(), preset


def translate_scheduler_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """DiNofScheduler settings equivalent to another diffusers scheduler's config (ScoreSdeVe, DDPM/DDIM linear)."""
    name = config.get("_class_name", "")
    if name == "DiNofScheduler":
        return public_config(DiNofScheduler.from_config(config).config)
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


def _score_network_source(flags: Dict[str, Any]) -> Dict[str, Any]:
    """What the score network, the scheduler and the flow start from: the preset or JSON file of --unet_config, or
    the configuration files of --pretrained_model_name_or_path (no weights are loaded).

    Returns:
        `kind` (None or `RunConfig.pretrained_kind`), `unet_class`, `unet` (the network's config), `preset`,
        `scheduler` (pretrained scheduler settings) and `flow` (the pretrained flow prior's config, or None).
    """
    path = flags["pretrained_model_name_or_path"]
    if path is None:
        try:
            unet_class, unet, preset = load_unet_config(flags["unet_config"])
        except (KeyError, OSError, ValueError) as error:
            raise TrainingError(f"--unet_config: {error}") from None
        return {"kind": None, "unet_class": unet_class, "unet": unet, "preset": preset, "scheduler": {}, "flow": None}

    def read(filename):
        try:
            local = model_file(path, filename, revision=flags["revision"], cache_dir=flags["cache_dir"])
            if local is None:
                return None
            with open(local) as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise TrainingError(f"--pretrained_model_name_or_path {path!r}: cannot read {filename}: {error}") from None

    index = read("model_index.json")
    index = None if index is None else package_model_index(index)  # a bundled copy names the class as a pair
    kind = "unet" if index is None else "dinof" if index.get("_class_name") == "DiNofPipeline" else "pipeline"
    unet = read("config.json" if kind == "unet" else "unet/config.json")
    if unet is None:
        raise TrainingError(f"--pretrained_model_name_or_path {path!r} has no UNet config (unet/config.json).")
    unet_class = unet_class_name(unet, f"--pretrained_model_name_or_path {path!r}")
    scheduler = read("scheduler/scheduler_config.json") if kind != "unet" else None
    # a GaussianPriorModel (fitted, never trained) is not a flow to train further
    has_flow = kind == "dinof" and (index.get("flow_prior") or [None, None])[1] == FlowPriorModel.__name__
    return {
        "kind": kind,
        "unet_class": unet_class,
        "unet": _unet_settings(unet, unet_class),
        "preset": nearest_published_preset(unet_class, unet),
        "scheduler": translate_scheduler_config(scheduler) if scheduler else {},
        "flow": read("flow_prior/config.json") if has_flow else None,
    }


def _resolve_score_network(flags: Dict[str, Any], source: Dict[str, Any]) -> Dict[str, Any]:
    """Sets the resolution and the channels; returns the resolved `unet_kwargs` and `pretrained_kind`."""
    unet = source["unet"]
    if source["kind"] is not None:
        path = flags["pretrained_model_name_or_path"]
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        if size is None:
            raise TrainingError(f"The UNet of --pretrained_model_name_or_path {path!r} has no sample_size.")
        for flag, key, value in (
            ("resolution", "sample_size", size),
            ("num_channels", "in_channels", unet["in_channels"]),
        ):
            if flags[flag] not in (None, value):
                raise TrainingError(
                    f"--{flag} {flags[flag]} differs from the {key} {value} of the UNet of "
                    f"--pretrained_model_name_or_path {path!r}."
                )
        flags["resolution"], flags["num_channels"] = size, unet["in_channels"]
        return {"unet_class": source["unet_class"], "unet_kwargs": None, "pretrained_kind": source["kind"]}
    flags["resolution"] = flags["resolution"] or unet.get("sample_size") or source["preset"].resolution
    is_digits = flags["dataset_name"] is None and flags["train_data_dir"] is None
    channels = flags["num_channels"] or (1 if is_digits else unet.get("in_channels", 3))
    flags["num_channels"] = channels
    unet = {**unet, "sample_size": flags["resolution"], "in_channels": channels}
    if source["unet_class"] == "UNet2DModel":
        unet["out_channels"] = channels
    return {"unet_class": source["unet_class"], "unet_kwargs": unet, "pretrained_kind": None}


def _resolve_scheduler(flags: Dict[str, Any], source: Dict[str, Any]) -> Dict[str, Any]:
    """The DiNofScheduler configuration; sets the scheduler flags to their resolved values."""
    origin = "--unet_config " + str(flags["unet_config"])
    if source["kind"] is not None:
        origin = f"--pretrained_model_name_or_path {flags['pretrained_model_name_or_path']}"
    settings = {**source["preset"].scheduler_config, **source["scheduler"]}
    given = {flag: flags[flag] for flag in SCHEDULER_FLAGS if flags[flag] is not None}
    settings.update({SCHEDULER_FLAGS[flag]: value for flag, value in given.items()})
    if source["unet_class"] == "NCSNppModel":  # the published get_score_fn
        settings["prediction_type"] = "score" if settings.get("sde_type", "ve") == "ve" else "epsilon"
        settings["model_conditioning"] = "score_sde"
    else:
        fourier = source["unet"].get("time_embedding_type", "positional") == "fourier"
        settings["prediction_type"] = "score" if fourier else "epsilon"
        settings["model_conditioning"] = "diffusers"
    try:
        scheduler = DiNofScheduler(**settings)
    except ValueError as error:
        flags_given = ", ".join(f"--{flag} {value}" for flag, value in given.items()) or "no scheduler flags"
        raise TrainingError(
            f"The scheduler settings ({flags_given}; the rest from {origin}) do not fit together: {error}"
        ) from None
    for flag, key in SCHEDULER_FLAGS.items():
        flags[flag] = scheduler.config[key]
    if flags["sample_num_inference_steps"] is not None:
        try:
            scheduler.set_timesteps(flags["sample_num_inference_steps"])
        except ValueError as error:
            raise TrainingError(
                f"--sample_num_inference_steps {flags['sample_num_inference_steps']} does not fit the scheduler "
                f"(--flow_start {flags['flow_start']}, num_train_timesteps "
                f"{scheduler.config.num_train_timesteps}): {error}"
            ) from None
    return public_config(scheduler.config)


def _resolve_flow(flags: Dict[str, Any], source: Dict[str, Any]) -> Optional[str]:
    """Whether the flow prior is the pretrained one, a new one or none; sets the flow flags to its size."""
    path = flags["pretrained_model_name_or_path"]
    pretrained = source["flow"]
    if flags["train_component"] == "gaussian_prior":
        flags["gaussian_covariance"] = flags["gaussian_covariance"] or "full"
        return "gaussian"
    if pretrained is not None:
        for flag, key in FLOW_FLAGS.items():
            if flags[flag] not in (None, pretrained[key]):
                raise TrainingError(
                    f"--{flag} {flags[flag]} differs from the {key} {pretrained[key]} of the flow prior of "
                    f"--pretrained_model_name_or_path {path!r}; the pretrained flow is trained further as it is."
                )
            flags[flag] = pretrained[key]
        return "pretrained"
    for flag, key in FLOW_FLAGS.items():
        if flags[flag] is None:
            flags[flag] = source["preset"].flow_config[key]
    return None if flags["train_component"] == "score" else "new"


def _check_model_settings(
    unet_class: str, unet: Mapping[str, Any], scheduler: Mapping[str, Any], flags: Dict[str, Any], unet_flag: str
) -> None:
    """Raises `TrainingError` naming the flags if the resolution, the flow depth and the SDE do not fit the network."""
    resolution, num_levels, sde = flags["resolution"], flags["flow_num_levels"], flags["sde"]
    if unet_class == "NCSNppModel":
        unet_factor = 2 ** (len(unet["ch_mult"]) - 1)
    else:
        unet_factor = 2 ** (len(unet.get("down_block_types", ())) - 1)
    flow_factor = 2**num_levels if num_levels is not None else 1  # None: no flow (a Gaussian prior)
    source = f"{unet_flag} {flags[unet_flag[2:]]}"
    if resolution % flow_factor:
        raise TrainingError(
            f"--resolution {resolution} must be divisible by 2 ** --flow_num_levels = {flow_factor} (the flow "
            "squeezes the image once per level)."
        )
    if resolution % unet_factor:
        raise TrainingError(
            f"--resolution {resolution} must be divisible by {unet_factor}, the downsampling of the UNet of {source}."
        )
    if unet_class == "NCSNppModel":
        _check_ncsnpp_settings(unet, scheduler, sde, source)
    elif unet.get("time_embedding_type", "positional") == "fourier" and sde != "ve":
        raise TrainingError(
            f"--sde {sde} needs an epsilon-prediction UNet (positional time embedding); the UNet of {source} has a "
            "Fourier time embedding and divides its output by sigma, a VE score model (use --sde ve)."
        )


def _check_ncsnpp_settings(unet: Mapping[str, Any], scheduler: Mapping[str, Any], sde: str, source: str) -> None:
    """An NCSNppModel fits the SDE as the published configs: inputs in the SDE's data range, Fourier features for the
    continuous VE SDE only, output divided by sigma for VE only, SMLD labels over the scheduler's noise levels."""
    continuous = scheduler["continuous"]
    problems = []
    if unet["centered"] != (sde != "ve"):
        problems.append(
            f"it takes inputs in {'[-1, 1] (centered=True)' if unet['centered'] else '[0, 1] (centered=False)'}, "
            f"the data range of {'VP / sub-VP' if unet['centered'] else 'VE'}"
        )
    if (unet["embedding_type"] == "fourier") != (sde == "ve" and continuous):
        problems.append(
            "its Fourier features embed sigma(t), the conditioning of the continuous VE SDE only"
            if unet["embedding_type"] == "fourier"
            else "its positional embedding takes labels (SMLD, VP, sub-VP), not the sigma(t) of the continuous VE SDE"
        )
    if unet["scale_by_sigma"] and sde != "ve":
        problems.append("it divides its output by sigma (a VE score network)")
    if sde == "ve" and not continuous and unet["scale_by_sigma"]:
        for key, scheduler_key in _NCSNPP_NOISE_LEVELS.items():
            if unet[key] != scheduler[scheduler_key]:
                problems.append(
                    f"its SMLD labels index {key} = {unet[key]}, the scheduler's {scheduler_key} is "
                    f"{scheduler[scheduler_key]}"
                )
    if problems:
        raise TrainingError(
            f"The NCSNppModel of {source} does not fit --sde {sde} --{'' if continuous else 'no-'}continuous: "
            f"{'; '.join(problems)}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def build_models(run: RunConfig):
    """The score network, the flow prior (or `None`) and the scheduler of a resolved run.

    Returns:
        `(UNet2DModel or NCSNppModel, Optional[FlowPriorModel], DiNofScheduler)`: new networks are freshly
        initialised (from the global torch RNG), pretrained ones are loaded. No prior for `--train_component gaussian_prior`: it is fitted
        to the data (`training.gaussian_prior.fit_gaussian_prior`).
    """
    hub = {"revision": run.revision, "cache_dir": run.cache_dir}
    unet_class = UNET_CLASSES[run.unet_class]
    if run.pretrained_kind is None:
        unet = unet_class(**run.unet_kwargs)
    else:
        subfolder = None if run.pretrained_kind == "unet" else "unet"
        unet = unet_class.from_pretrained(run.pretrained_model_name_or_path, subfolder=subfolder, **hub)
    flow_prior = None
    if run.flow_prior == "pretrained":
        flow_prior = FlowPriorModel.from_pretrained(run.pretrained_model_name_or_path, subfolder="flow_prior", **hub)
    elif run.flow_prior == "new":
        flow_prior = FlowPriorModel(**run.flow_kwargs)
    return unet, flow_prior, DiNofScheduler(**run.scheduler_config)
