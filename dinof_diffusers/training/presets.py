"""Training presets: the seven published DiNof configurations, their UNet2DModel approximations and two small ones.

A preset bundles everything `training_scripts/train.py` needs to reproduce a configuration: the score network (its
class and config), the matching `DiNofScheduler` settings, the flow prior's size and the optimisation settings (EMA
decay, batch size, loss reduction, learning rate and warm-up). Command-line flags override the individual values.

The seven published configs build `NCSNppModel`, the published NCSN++ / DDPM++ network, with the options of
`NCSNPP_PUBLISHED_CONFIGS` and the sampler of `DINOF_PUBLISHED_SCHEDULER_CONFIGS` (both read from MohsenZand/DiNof
`configs/`); the parameter counts are the published networks' (RGB, at the published resolution):

| preset | SDE, training | sampler | parameters | EMA | loss |
|---|---|---|---:|---|---|
| `ncsnpp-cifar10-ve` | VE, continuous | reverse diffusion + Langevin (snr 0.16) | 62,758,915 | 0.999 | sum |
| `ncsnpp-deep-cifar10-ve` | VE, continuous | reverse diffusion + Langevin (snr 0.16) | 107,587,075 | 0.999 | sum |
| `ncsnpp-cifar10-ve-discrete` | VE, SMLD | reverse diffusion + Langevin (snr 0.16) | 62,693,251 | 0.999 | sum |
| `ddpmpp-cifar10-vp` | VP, continuous | Euler-Maruyama, no corrector | 61,804,419 | 0.9999 | mean |
| `ddpmpp-cifar10-vp-discrete` | VP, DDPM | ancestral, no corrector | 61,804,419 | 0.9999 | mean |
| `ddpmpp-cifar10-subvp` | sub-VP, continuous | Euler-Maruyama, no corrector | 61,804,419 | 0.9999 | mean |
| `ncsnpp-celebahq256-ve` | VE, continuous, sigma_max 348 | reverse diffusion + Langevin (snr 0.17) | 65,574,549 | 0.999 | sum |

(NCSN++ VE counts include the 128 fixed Fourier frequencies, which are not trained.) All: N = 1000, t* = 0.6 T, the
published Glow (3 levels of 16 steps, width 256), Adam 2e-4 with 5000 warm-up steps, `train_batch_size` 128. The
paper says one Langevin step for every run; the VP, sub-VP and DDPM configs have no corrector, and the configs, which
produced the published numbers, win. `train_batch_size` is per process, as train.py applies it: the published 128
ran on one device, so on k processes pass `--train_batch_size 128 / k` for the published total.

`<name>-unet2d` (four of them) are the same configurations with diffusers' `UNet2DModel` instead, as close as it can
express the network (`differences` lists what it cannot); they were the meaning of the names without the suffix up to
v0.1. `ncsnpp-tiny` (NCSNppModel) and `tiny` (UNet2DModel) are small VE score networks for CPU runs and tests.
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

from ..models.ncsnpp_configs import NCSNPP_PUBLISHED_CONFIGS, NCSNPP_PUBLISHED_PARAMETER_COUNTS
from ..schedulers.published_configs import DINOF_PUBLISHED_SCHEDULER_CONFIGS

# The score-network classes a preset or a --unet_config JSON file may name (`_class_name`).
UNET_CLASS_NAMES = ("UNet2DModel", "NCSNppModel")

# Options shared by every NCSN++ preset, as in the google/ncsnpp-* checkpoints of diffusers: Gaussian Fourier
# time features of log(sigma) (scale 16), the output divided by sigma (a score model), GroupNorm with
# min(channels // 4, 32) groups (`norm_num_groups=None`), single-head attention, skip rescaling of the mid block.
_NCSNPP_COMMON = {
    "time_embedding_type": "fourier",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": None,
    "norm_eps": 1e-6,
    "downsample_padding": 1,
    "mid_block_scale_factor": math.sqrt(2.0),
}

# DDPM++: the DDPM architecture (sinusoidal time features as google/ddpm-cifar10-32: sin first, freq_shift 1) with
# BigGAN-style residual up/down-sampling blocks.
_DDPMPP_COMMON = {
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "center_input_sample": False,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "mid_block_scale_factor": math.sqrt(2.0),
}

_DDPMPP_CIFAR10_DIFFERENCES = (
    "DDPM++ (Song et al., configs/vp/cifar10_ddpmpp_continuous.py): nf 128, ch_mult (1, 2, 2, 2), 4 residual blocks "
    "per resolution, attention at 16x16, BigGAN residual resampling without FIR, dropout 0.1, positional time "
    "embedding of 999 t. Differences in UNet2DModel: the residual blocks of the down/up paths do not divide their "
    "output by sqrt(2) (skip_rescale; only the mid block does, through mid_block_scale_factor); the up path's "
    "AttnUpBlock2D applies attention after each of its residual blocks where DDPM++ has one attention layer after "
    "the last; the time embedding MLP and the initialisation (init_scale 0) are diffusers'."
)

_NCSNPP_DIFFERENCES = (
    " Differences in UNet2DModel (the same as for the google/ncsnpp-* conversions): the skip blocks implement "
    "progressive_input 'input_skip' and progressive 'output_skip' with FIR resampling and BigGAN residual "
    "down/up-sampling blocks, their residual blocks rescaled by 1/sqrt(2) (skip_rescale); the time embedding MLP "
    "and the initialisation (init_scale 0) are diffusers'."
)


@dataclass(frozen=True)
class TrainingPreset:
    """One training configuration.

    Args:
        name (`str`): the name `--unet_config` takes.
        description (`str`): one line on what the preset reproduces (with the network's parameter count).
        resolution (`int`): the image side length the configuration was published at.
        unet_config (`Dict[str, Any]`): keyword arguments of the score network (`sample_size` and the channels are
            set by the training script from `--resolution` and the data).
        scheduler_config (`Dict[str, Any]`): keyword arguments of `DiNofScheduler`.
        flow_config (`Dict[str, Any]`): keyword arguments of `FlowPriorModel` (without `sample_size` / `in_channels`).
        ema_decay (`float`): EMA decay of the trained networks.
        train_batch_size (`int`): batch size per process (the published value is that of one device).
        loss_reduction (`str`): "sum" (0.5 * sum over dimensions, Song et al.'s `reduce_mean=False`) or "mean".
        learning_rate (`float`): Adam learning rate.
        lr_warmup_steps (`int`): linear warm-up steps of the learning rate.
        unet_class (`str`): "NCSNppModel" or "UNet2DModel".
        differences (`str`): how the network differs from the published one (empty for NCSNppModel).
        reference (`str`): the published config file.
    """

    name: str
    description: str
    resolution: int
    unet_config: Dict[str, Any]
    scheduler_config: Dict[str, Any]
    flow_config: Dict[str, Any]
    ema_decay: float
    train_batch_size: int
    loss_reduction: str
    learning_rate: float = 2e-4
    lr_warmup_steps: int = 5000
    unet_class: str = "NCSNppModel"
    differences: str = ""
    reference: str = field(default="")

    def get_unet_config(self) -> Dict[str, Any]:
        """A copy of `unet_config` that the caller may modify."""
        return copy.deepcopy(self.unet_config)


_PUBLISHED_FLOW = {"num_levels": 3, "flow_depth": 16, "hidden_channels": 256}
_TINY_FLOW = {"num_levels": 2, "flow_depth": 4, "hidden_channels": 32}
# name -> (config file, what it is, EMA decay, loss reduction); the network and sampler options are
# NCSNPP_PUBLISHED_CONFIGS[name] and DINOF_PUBLISHED_SCHEDULER_CONFIGS[name].
_PUBLISHED = {
    "ncsnpp-cifar10-ve": (
        "configs/ve/cifar10_ncsnpp_continuous.py",
        "NCSN++ on CIFAR-10 32x32, VE SDE in continuous time (DiNof's main CIFAR-10 setting)",
        0.999,
        "sum",
    ),
    "ncsnpp-deep-cifar10-ve": (
        "configs/ve/cifar10_ncsnpp_deep_continuous.py",
        "NCSN++ deep (8 residual blocks per level) on CIFAR-10 32x32, VE SDE in continuous time",
        0.999,
        "sum",
    ),
    "ncsnpp-cifar10-ve-discrete": (
        "configs/ve/cifar10_ncsnpp.py",
        "NCSN++ on CIFAR-10 32x32, SMLD (discrete VE, positional embedding of the noise-level label)",
        0.999,
        "sum",
    ),
    "ddpmpp-cifar10-vp": (
        "configs/vp/cifar10_ddpmpp_continuous.py",
        "DDPM++ on CIFAR-10 32x32, VP SDE in continuous time (noise prediction)",
        0.9999,
        "mean",
    ),
    "ddpmpp-cifar10-vp-discrete": (
        "configs/vp/cifar10_ddpmpp.py",
        "DDPM++ on CIFAR-10 32x32, DDPM (discrete VP, noise prediction)",
        0.9999,
        "mean",
    ),
    "ddpmpp-cifar10-subvp": (
        "configs/subvp/cifar10_ddpmpp_continuous.py",
        "DDPM++ on CIFAR-10 32x32, sub-VP SDE in continuous time (noise prediction)",
        0.9999,
        "mean",
    ),
    "ncsnpp-celebahq256-ve": (
        "configs/ve/celebahq_256_ncsnpp_continuous.py",
        "NCSN++ on CelebA-HQ 256x256, VE SDE in continuous time (sigma_max 348; dropout 0.1 from default_celeba.py)",
        0.999,
        "sum",
    ),
}


def _published_preset(name: str) -> TrainingPreset:
    config_file, what, ema_decay, loss_reduction = _PUBLISHED[name]
    resolution = NCSNPP_PUBLISHED_CONFIGS[name]["sample_size"]
    return TrainingPreset(
        name=name,
        description=f"{what}; NCSNppModel, {NCSNPP_PUBLISHED_PARAMETER_COUNTS[name]['total']:,} parameters.",
        resolution=resolution,
        unet_config=dict(NCSNPP_PUBLISHED_CONFIGS[name]),
        scheduler_config=dict(DINOF_PUBLISHED_SCHEDULER_CONFIGS[name]),
        flow_config=dict(_PUBLISHED_FLOW),
        ema_decay=ema_decay,
        train_batch_size=128,
        loss_reduction=loss_reduction,
        reference=f"DiNof {config_file}",
    )


def _unet2d_preset(
    base: str, unet_config: Dict[str, Any], parameters: str, differences: str, **changes
) -> TrainingPreset:
    """The published configuration `base` with a `UNet2DModel` approximation of its network."""
    published = _published_preset(base)
    return TrainingPreset(
        **{
            **vars(published),
            "name": f"{base}-unet2d",
            "description": f"{_PUBLISHED[base][1]}; UNet2DModel approximation, {parameters} parameters.",
            "unet_class": "UNet2DModel",
            "unet_config": unet_config,
            # diffusers' conditioning (the two agree for these continuous-time models)
            "scheduler_config": {**published.scheduler_config, "model_conditioning": "diffusers"},
            "differences": differences,
            **changes,
        }
    )


def _skip_unet(
    block_out_channels: Tuple[int, ...], layers_per_block: int, attention_level: int, dropout: float
) -> Dict[str, Any]:
    """NCSN++ as an RGB `UNet2DModel` of skip blocks (the google/ncsnpp-* layout), with attention at one level of
    the down path (and the matching level of the up path)."""
    levels = len(block_out_channels)
    return {
        **_NCSNPP_COMMON,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "down_block_types": tuple(f"{'Attn' * (i == attention_level)}SkipDownBlock2D" for i in range(levels)),
        "up_block_types": tuple(f"{'Attn' * (i == levels - 1 - attention_level)}SkipUpBlock2D" for i in range(levels)),
        "dropout": dropout,
    }


_DDPMPP_UNET2D = {
    **_DDPMPP_COMMON,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 4,
    "down_block_types": (
        "ResnetDownsampleBlock2D",
        "AttnDownBlock2D",
        "ResnetDownsampleBlock2D",
        "ResnetDownsampleBlock2D",
    ),
    "up_block_types": (
        "ResnetUpsampleBlock2D",
        "ResnetUpsampleBlock2D",
        "AttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    "dropout": 0.1,
}
# The VE score model of the small presets: Song et al.'s rule of thumb, sigma_max ~ the largest distance between two
# training images, is 8.5 for the 16x16 digits in [0, 1].
_TINY_SCHEDULER = {**DINOF_PUBLISHED_SCHEDULER_CONFIGS["ncsnpp-cifar10-ve"], "sigma_max": 10.0}
_TINY_TRAINING = dict(
    resolution=16,
    flow_config=_TINY_FLOW,
    ema_decay=0.999,
    train_batch_size=64,
    loss_reduction="sum",
    learning_rate=2e-3,
    lr_warmup_steps=100,
    reference="",
)

_PRESETS: Tuple[TrainingPreset, ...] = (
    *(_published_preset(name) for name in _PUBLISHED),
    _unet2d_preset(
        "ncsnpp-cifar10-ve",
        _skip_unet((128, 256, 256, 256), layers_per_block=4, attention_level=1, dropout=0.1),
        "61,894,924",
        "The CIFAR-10 NCSN++ (nf 128, ch_mult (1, 2, 2, 2), 4 residual blocks per resolution, attention at 16x16, "
        "BigGAN residual blocks with FIR resampling, progressive_input 'residual', progressive 'none', dropout 0.1, "
        "Fourier features of log sigma, output / sigma) uses progressive_input 'residual' and no output skip; "
        "UNet2DModel offers only the input_skip / output_skip blocks of the CelebA-HQ configuration."
        + _NCSNPP_DIFFERENCES,
    ),
    *(
        _unet2d_preset(f"ddpmpp-cifar10-{sde}", dict(_DDPMPP_UNET2D), "62,513,667", _DDPMPP_CIFAR10_DIFFERENCES)
        for sde in ("vp", "subvp")
    ),
    _unet2d_preset(
        "ncsnpp-celebahq256-ve",
        _skip_unet((128, 128, 256, 256, 256, 256, 256), layers_per_block=2, attention_level=4, dropout=0.1),
        "65,574,549",
        "The CelebA-HQ NCSN++ (nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2), 2 residual blocks per resolution, attention at "
        "16x16, progressive_input 'input_skip', progressive 'output_skip', FIR, dropout 0.1) in the layout of "
        "google/ncsnpp-celebahq-256." + _NCSNPP_DIFFERENCES,
    ),
    TrainingPreset(
        name="ncsnpp-tiny",
        description="A small NCSN++ VE score network (NCSNppModel, 190,835 parameters in RGB) and Glow for CPU runs "
        "and tests.",
        unet_config=dict(
            NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve"],
            sample_size=16,
            nf=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(8,),
            dropout=0.0,
        ),
        scheduler_config=dict(_TINY_SCHEDULER),
        differences="Not a published network: the CIFAR-10 NCSN++ options at nf 16, ch_mult (1, 2), one residual "
        "block per level, attention at 8x8, no dropout; learning rate 2e-3 with 100 warm-up steps, sigma_max 10.",
        **_TINY_TRAINING,
    ),
    TrainingPreset(
        name="tiny",
        description="A small NCSN++-style VE score network (UNet2DModel, 638,083 parameters in RGB) and Glow for CPU "
        "runs (the digits demo and the tests).",
        unet_class="UNet2DModel",
        unet_config={
            **_NCSNPP_COMMON,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (16, 32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
            "norm_num_groups": 8,
            "dropout": 0.0,
        },
        scheduler_config={**_TINY_SCHEDULER, "model_conditioning": "diffusers"},
        differences=(
            "Not a published network: 3 resolutions of 16, 32 and 64 channels, one residual block each, plain "
            "convolutional resampling, no attention but in the mid block; the NCSN++ time embedding and output "
            "scaling (a VE score model). Learning rate 2e-3 with 100 warm-up steps, for runs of a few thousand steps."
        ),
        **_TINY_TRAINING,
    ),
)

PRESETS: Dict[str, TrainingPreset] = {preset.name: preset for preset in _PRESETS}


def list_presets() -> List[str]:
    """The names `get_preset` accepts."""
    return list(PRESETS)


def get_preset(name: str) -> TrainingPreset:
    """The preset called `name`.

    Raises:
        `KeyError` with the list of known presets if there is none of that name.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"Unknown training preset {name!r}; known presets: {', '.join(PRESETS)}.") from None


def nearest_published_preset(unet_class: str, unet_config: Mapping[str, Any]) -> TrainingPreset:
    """The published preset whose parameterisation a network has, for the defaults of a network given another way.

    NCSNppModel: the published config whose network options it has (sample size and channels aside), else by its
    output: a score (`scale_by_sigma`) "ncsnpp-cifar10-ve", a noise prediction "ddpmpp-cifar10-vp". UNet2DModel: a
    Fourier time embedding is NCSN++'s (a VE score model), "ncsnpp-cifar10-ve-unet2d"; anything else is a DDPM-style
    noise predictor, "ddpmpp-cifar10-vp-unet2d".
    """
    if unet_class == "NCSNppModel":
        ignored = ("sample_size", "in_channels")
        for name, published in NCSNPP_PUBLISHED_CONFIGS.items():
            if all(_same(unet_config.get(k), v) for k, v in published.items() if k not in ignored):
                return PRESETS[name]
        return PRESETS["ncsnpp-cifar10-ve" if unet_config.get("scale_by_sigma", True) else "ddpmpp-cifar10-vp"]
    fourier = unet_config.get("time_embedding_type", "positional") == "fourier"
    return PRESETS["ncsnpp-cifar10-ve-unet2d" if fourier else "ddpmpp-cifar10-vp-unet2d"]


def _same(first, second) -> bool:
    """Config values equal up to list / tuple (a JSON round trip turns tuples into lists)."""
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return list(first) == list(second)
    return first == second
