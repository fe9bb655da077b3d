"""The score network of Song et al. (2021), NCSN++ / DDPM++, as a diffusers model.

`NCSNppModel` is the network every DiNof config builds (`model.name = 'ncsnpp'`; DDPM++ is the same class with other
options), written for this package after the paper and the published layout (yang-song/score_sde_pytorch and
MohsenZand/DiNof `models/ncsnpp.py`, `layerspp.py`, `up_or_down_sampling.py`). FIR up- and down-sampling (StyleGAN2's
upfirdn2d) are depthwise convolutions in plain PyTorch, so the model runs on CPU, GPU and under `torch.compile`
without a compiled extension.

Layout. `down_blocks[i]` is resolution level i (0 = the input resolution), `up_blocks[j]` the level L-1-j (0 = the
coarsest, as in diffusers). The published code keeps every layer in one flat `all_modules` list;
`NCSNppModel.from_original_state_dict` / `to_original_state_dict` translate between the two namings (the map is
`NCSNppModel.original_key_map`), and every parameter keeps its published shape, so the map is a pure renaming.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..validation import check_choice, check_int, check_number, check_positive_int
from .ncsnpp_layers import (
    SQRT2,
    AttentionBlock,
    Combine,
    Downsample,
    FourierProjection,
    ResnetBlockBigGAN,
    ResnetBlockDDPM,
    Upsample,
    conv3x3,
    default_init_,
    fir_downsample_2d,
    fir_kernel_2d,
    fir_upsample_2d,
    group_norm,
    positional_embedding,
)

RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE_TYPES = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT_TYPES = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE_TYPES = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")
# Options the published configs set to one value only; the published code has no other value for them (or, for
# conv_size, never reads it).
ONLY_PUBLISHED_VALUES = {
    "normalization": "GroupNorm",
    "nonlinearity": "swish",
    "attention_type": "ddpm",
    "conv_size": 3,
}

# The published code's (DataParallel) prefix and its flat module list.
_DATA_PARALLEL_PREFIX = "module."
_ORIGINAL_MODULES = "all_modules"
# The published network registers its SMLD noise levels as a float64 buffer; here they follow from the config.
_ORIGINAL_SIGMAS = "sigmas"


@dataclass
class NCSNppOutput(BaseOutput):
    """The output of [`NCSNppModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            The network output: the score for `scale_by_sigma` models, the noise prediction otherwise.
    """

    sample: torch.Tensor = None


class NCSNppModel(ModelMixin, ConfigMixin):
    r"""NCSN++ / DDPM++ (Song et al., 2021), the score network of every published DiNof config.

    Call it like `UNet2DModel`: `model(sample, timestep).sample`. `timestep` is what the published `get_score_fn`
    feeds the network (T = 1, t in [eps, T], N = `num_scales`):

    | published model       | embedding    | `timestep`                          | output                       |
    |-----------------------|--------------|-------------------------------------|------------------------------|
    | VE continuous         | `fourier`    | sigma(t), the marginal std          | score: net(x) / sigma        |
    | VE discrete (SMLD)    | `positional` | integer label round((T - t)(N - 1)) | score: net(x) / sigma_label  |
    | VP, sub-VP continuous | `positional` | 999 t                               | noise: score = -output / std |
    | VP discrete (DDPM)    | `positional` | t (N - 1), a float                  | noise: score = -output / std |

    The SMLD label indexes the network's *descending* noise levels sigma_label = exp(log sigma_max + label / (N - 1)
    (log sigma_min - log sigma_max)): label 0 is sigma_max. With `scale_by_sigma` the network divides its output by
    sigma: the timestep itself with Fourier features, sigma_label of the (truncated) label with positional ones.
    `centered=False` means the input is in [0, 1] and is mapped to 2x - 1 first (the VE configs); the VP and sub-VP
    configs feed data in [-1, 1] (`centered=True`). The defaults are the CIFAR-10 NCSN++ VE config
    (`NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve"]`, in `ncsnpp_configs.py` with the other six).

    Attention follows the layout built for `sample_size` (the levels whose resolution is in `attn_resolutions`); the
    published code decides it from the width of the input, which is the same at `sample_size`. The Gaussian Fourier
    features' weight is a parameter with `requires_grad=False`, as published: counted by `parameters()`, never
    trained, absent from the published EMA.

    Args:
        sample_size (`int`): input height = width; sets which levels have attention (`attn_resolutions`).
        in_channels (`int`): image channels (also the output channels).
        nf (`int`): base width; level i has `nf * ch_mult[i]` channels.
        ch_mult (`Sequence[int]`): width multipliers, one resolution level each.
        num_res_blocks (`int`): residual blocks per level on the way down (one more on the way up).
        attn_resolutions (`Sequence[int]`): resolutions with self-attention after the residual blocks.
        dropout (`float`): dropout in the residual blocks.
        resamp_with_conv (`bool`): `ddpm` blocks only: up/down-sampling layers with a 3x3 convolution.
        conditional (`bool`): condition on the noise level (time embedding added in every residual block).
        fir (`bool`): FIR (StyleGAN2) up/down-sampling with `fir_kernel`; nearest / average pooling otherwise.
        fir_kernel (`Sequence[int]`): the separable FIR kernel, normalised.
        skip_rescale (`bool`): divide residual sums by sqrt(2).
        resblock_type (`str`): `"biggan"` (resampling inside residual blocks) or `"ddpm"`.
        progressive (`str`): output pyramid `"none"`, `"output_skip"` or `"residual"`.
        progressive_input (`str`): input pyramid `"none"`, `"input_skip"` or `"residual"`.
        progressive_combine (`str`): how `input_skip` joins the pyramid, `"sum"` or `"cat"`.
        embedding_type (`str`): `"fourier"` (Gaussian Fourier features of log sigma) or `"positional"`.
        fourier_scale (`float`): std of the Fourier features' frequencies.
        init_scale (`float`): initial scale of the last layer of each residual branch (0 -> 1e-10, as published).
        scale_by_sigma (`bool`): divide the output by sigma (VE score models).
        centered (`bool`): inputs are already in [-1, 1]; otherwise they are in [0, 1] and mapped to 2x - 1.
        sigma_min (`float`), sigma_max (`float`), num_scales (`int`): the SMLD noise levels (used by positional
            embeddings with `scale_by_sigma`; stored in the published state dict as `sigmas`).
        normalization (`str`), nonlinearity (`str`), attention_type (`str`), conv_size (`int`): accept only their
            published values "GroupNorm", "swish", "ddpm" and 3.
    """

    # The `DiNofScheduler.model_conditioning` whose labels this network takes (the published ones; DiNofPipeline
    # checks it for discrete models).
    model_conditioning = "score_sde"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        fir: bool = True,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "residual",
        progressive_combine: str = "sum",
        embedding_type: str = "fourier",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        scale_by_sigma: bool = True,
        centered: bool = False,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
        normalization: str = "GroupNorm",
        nonlinearity: str = "swish",
        attention_type: str = "ddpm",
        conv_size: int = 3,
    ):
        super().__init__()
        for name, value in (
            ("normalization", normalization),
            ("nonlinearity", nonlinearity),
            ("attention_type", attention_type),
            ("conv_size", conv_size),
        ):
            if value != ONLY_PUBLISHED_VALUES[name]:
                raise ValueError(
                    f"`{name}` must be {ONLY_PUBLISHED_VALUES[name]!r} (the only value of the published NCSN++ "
                    f"configs), got {value!r}."
                )
        check_choice(resblock_type, "resblock_type", RESBLOCK_TYPES)
        check_choice(progressive, "progressive", PROGRESSIVE_TYPES)
        check_choice(progressive_input, "progressive_input", PROGRESSIVE_INPUT_TYPES)
        check_choice(progressive_combine, "progressive_combine", PROGRESSIVE_COMBINE_TYPES)
        check_choice(embedding_type, "embedding_type", EMBEDDING_TYPES)
        for name, value in (("nf", nf), ("num_res_blocks", num_res_blocks), ("in_channels", in_channels)):
            check_positive_int(value, name)
        if len(ch_mult) == 0:
            raise ValueError("`ch_mult` must name at least one resolution level, got an empty sequence.")
        for mult in ch_mult:
            check_positive_int(mult, "ch_mult")
        num_levels = len(ch_mult)
        check_positive_int(sample_size, "sample_size")
        if sample_size % 2 ** (num_levels - 1):
            raise ValueError(
                f"`sample_size` must be divisible by 2 ** (len(ch_mult) - 1) = {2 ** (num_levels - 1)}, got "
                f"{sample_size!r}."
            )
        check_number(dropout, "dropout", 0.0, 1.0)
        check_number(sigma_min, "sigma_min", 0.0, exclusive_minimum=True)
        check_number(sigma_max, "sigma_max", sigma_min, exclusive_minimum=True)
        check_int(num_scales, "num_scales", minimum=2)

        # The published module order (its `all_modules` indices), as names of this model's submodules.
        self._original_order: List[str] = []

        def add(name: str, module: nn.Module) -> nn.Module:
            self._original_order.append(name)
            return module

        # The published blocks get a time-embedding projection even when `conditional=False` (then unused).
        temb_dim = 4 * nf
        if embedding_type == "fourier":
            self.time_proj = add("time_proj", FourierProjection(nf, scale=fourier_scale, log=True))
            embed_dim = 2 * nf
        else:
            self.time_proj = None
            embed_dim = nf
        if conditional:
            self.time_embedding = TimestepEmbedding(embed_dim, 4 * nf, act_fn="silu")
            for name in ("linear_1", "linear_2"):
                layer = add(f"time_embedding.{name}", getattr(self.time_embedding, name))
                default_init_(layer.weight)
                nn.init.zeros_(layer.bias)
        else:
            self.time_embedding = None

        fir_kernel = tuple(fir_kernel)
        common = dict(dropout=dropout, skip_rescale=skip_rescale, init_scale=init_scale, temb_dim=temb_dim)

        def resnet(in_ch, out_ch=None, up=False, down=False):
            if resblock_type == "ddpm":
                return ResnetBlockDDPM(in_ch, out_ch, **common)
            return ResnetBlockBigGAN(in_ch, out_ch, fir=fir, fir_kernel=fir_kernel, up=up, down=down, **common)

        def attention(channels):
            return AttentionBlock(channels, skip_rescale=skip_rescale, init_scale=init_scale)

        resolutions = [sample_size // 2**i for i in range(num_levels)]
        channels = in_channels
        self.conv_in = add("conv_in", conv3x3(channels, nf))
        skip_channels = [nf]
        in_ch = nf
        pyramid_ch = channels
        self.down_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            prefix = f"down_blocks.{i}"
            level = nn.Module()
            level.resnets, level.attentions = nn.ModuleList(), nn.ModuleList()
            has_attention = resolutions[i] in attn_resolutions
            for j in range(num_res_blocks):
                level.resnets.append(add(f"{prefix}.resnets.{j}", resnet(in_ch, nf * mult)))
                in_ch = nf * mult
                if has_attention:
                    level.attentions.append(add(f"{prefix}.attentions.{j}", attention(in_ch)))
                skip_channels.append(in_ch)
            level.downsampler = level.pyramid_combine = level.pyramid_downsample = None
            if i != num_levels - 1:
                if resblock_type == "ddpm":
                    level.downsampler = Downsample(in_ch, None, resamp_with_conv, fir, fir_kernel)
                else:
                    level.downsampler = resnet(in_ch, down=True)
                add(f"{prefix}.downsampler", level.downsampler)
                if progressive_input == "input_skip":
                    level.pyramid_combine = add(
                        f"{prefix}.pyramid_combine", Combine(pyramid_ch, in_ch, progressive_combine)
                    )
                    if progressive_combine == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    level.pyramid_downsample = add(
                        f"{prefix}.pyramid_downsample", Downsample(pyramid_ch, in_ch, True, fir, fir_kernel)
                    )
                    pyramid_ch = in_ch
                skip_channels.append(in_ch)
            self.down_blocks.append(level)

        in_ch = skip_channels[-1]
        self.mid_block = nn.Module()
        self.mid_block.resnet_1 = add("mid_block.resnet_1", resnet(in_ch))
        self.mid_block.attention = add("mid_block.attention", attention(in_ch))
        self.mid_block.resnet_2 = add("mid_block.resnet_2", resnet(in_ch))

        self.up_blocks = nn.ModuleList()
        pyramid_ch = 0
        for j, i in enumerate(reversed(range(num_levels))):
            prefix = f"up_blocks.{j}"
            level = nn.Module()
            level.resnets = nn.ModuleList()
            for k in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i]
                level.resnets.append(add(f"{prefix}.resnets.{k}", resnet(in_ch + skip_channels.pop(), out_ch)))
                in_ch = out_ch
            level.attention = None
            if resolutions[i] in attn_resolutions:
                level.attention = add(f"{prefix}.attention", attention(in_ch))
            level.pyramid_norm = level.pyramid_conv = level.pyramid_upsample = None
            if progressive == "output_skip" or (progressive == "residual" and i == num_levels - 1):
                level.pyramid_norm = add(f"{prefix}.pyramid_norm", group_norm(in_ch))
                if progressive == "output_skip":
                    level.pyramid_conv = conv3x3(in_ch, channels, init_scale=init_scale)
                    pyramid_ch = channels
                else:
                    level.pyramid_conv = conv3x3(in_ch, in_ch)
                    pyramid_ch = in_ch
                add(f"{prefix}.pyramid_conv", level.pyramid_conv)
            elif progressive == "residual":
                level.pyramid_upsample = add(
                    f"{prefix}.pyramid_upsample", Upsample(pyramid_ch, in_ch, True, fir, fir_kernel)
                )
                pyramid_ch = in_ch
            level.upsampler = None
            if i != 0:
                if resblock_type == "ddpm":
                    level.upsampler = Upsample(in_ch, None, resamp_with_conv, fir, fir_kernel)
                else:
                    level.upsampler = resnet(in_ch, up=True)
                add(f"{prefix}.upsampler", level.upsampler)
            self.up_blocks.append(level)

        if progressive != "output_skip":
            self.norm_out = add("norm_out", group_norm(in_ch))
            self.conv_out = add("conv_out", conv3x3(in_ch, channels, init_scale=init_scale))
        else:
            self.norm_out = self.conv_out = None
        if fir:
            # The parameter-free FIR resampling of the input / output pyramids.
            self.register_buffer("fir_filter", fir_kernel_2d(fir_kernel), persistent=False)

    # ------------------------------------------------------------------------------------------------------------
    # forward

    def _pyramid_resample(self, x: torch.Tensor, up: bool) -> torch.Tensor:
        if self.config.fir:
            return fir_upsample_2d(x, self.fir_filter) if up else fir_downsample_2d(x, self.fir_filter)
        return F.interpolate(x, scale_factor=2, mode="nearest") if up else F.avg_pool2d(x, 2, stride=2)

    def _sigma_of_label(self, labels: torch.Tensor) -> torch.Tensor:
        """sigma_label of the published descending `sigmas` (exp of linspace(log sigma_max, log sigma_min, N))."""
        dtype = torch.float32 if labels.device.type == "mps" else torch.float64
        log_max, log_min = math.log(self.config.sigma_max), math.log(self.config.sigma_min)
        step = (log_min - log_max) / (self.config.num_scales - 1)
        return torch.exp(log_max + step * labels.long().to(dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        return_dict: bool = True,
    ) -> Union[NCSNppOutput, Tuple[torch.Tensor]]:
        """Evaluates the network.

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the noisy input, in [0, 1] if `centered=False`.
            timestep (`torch.Tensor` of shape `(B,)` or `()`, or a number): the conditioning, as in the class
                docstring's table (sigma for Fourier features, the label / 999 t / t (N - 1) for positional ones).
            return_dict (`bool`): return an `NCSNppOutput` (default) or a tuple.

        Returns:
            `NCSNppOutput` with `sample` of shape `(B, C, H, W)` in the dtype of `sample`, or `(sample,)`.
        """
        cfg = self.config
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep[None]
        if timestep.ndim != 1 or timestep.shape[0] not in (1, sample.shape[0]):
            raise ValueError(
                f"`timestep` must be a number or a tensor of shape () or (batch_size,) = ({sample.shape[0]},), got "
                f"shape {tuple(timestep.shape)}."
            )
        timestep = timestep.expand(sample.shape[0])

        # The time embedding is computed in float32 (Fourier phases reach ~1e3 rad) and then cast to the model's dtype.
        if cfg.embedding_type == "fourier":
            sigmas = timestep.float()
            temb = self.time_proj(sigmas)
        else:
            temb = positional_embedding(timestep, cfg.nf)
        if self.time_embedding is not None:
            temb = self.time_embedding(temb.to(self.time_embedding.linear_1.weight.dtype))
        else:
            temb = None

        x = sample if cfg.centered else 2 * sample - 1.0
        pyramid = x if cfg.progressive_input != "none" else None
        hs = [self.conv_in(x)]
        for level in self.down_blocks:
            for j, block in enumerate(level.resnets):
                h = block(hs[-1], temb)
                if len(level.attentions):
                    h = level.attentions[j](h)
                hs.append(h)
            if level.downsampler is None:
                continue
            h = level.downsampler(hs[-1], temb) if cfg.resblock_type == "biggan" else level.downsampler(hs[-1])
            if level.pyramid_combine is not None:
                pyramid = self._pyramid_resample(pyramid, up=False)
                h = level.pyramid_combine(pyramid, h)
            elif level.pyramid_downsample is not None:
                pyramid = level.pyramid_downsample(pyramid)
                pyramid = (pyramid + h) / SQRT2 if cfg.skip_rescale else pyramid + h
                h = pyramid
            hs.append(h)

        h = self.mid_block.resnet_1(hs[-1], temb)
        h = self.mid_block.attention(h)
        h = self.mid_block.resnet_2(h, temb)

        pyramid = None
        for level in self.up_blocks:
            for block in level.resnets:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if level.attention is not None:
                h = level.attention(h)
            if cfg.progressive == "output_skip":
                pyramid_h = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
                pyramid = pyramid_h if pyramid is None else self._pyramid_resample(pyramid, up=True) + pyramid_h
            elif cfg.progressive == "residual":
                if pyramid is None:
                    pyramid = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
                else:
                    pyramid = level.pyramid_upsample(pyramid)
                    pyramid = (pyramid + h) / SQRT2 if cfg.skip_rescale else pyramid + h
                    h = pyramid
            if level.upsampler is not None:
                h = level.upsampler(h, temb) if cfg.resblock_type == "biggan" else level.upsampler(h)

        if cfg.progressive == "output_skip":
            h = pyramid
        else:
            h = self.conv_out(F.silu(self.norm_out(h)))

        if cfg.scale_by_sigma:
            if cfg.embedding_type == "positional":
                sigmas = self._sigma_of_label(timestep)
            h = h / sigmas.to(h.dtype)[:, None, None, None]
        h = h.to(sample.dtype)
        if not return_dict:
            return (h,)
        return NCSNppOutput(sample=h)

    # ------------------------------------------------------------------------------------------------------------
    # the published naming

    def _original_sigmas(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The published `sigmas` buffer: exp(linspace(log sigma_max, log sigma_min, num_scales)), float64."""
        log_max, log_min = math.log(self.config.sigma_max), math.log(self.config.sigma_min)
        return torch.linspace(log_max, log_min, self.config.num_scales, dtype=torch.float64, device=device).exp()

    def original_key_map(self) -> Dict[str, str]:
        """This model's state-dict keys -> the published keys (`all_modules.{index}.{published name}`).

        In the published order: module index by module index, within a module in its registration order, which is
        the published one. The published buffer `sigmas` has no counterpart here (it follows from the config).
        """
        key_map = {}
        for index, name in enumerate(self._original_order):
            module = self.get_submodule(name)
            for local_key in module.state_dict():
                key_map[f"{name}.{local_key}"] = f"{_ORIGINAL_MODULES}.{index}.{_original_name(module, local_key)}"
        return key_map

    def original_parameter_names(self, requires_grad_only: bool = True) -> List[str]:
        """The published parameter names in the published `model.parameters()` order.

        With `requires_grad_only` (default) this is the order of the published EMA's `shadow_params` (score_sde's
        `ExponentialMovingAverage` keeps the parameters that require grad): every parameter except the Fourier
        features' fixed `W`.
        """
        parameters = dict(self.named_parameters())
        return [
            original
            for key, original in self.original_key_map().items()
            if key in parameters and (parameters[key].requires_grad or not requires_grad_only)
        ]

    def to_original_state_dict(self) -> Dict[str, torch.Tensor]:
        """This model's weights in the published naming and order, with the published float64 `sigmas` buffer."""
        state = self.state_dict()
        original = {_ORIGINAL_SIGMAS: self._original_sigmas(self.conv_in.weight.device)}
        original.update({published: state[key] for key, published in self.original_key_map().items()})
        return original

    @classmethod
    def from_original_state_dict(
        cls, state_dict: Dict[str, torch.Tensor], torch_dtype: Optional[torch.dtype] = None, **config
    ) -> "NCSNppModel":
        """Builds a model from a state dict of the published layout (score_sde_pytorch / DiNof `NCSNpp`).

        Keys `all_modules.{i}.{...}` and `sigmas`, with or without the `module.` prefix of `DataParallel`. The
        architecture cannot be read from the keys alone: pass the published config (e.g.
        `**NCSNPP_PUBLISHED_CONFIGS[name]`); the keys and shapes are then checked against it.

        Args:
            state_dict (`Dict[str, torch.Tensor]`): the published network's (or its EMA's) state dict.
            torch_dtype (`torch.dtype`, *optional*): dtype of the model; defaults to that of the weights.
            **config: the `NCSNppModel` config.

        Returns:
            `NCSNppModel` in evaluation mode.

        Raises:
            ValueError: missing, unexpected or mis-shaped keys (all listed), or `sigmas` that disagree with
                `sigma_min`, `sigma_max`, `num_scales`.
        """
        if state_dict and all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state_dict):
            state_dict = {key[len(_DATA_PARALLEL_PREFIX) :]: value for key, value in state_dict.items()}
        with torch.device("meta"):
            model = cls(**config)
        key_map = model.original_key_map()
        expected = {published: key for key, published in key_map.items()}
        meta_state = model.state_dict()
        expected_shapes = {published: tuple(meta_state[key].shape) for published, key in expected.items()}
        expected_shapes[_ORIGINAL_SIGMAS] = (model.config.num_scales,)

        missing = [key for key in expected_shapes if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected_shapes]
        mis_shaped = [
            f"{key}: {tuple(value.shape)} (expected {expected_shapes[key]})"
            for key, value in state_dict.items()
            if key in expected_shapes and tuple(value.shape) != expected_shapes[key]
        ]
        if missing or unexpected or mis_shaped:
            problems = []
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
                if keys:
                    problems.append(f"{len(keys)} {label}: {', '.join(keys)}")
            raise ValueError(
                "The state dict does not fit NCSNppModel with this config (published layout "
                f"`all_modules.N...`); {'; '.join(problems)}."
            )
        sigmas = state_dict[_ORIGINAL_SIGMAS].detach().to("cpu", torch.float64)
        if not torch.allclose(sigmas, model._original_sigmas(), rtol=1e-5, atol=0.0):
            raise ValueError(
                f"The state dict's `sigmas` (from {sigmas[0].item():g} down to {sigmas[-1].item():g}) disagree with "
                f"`sigma_max`={model.config.sigma_max}, `sigma_min`={model.config.sigma_min}, "
                f"`num_scales`={model.config.num_scales}."
            )

        dtype = torch_dtype or next(v.dtype for k, v in state_dict.items() if k != _ORIGINAL_SIGMAS)
        model = cls(**config)
        model.load_state_dict({key: state_dict[published] for key, published in key_map.items()})
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast, even with none.
        return nn.Module.to(model, dtype=dtype).eval()


def _original_name(module: nn.Module, key: str) -> str:
    """Translates a key local to `module` through the `_original_names` of the modules along its path."""
    parts = []
    for part in key.split("."):
        parts.append(getattr(module, "_original_names", {}).get(part, part))
        module = getattr(module, part, None)
    return ".".join(parts)
