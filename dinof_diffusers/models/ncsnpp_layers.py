"""The layers of NCSN++ / DDPM++ (`NCSNppModel`), after the published `layerspp.py` and `up_or_down_sampling.py`.

Every layer keeps the published parameter shapes; `_original_names` gives the published name of each child where it
differs, for `NCSNppModel.original_key_map`. FIR resampling (StyleGAN2's upfirdn2d) is a depthwise (transposed)
convolution in plain PyTorch.
"""

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import GaussianFourierProjection
from torch import nn

SQRT2 = math.sqrt(2.0)


def default_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's initialisation (the published `default_init`): variance scaling, fan_avg, uniform; scale 0 -> 1e-10.

    Fans are taken with the published axes (in = dim 1, out = dim 0), also for `NIN` weights stored (in, out).
    """
    scale = 1e-10 if scale == 0 else scale
    receptive_field = weight[0, 0].numel()
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive_field / 2
    bound = math.sqrt(3 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv(in_ch: int, out_ch: int, kernel_size: int, init_scale: float = 1.0, **kwargs) -> nn.Conv2d:
    layer = nn.Conv2d(in_ch, out_ch, kernel_size, **kwargs)
    default_init_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def conv3x3(in_ch: int, out_ch: int, init_scale: float = 1.0, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return conv(in_ch, out_ch, 3, init_scale, stride=stride, padding=padding)


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    return conv(in_ch, out_ch, 1)


def group_norm(channels: int) -> nn.GroupNorm:
    """The published GroupNorm: min(channels // 4, 32) groups, eps 1e-6."""
    groups = min(channels // 4, 32)
    if groups == 0 or channels % groups:
        raise ValueError(
            f"A layer of {channels} channels cannot be normalised by GroupNorm with min(channels // 4, 32) = {groups} "
            "groups: choose `nf` and `ch_mult` so that every width (and every sum of two widths concatenated on the "
            "way up) has at least 4 channels and is divisible by its group count (e.g. multiples of 32)."
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


def fir_kernel_2d(fir_kernel: Sequence[float]) -> torch.Tensor:
    """The 2D FIR filter of a 1D (separable) or 2D kernel, normalised to sum 1 (float32, as published)."""
    k = torch.tensor(fir_kernel, dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    return k / k.sum()


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: Tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """StyleGAN2's upfirdn2d: upsample by zero insertion, pad, convolve each channel with `kernel`, downsample.

    Equal to the published `upfirdn2d_native` (same padding and output size) computed as one depthwise transposed
    convolution (up > 1) or one strided depthwise convolution, without materialising the zero-stuffed image.

    Args:
        x (`torch.Tensor` of shape `(B, C, H, W)`): the input.
        kernel (`torch.Tensor` of shape `(K, K)`): the FIR filter (a true convolution, as published).
        up, down (`int`): up- and down-sampling factors (one of them 1).
        pad (`(int, int)`): padding before and after, in both spatial dimensions, at the upsampled resolution.

    Returns:
        `torch.Tensor` of shape `(B, C, (H * up + pad[0] + pad[1] - K) // down + 1, ...)`.
    """
    channels = x.shape[1]
    size = kernel.shape[0]
    pad0, pad1 = pad
    if up > 1:
        # out[o] = full transposed convolution (kernel unflipped) at o + K - 1 - pad0: crop / pad both ends.
        weight = kernel.to(x.dtype).expand(channels, 1, size, size)
        before, after = pad0 - size + 1, up + pad1 - size
        if before == after and before <= 0:
            return F.conv_transpose2d(x, weight, stride=up, padding=-before, groups=channels)
        x = F.conv_transpose2d(x, weight, stride=up, groups=channels)
        return F.pad(x, [before, after, before, after])
    weight = kernel.flip(0, 1).to(x.dtype).expand(channels, 1, size, size)
    if pad0 == pad1 and pad0 >= 0:
        return F.conv2d(x, weight, stride=down, padding=pad0, groups=channels)
    return F.conv2d(F.pad(x, [pad0, pad1, pad0, pad1]), weight, stride=down, groups=channels)


def fir_upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The published `upsample_2d`: (B, C, H, W) -> (B, C, 2H, 2W) with the filter kernel * factor^2."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The published `downsample_2d`: (B, C, H, W) -> (B, C, H/2, W/2)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


class NIN(nn.Module):
    """A dense layer over the channels of (B, C, H, W) ("network in network"), weight stored (in, out) as published.

    Args:
        in_ch (`int`), out_ch (`int`): channels.
        init_scale (`float`): scale of the DDPM initialisation (0.1 by default, as published).
    """

    _original_names = {"weight": "W", "bias": "b"}

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(default_init_(torch.empty(in_ch, out_ch), init_scale))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.t()[:, :, None, None], self.bias)


class AttentionBlock(nn.Module):
    """Self-attention over the H x W positions of (B, C, H, W), single head, residual (the published `AttnBlockpp`)."""

    _original_names = {"norm": "GroupNorm_0", "to_q": "NIN_0", "to_k": "NIN_1", "to_v": "NIN_2", "to_out": "NIN_3"}

    def __init__(self, channels: int, skip_rescale: bool, init_scale: float):
        super().__init__()
        self.norm = group_norm(channels)
        self.to_q = NIN(channels, channels)
        self.to_k = NIN(channels, channels)
        self.to_v = NIN(channels, channels)
        self.to_out = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        h = self.to_out(h.transpose(1, 2).reshape(b, c, height, width))
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class Upsample(nn.Module):
    """x2 upsampling (the published `layerspp.Upsample`): nearest (+ 3x3 conv), or FIR (+ fused transposed conv).

    Only `resblock_type="ddpm"` and `progressive="residual"` use this layer, and no published config does. Two of its
    paths do not run in the published PyTorch code: without FIR it passes `'nearest'` to `F.interpolate` as
    `scale_factor`, and its `upsample_conv_2d` slices a tensor with a negative step and gives `conv_transpose2d` a
    four-element stride. Here both follow their evident meaning (nearest x2; StyleGAN2's fused op, as in the JAX
    score_sde: stride-2 transposed convolution with the flipped kernel, then the FIR filter), which agrees with the
    published code once those three lines are corrected.
    """

    def __init__(self, in_ch: int, out_ch: Optional[int], with_conv: bool, fir: bool, fir_kernel: Sequence[float]):
        super().__init__()
        out_ch = out_ch or in_ch
        self.with_conv, self.fir = with_conv, fir
        if with_conv:
            self.conv = conv3x3(in_ch, out_ch)
            self._original_names = {"conv": "Conv2d_0" if fir else "Conv_0"}
        if fir:
            self.register_buffer("fir_filter", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.with_conv else x
        if not self.with_conv:
            return fir_upsample_2d(x, self.fir_filter)
        # The published `upsample_conv_2d`: stride-2 transposed conv (flipped weights), then the FIR filter.
        weight = self.conv.weight
        kernel_size, factor = weight.shape[-1], 2
        x = F.conv_transpose2d(x, weight.flip(2, 3).transpose(0, 1), stride=factor)
        p = (self.fir_filter.shape[0] - factor) - (kernel_size - 1)
        x = upfirdn2d(x, self.fir_filter * factor**2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
        return x + self.conv.bias[:, None, None]


class Downsample(nn.Module):
    """/2 downsampling (the published `layerspp.Downsample`): average pool or stride-2 3x3 conv, or FIR (+ conv)."""

    def __init__(self, in_ch: int, out_ch: Optional[int], with_conv: bool, fir: bool, fir_kernel: Sequence[float]):
        super().__init__()
        out_ch = out_ch or in_ch
        self.with_conv, self.fir = with_conv, fir
        if with_conv:
            self.conv = conv3x3(in_ch, out_ch, stride=2, padding=0)
            self._original_names = {"conv": "Conv2d_0" if fir else "Conv_0"}
        if fir:
            self.register_buffer("fir_filter", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            if self.with_conv:
                return self.conv(F.pad(x, (0, 1, 0, 1)))
            return F.avg_pool2d(x, 2, stride=2)
        if not self.with_conv:
            return fir_downsample_2d(x, self.fir_filter)
        # The published `conv_downsample_2d`: the FIR filter, then the stride-2 conv.
        p = (self.fir_filter.shape[0] - 2) + (self.conv.weight.shape[-1] - 1)
        return self.conv(upfirdn2d(x, self.fir_filter, pad=((p + 1) // 2, p // 2)))


class _ResnetBlock(nn.Module):
    """The residual block both published kinds share; they differ in the shortcut and the resampling.

    GroupNorm -> swish -> (resampling) -> 3x3 conv, plus the projected time embedding, -> GroupNorm -> swish ->
    dropout -> 3x3 conv; the sum with the (projected) input is divided by sqrt(2) with `skip_rescale`.
    """

    _original_names = {
        "norm1": "GroupNorm_0",
        "conv1": "Conv_0",
        "time_emb_proj": "Dense_0",
        "norm2": "GroupNorm_1",
        "conv2": "Conv_1",
    }

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        dropout: float,
        skip_rescale: bool,
        init_scale: float,
        shortcut: Optional[nn.Module],
    ):
        super().__init__()
        # Registered in the published order, the order of `parameters()` and of the published EMA's shadow_params.
        self.norm1 = group_norm(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        default_init_(self.time_emb_proj.weight)
        nn.init.zeros_(self.time_emb_proj.bias)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.shortcut = shortcut
        self.skip_rescale = skip_rescale

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class ResnetBlockDDPM(_ResnetBlock):
    """DDPM's residual block with skip rescaling (the published `ResnetBlockDDPMpp`), NIN shortcut."""

    _original_names = {**_ResnetBlock._original_names, "shortcut": "NIN_0"}

    def __init__(
        self, in_ch: int, out_ch: Optional[int], temb_dim: int, dropout: float, skip_rescale: bool, init_scale: float
    ):
        out_ch = out_ch or in_ch
        shortcut = NIN(in_ch, out_ch) if in_ch != out_ch else None
        super().__init__(in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale, shortcut)


class ResnetBlockBigGAN(_ResnetBlock):
    """BigGAN's residual block (the published `ResnetBlockBigGANpp`): optionally up- or down-sampling both branches
    after the first activation (FIR, or nearest / average pooling), 1x1 conv shortcut."""

    _original_names = {**_ResnetBlock._original_names, "shortcut": "Conv_2"}

    def __init__(
        self,
        in_ch: int,
        out_ch: Optional[int],
        temb_dim: int,
        dropout: float,
        skip_rescale: bool,
        init_scale: float,
        fir: bool,
        fir_kernel: Sequence[float],
        up: bool = False,
        down: bool = False,
    ):
        out_ch = out_ch or in_ch
        shortcut = conv1x1(in_ch, out_ch) if (in_ch != out_ch or up or down) else None
        super().__init__(in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale, shortcut)
        self.up, self.down, self.fir = up, down, fir
        if fir and (up or down):
            self.register_buffer("fir_filter", fir_kernel_2d(fir_kernel), persistent=False)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return fir_upsample_2d(x, self.fir_filter) if self.fir else F.interpolate(x, scale_factor=2.0)
        if self.down:
            return fir_downsample_2d(x, self.fir_filter) if self.fir else F.avg_pool2d(x, 2, stride=2)
        return x


class Combine(nn.Module):
    """Combines the input pyramid with the features: 1x1 conv of the pyramid, then sum or concatenation."""

    _original_names = {"conv": "Conv_0"}

    def __init__(self, in_ch: int, out_ch: int, method: str):
        super().__init__()
        self.conv = conv1x1(in_ch, out_ch)
        self.method = method

    def forward(self, pyramid: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        p = self.conv(pyramid)
        return torch.cat([p, h], dim=1) if self.method == "cat" else p + h


class FourierProjection(GaussianFourierProjection):
    """diffusers' Gaussian Fourier features of log(sigma); the published layer calls its fixed weight `W`."""

    _original_names = {"weight": "W"}


def positional_embedding(timesteps: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """DDPM's sinusoidal embedding (B,) -> (B, dim), float32, in the published order of operations.

    diffusers' `get_timestep_embedding` computes the same frequencies in another order; at t ~ 1000 the results
    differ by ~3e-5, which the published weights would see.
    """
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -step)
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb
