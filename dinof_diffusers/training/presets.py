"""Training presets: the published DiNof / score-SDE configurations, as close as `UNet2DModel` can express them.

A preset bundles everything `training_scripts/train.py` needs to reproduce a configuration: the `UNet2DModel`
config, the matching `DiNofScheduler` settings, the flow prior's size and the optimisation settings (EMA decay, batch
size, loss reduction, learning rate and warm-up). Command-line flags override the individual values.

The score networks of Song et al. (2021) are NCSN++ and DDPM++, written for their own code base. diffusers'
`UNet2DModel` covers the same family (the google/ncsnpp-* and google/ddpm-* checkpoints are converted into it), but
not every option; each preset lists its differences from the original in `differences`.
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

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
        description (`str`): one line on what the preset reproduces.
        resolution (`int`): the image side length the configuration was published at.
        unet_config (`Dict[str, Any]`): keyword arguments of `UNet2DModel` (without `sample_size`, which the
            training script sets from `--resolution`).
        scheduler_config (`Dict[str, Any]`): keyword arguments of `DiNofScheduler`.
        flow_config (`Dict[str, Any]`): keyword arguments of `FlowPriorModel` (without `sample_size` / `in_channels`).
        ema_decay (`float`): EMA decay of the trained networks.
        train_batch_size (`int`): batch size (all processes together, as published).
        loss_reduction (`str`): "sum" (0.5 * sum over dimensions, Song et al.'s `reduce_mean=False`) or "mean".
        learning_rate (`float`): Adam learning rate.
        lr_warmup_steps (`int`): linear warm-up steps of the learning rate.
        differences (`str`): how the UNet differs from the original network.
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
    differences: str = ""
    reference: str = field(default="")

    def get_unet_config(self) -> Dict[str, Any]:
        """A copy of `unet_config` that the caller may modify."""
        return copy.deepcopy(self.unet_config)


_PUBLISHED_FLOW = {"num_levels": 3, "flow_depth": 16, "hidden_channels": 256}
# The PC sampler of every published configuration: N = 1000, reverse diffusion + one Langevin step, t* = 0.6 T.
_PUBLISHED_SAMPLER = {
    "num_train_timesteps": 1000,
    "predictor": "reverse_diffusion",
    "corrector": "langevin",
    "flow_start": 0.6,
}
# Song et al.'s NCSN++ VE configurations: name -> (config file, resolution, sigma_max, snr, train batch size).
_NCSNPP_VE_SETTINGS = {
    "ncsnpp-cifar10-ve": ("configs/ve/cifar10_ncsnpp_continuous.py", 32, 50.0, 0.16, 128),
    "ncsnpp-celebahq256-ve": ("configs/ve/celebahq_256_ncsnpp_continuous.py", 256, 348.0, 0.17, 8),
}


def _ve_score_scheduler(sigma_max: float, snr: float) -> Dict[str, Any]:
    """The `DiNofScheduler` settings of a continuous-time VE score model (NCSN++'s), with the published sampler."""
    return {
        "sde_type": "ve",
        "continuous": True,
        "prediction_type": "score",
        "sigma_min": 0.01,
        "sigma_max": sigma_max,
        "snr": snr,
        **_PUBLISHED_SAMPLER,
    }


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


def _ncsnpp_ve_preset(name: str, description: str, differences: str, unet_config: Dict[str, Any]) -> TrainingPreset:
    """NCSN++ with the VE SDE in continuous time (a score model), the published Glow, EMA 0.999, summed loss."""
    config_file, resolution, sigma_max, snr, train_batch_size = _NCSNPP_VE_SETTINGS[name]
    return TrainingPreset(
        name=name,
        description=description,
        resolution=resolution,
        unet_config=unet_config,
        scheduler_config=_ve_score_scheduler(sigma_max, snr),
        flow_config=dict(_PUBLISHED_FLOW),
        ema_decay=0.999,
        train_batch_size=train_batch_size,
        loss_reduction="sum",
        reference=f"score_sde {config_file}",
        differences=differences,
    )


def _ddpmpp_cifar10_preset(sde_type: str, sde_name: str) -> TrainingPreset:
    """DDPM++ on CIFAR-10 (continuous time, epsilon prediction) with the VP or the sub-VP SDE."""
    return TrainingPreset(
        name=f"ddpmpp-cifar10-{sde_type}",
        description=f"DDPM++ on CIFAR-10 32x32 with the {sde_name} SDE in continuous time (epsilon prediction).",
        resolution=32,
        unet_config={
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
        },
        scheduler_config={
            "sde_type": sde_type,
            "continuous": True,
            "prediction_type": "epsilon",
            "beta_min": 0.1,
            "beta_max": 20.0,
            "snr": 0.16,
            **_PUBLISHED_SAMPLER,
        },
        flow_config=dict(_PUBLISHED_FLOW),
        ema_decay=0.9999,
        train_batch_size=128,
        loss_reduction="mean",
        reference=f"score_sde configs/{sde_type}/cifar10_ddpmpp_continuous.py",
        differences=_DDPMPP_CIFAR10_DIFFERENCES,
    )


_PRESETS: Tuple[TrainingPreset, ...] = (
    _ncsnpp_ve_preset(
        "ncsnpp-cifar10-ve",
        "NCSN++ on CIFAR-10 32x32 with the VE SDE in continuous time (DiNof's main CIFAR-10 setting).",
        (
            "NCSN++ (Song et al., configs/ve/cifar10_ncsnpp_continuous.py): nf 128, ch_mult (1, 2, 2, 2), 4 residual "
            "blocks per resolution, attention at 16x16, BigGAN residual blocks with FIR resampling, progressive_input "
            "'residual', progressive 'none', dropout 0.1, Fourier features of log sigma (scale 16), output / sigma."
            + _NCSNPP_DIFFERENCES
            + " The CIFAR-10 NCSN++ uses progressive_input 'residual' and no output skip; UNet2DModel offers only the "
            "input_skip / output_skip blocks of the CelebA-HQ configuration."
        ),
        _skip_unet((128, 256, 256, 256), layers_per_block=4, attention_level=1, dropout=0.1),
    ),
    _ddpmpp_cifar10_preset("vp", "VP"),
    _ddpmpp_cifar10_preset("subvp", "sub-VP"),
    _ncsnpp_ve_preset(
        "ncsnpp-celebahq256-ve",
        "NCSN++ on CelebA-HQ 256x256 with the VE SDE in continuous time (sigma_max 348).",
        (
            "NCSN++ (Song et al., configs/ve/celebahq_256_ncsnpp_continuous.py): nf 128, ch_mult (1, 1, 2, 2, 2, 2, "
            "2), 2 residual blocks per resolution, attention at 16x16, progressive_input 'input_skip', progressive "
            "'output_skip', FIR, dropout 0, the layout of google/ncsnpp-celebahq-256." + _NCSNPP_DIFFERENCES + " "
            "Song et al. sample CelebA-HQ-256 with N = 2000 noise scales and snr 0.075; this preset follows DiNof's "
            "N = 1000 and snr 0.17."
        ),
        _skip_unet((128, 128, 256, 256, 256, 256, 256), layers_per_block=2, attention_level=4, dropout=0.0),
    ),
    TrainingPreset(
        name="tiny",
        description="A small NCSN++-style VE score network and Glow for CPU runs (the digits demo and the tests).",
        resolution=16,
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
        # Song et al.'s rule of thumb: sigma_max ~ the largest distance between two training images; 8.5 for the
        # 16x16 digits in [0, 1].
        scheduler_config=_ve_score_scheduler(sigma_max=10.0, snr=0.16),
        flow_config={"num_levels": 2, "flow_depth": 4, "hidden_channels": 32},
        ema_decay=0.999,
        train_batch_size=64,
        loss_reduction="sum",
        learning_rate=2e-3,
        lr_warmup_steps=100,
        reference="",
        differences=(
            "Not a published network: 3 resolutions of 16, 32 and 64 channels, one residual block each, plain "
            "convolutional resampling, no attention but in the mid block; the NCSN++ time embedding and output "
            "scaling (a VE score model). Learning rate 2e-3 with 100 warm-up steps, for runs of a few thousand steps."
        ),
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


def nearest_published_preset(time_embedding_type: str) -> TrainingPreset:
    """The published preset whose parameterisation a UNet has, for the defaults of a UNet given another way.

    A Fourier time embedding is NCSN++'s (a VE score model): "ncsnpp-cifar10-ve"; anything else is a DDPM-style noise
    predictor: "ddpmpp-cifar10-vp".
    """
    return PRESETS["ncsnpp-cifar10-ve" if time_embedding_type == "fourier" else "ddpmpp-cifar10-vp"]
