"""The DiNof normalizing flow prior: a multi-scale Glow (Kingma & Dhariwal, 2018) as a diffusers model.

`FlowPriorModel` maps the partially diffused data x(t*) deterministically and invertibly onto Gaussian latents, and
gives the exact log-density log p(x) = sum of the base log-densities of the latents + log|det J|. It implements the
layout of the published DiNof checkpoints (normflows' `MultiscaleFlow` of `GlowBlock`s, see docs/DESIGN.md, "The Glow
flow prior"; the shapes and the published keys are `glow_layout`'s), so that they load with
`FlowPriorModel.from_original_state_dict` and give the same log p.

Conventions. The "density direction" is x -> z (`encode`, `log_prob`), the "sampling direction" is z -> x (`decode`,
`sample`). Levels are numbered i = 0 (coarsest) ... L-1 (finest); step k of a level is step k of the published
`flows.{i}.{k}`. Density direction, for i = L-1 down to 0: squeeze (channel 4c + 2*dh + dw); steps k = K-1 ... 0,
each ActNorm -> invertible 1x1 convolution (LU) -> coupling; then (i > 0) split the channels in halves, the first
half goes on to level i-1 and the second half is the latent of level i; at i = 0 the whole tensor is the latent.

Implementation. The K steps of a level keep their parameters stacked along a leading dimension of size K, so that
everything that does not depend on the data is computed for the whole level at once: the 1x1 convolution weights W
(and, for sampling, W^-1 in float64), ActNorm folded into the 1x1 convolution as one convolution with bias, and the
data-independent part of log|det J|. A step then costs one 1x1 convolution, the three convolutions of the coupling
network and a few element-wise operations.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..validation import (
    check_choice,
    check_positive_int,
    check_range_pair,
    check_sample_arguments,
    check_size_pair,
    check_temperature,
)
from .glow_layout import (
    COUPLING_TYPES,
    FLOW_MARKER_KEY,
    GlowLayout,
    check_original_state_dict,
    coupling_out_channels,
    coupling_split,
    original_to_diffusers_state_dict,
    short_key_list,
    strip_module_prefix,
)

logger = logging.get_logger(__name__)

# Glow's base distributions parameterise mean = loc * exp(3 * loc_logs), log sigma = log_scale * exp(3 * ...).
LOGSCALE_FACTOR = 3.0
# ActNorm initialisation: s = log(unbiased std + ACTNORM_EPS).
ACTNORM_EPS = 1e-6
# Glow's affine coupling: scale = sigmoid(h + COUPLING_SCALE_OFFSET), so that it starts near sigmoid(2) ~ 0.88.
COUPLING_SCALE_OFFSET = 2.0


@dataclass
class FlowPriorOutput(BaseOutput):
    """The output of [`FlowPriorModel`] in the density direction.

    Args:
        latents (`List[torch.Tensor]`):
            One latent per level, level 0 (the coarsest) first; shapes as `FlowPriorModel.latent_shapes` with the
            batch dimension in front.
        log_prob (`torch.Tensor` of shape `(batch_size,)`):
            log p(x) in nats.
    """

    latents: Optional[List[torch.Tensor]] = None
    log_prob: Optional[torch.Tensor] = None


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """Space to depth: (B, C, H, W) -> (B, 4C, H/2, W/2), output channel 4c + 2*dh + dw."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """Depth to space, the inverse of `squeeze2d`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


def _channel_statistics(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased standard deviation of x (B, C, H, W) over batch, height and width.

    When `torch.distributed` is initialised, the sums, sums of squares and counts are all-reduced, so that every
    rank gets the statistics of the union of the ranks' batches. Computed in float64.
    """
    x64 = x.detach().to(torch.float64)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    stats = torch.cat([x64.sum(dim=(0, 2, 3)), x64.square().sum(dim=(0, 2, 3)), x64.new_full((1,), float(count))])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
    channels = x.shape[1]
    total, total_sq, count = stats[:channels], stats[channels : 2 * channels], stats[-1]
    mean = total / count
    if count.item() < 2:
        logger.warning("ActNorm initialisation saw a single value per channel; its scale is left at 1.")
        return mean, torch.ones_like(mean)
    var = ((total_sq - count * mean.square()) / (count - 1)).clamp_min(0.0)
    return mean, var.sqrt()


class GlowLevel(nn.Module):
    """The K flow steps of one level of the multi-scale Glow, and the base distribution of the level's latent.

    Parameters of step k are entry k of the stacked tensors (k as in the published `flows.{i}.{k}`):

    - ActNorm: `actnorm_log_scale` s and `actnorm_shift` t, (K, C); `actnorm_initialized` (K,) bool buffer.
      Density direction y = (x - t) * exp(-s).
    - 1x1 convolution: `conv_lower` L, `conv_upper` U, (K, C, C), `conv_log_s` (K, C); fixed buffers
      `conv_permutation` P (K, C, C) and `conv_sign_s` (K, C). W = P @ (tril(L, -1) + I) @ (triu(U, 1) +
      diag(sign_S * exp(log_S))). Only the strict triangles of L and U are used (as in the published layout).
    - coupling network: conv3x3(ceil(C/2) -> hidden) -> ReLU -> conv1x1 -> ReLU -> conv3x3(hidden -> out), with
      out = 2 * floor(C/2) (affine: shift and pre-sigmoid scale interleaved) or floor(C/2) (additive: shift only).
    - base distribution of the latent (C_z channels): `prior_loc`, `prior_loc_logs`, `prior_log_scale`,
      `prior_log_scale_logs`, (C_z,); mean = loc * exp(3 * loc_logs), log sigma = log_scale * exp(3 * ...).

    Args:
        channels (`int`): C, the channels the steps work on (after the squeeze).
        latent_channels (`int`): C_z, the channels of the level's latent (C / 2, or C for level 0).
        flow_depth (`int`): K.
        hidden_channels (`int`): width of the coupling networks.
        coupling (`str`): "affine" or "additive".
    """

    def __init__(self, channels: int, latent_channels: int, flow_depth: int, hidden_channels: int, coupling: str):
        super().__init__()
        c, k = channels, flow_depth
        self.channels = c
        self.flow_depth = k
        self.coupling = coupling
        self.split_channels = coupling_split(c)[0]
        c_in, c_out = self.split_channels, coupling_out_channels(c, coupling)

        self.actnorm_log_scale = nn.Parameter(torch.zeros(k, c))
        self.actnorm_shift = nn.Parameter(torch.zeros(k, c))
        self.register_buffer("actnorm_initialized", torch.zeros(k, dtype=torch.bool))

        # LU decomposition of random orthogonal matrices.
        q, _ = torch.linalg.qr(torch.randn(k, c, c, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper, dim1=-2, dim2=-1)
        self.register_buffer("conv_permutation", p.float())
        self.register_buffer("conv_sign_s", torch.sign(diag).float())
        self.conv_lower = nn.Parameter(lower.float())
        self.conv_upper = nn.Parameter(torch.triu(upper, diagonal=1).float())
        self.conv_log_s = nn.Parameter(diag.abs().log().float())

        # Coupling networks, initialised like nn.Conv2d; the last convolution is zero (identity coupling).
        def conv_init(out_ch, in_ch, size):
            weights, biases = [], []
            for _ in range(k):
                conv = nn.Conv2d(in_ch, out_ch, size)
                weights.append(conv.weight.detach())
                biases.append(conv.bias.detach())
            return nn.Parameter(torch.stack(weights)), nn.Parameter(torch.stack(biases))

        self.coupling_conv1_weight, self.coupling_conv1_bias = conv_init(hidden_channels, c_in, 3)
        self.coupling_conv2_weight, self.coupling_conv2_bias = conv_init(hidden_channels, hidden_channels, 1)
        self.coupling_conv3_weight = nn.Parameter(torch.zeros(k, c_out, hidden_channels, 3, 3))
        self.coupling_conv3_bias = nn.Parameter(torch.zeros(k, c_out))

        self.prior_loc = nn.Parameter(torch.zeros(latent_channels))
        self.prior_loc_logs = nn.Parameter(torch.zeros(latent_channels))
        self.prior_log_scale = nn.Parameter(torch.zeros(latent_channels))
        self.prior_log_scale_logs = nn.Parameter(torch.zeros(latent_channels))

    # ----------------------------------------------------------------------------------------------------------------
    # Weights that do not depend on the data.

    def conv_weight(self) -> torch.Tensor:
        """W of the K 1x1 convolutions, (K, C, C), in the parameters' dtype."""
        eye = torch.eye(self.channels, dtype=self.conv_lower.dtype, device=self.conv_lower.device)
        lower = torch.tril(self.conv_lower, diagonal=-1) + eye
        upper = torch.triu(self.conv_upper, diagonal=1) + torch.diag_embed(self.conv_sign_s * self.conv_log_s.exp())
        return self.conv_permutation @ lower @ upper

    def density_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ActNorm followed by the 1x1 convolution, as one 1x1 convolution per step (density direction).

        Returns:
            weight (K, C, C, 1, 1) = W diag(exp(-s)), bias (K, C) = -W diag(exp(-s)) t, and the log|det| of
            ActNorm and 1x1 convolution of all K steps per pixel (a 0-d tensor; multiply by H * W).
        """
        weight = self.conv_weight() * torch.exp(-self.actnorm_log_scale).unsqueeze(1)
        bias = -(weight @ self.actnorm_shift.unsqueeze(-1)).squeeze(-1)
        logdet_per_pixel = self.conv_log_s.sum() - self.actnorm_log_scale.sum()
        return weight[..., None, None], bias, logdet_per_pixel

    def sampling_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The inverse of `density_weights`: x = diag(exp(s)) W^-1 y + t, built in float64.

        Returns:
            weight (K, C, C, 1, 1) and bias (K, C) in the parameters' dtype.
        """
        dtype = self.conv_lower.dtype
        eye = torch.eye(self.channels, dtype=torch.float64, device=self.conv_lower.device)
        lower = torch.tril(self.conv_lower.double(), diagonal=-1) + eye
        upper = torch.triu(self.conv_upper.double(), diagonal=1) + torch.diag_embed(
            self.conv_sign_s.double() * self.conv_log_s.double().exp()
        )
        eye = eye.expand_as(lower)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        w_inv = upper_inv @ lower_inv @ self.conv_permutation.double().transpose(-1, -2)
        weight = self.actnorm_log_scale.double().exp().unsqueeze(-1) * w_inv
        return weight.to(dtype)[..., None, None], self.actnorm_shift

    def sampling_weight_sources(self) -> List[torch.Tensor]:
        """The tensors `sampling_weights` depends on (for the cache of `FlowPriorModel`)."""
        return [
            self.conv_lower,
            self.conv_upper,
            self.conv_log_s,
            self.conv_sign_s,
            self.conv_permutation,
            self.actnorm_log_scale,
            self.actnorm_shift,
        ]

    def prior_parameters(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and log sigma of the level's base distribution, each (1, C_z, 1, 1)."""
        mean = self.prior_loc * torch.exp(LOGSCALE_FACTOR * self.prior_loc_logs)
        log_sigma = self.prior_log_scale * torch.exp(LOGSCALE_FACTOR * self.prior_log_scale_logs)
        return mean[None, :, None, None], log_sigma[None, :, None, None]

    # ----------------------------------------------------------------------------------------------------------------
    # The data paths.

    def _coupling_params(self):
        return (
            self.coupling_conv1_weight.unbind(0),
            self.coupling_conv1_bias.unbind(0),
            self.coupling_conv2_weight.unbind(0),
            self.coupling_conv2_bias.unbind(0),
            self.coupling_conv3_weight.unbind(0),
            self.coupling_conv3_bias.unbind(0),
        )

    @staticmethod
    def _coupling_net(x1: torch.Tensor, params, k: int) -> torch.Tensor:
        w1, b1, w2, b2, w3, b3 = params
        h = F.relu(F.conv2d(x1, w1[k], b1[k], padding=1), inplace=True)
        h = F.relu(F.conv2d(h, w2[k], b2[k]), inplace=True)
        return F.conv2d(h, w3[k], b3[k], padding=1)

    def _coupling(
        self, x: torch.Tensor, params, k: int, reverse: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The coupling of step k: y2 = (x2 - shift) * sigmoid(h + 2) (affine) or x2 - shift (additive), h = NN(x1).

        Returns:
            The output (B, C, H, W) (the inverse with `reverse=True`) and, for the affine coupling, the pre-sigmoid
            scale h + 2 (log|det| = sum of its logsigmoid); `None` for the additive one.
        """
        c1 = self.split_channels
        x1, x2 = x[:, :c1], x[:, c1:]
        h = self._coupling_net(x1, params, k)
        pre_scale = None
        if self.coupling == "affine":
            shift, pre_scale = h[:, 0::2], h[:, 1::2] + COUPLING_SCALE_OFFSET
            x2 = x2 / torch.sigmoid(pre_scale) + shift if reverse else (x2 - shift) * torch.sigmoid(pre_scale)
        else:
            x2 = x2 + h if reverse else x2 - h
        return torch.cat([x1, x2], dim=1), pre_scale

    def density(self, x: torch.Tensor, logdet: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Steps K-1 ... 0 in the density direction.

        Args:
            x (`torch.Tensor` of shape `(B, C, H, W)`): the squeezed input of the level.
            logdet (`torch.Tensor` of shape `(B,)`): the log|det J| so far.

        Returns:
            The output (B, C, H, W) and the updated log|det J| (B,).
        """
        weight, bias, logdet_per_pixel = self.density_weights()
        weight, bias = weight.unbind(0), bias.unbind(0)
        params = self._coupling_params()
        logdet = logdet + logdet_per_pixel * (x.shape[2] * x.shape[3])
        for k in reversed(range(self.flow_depth)):
            x, pre_scale = self._coupling(F.conv2d(x, weight[k], bias[k]), params, k)
            if pre_scale is not None:
                # in logdet's dtype: under autocast the activations may be half precision
                logdet = logdet + F.logsigmoid(pre_scale.to(logdet.dtype)).sum(dim=(1, 2, 3))
        return x, logdet

    def inverse(self, x: torch.Tensor, weights: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Steps 0 ... K-1 in the sampling direction, each coupling -> 1x1 convolution -> ActNorm.

        Args:
            x (`torch.Tensor` of shape `(B, C, H, W)`): the level's input in the sampling direction.
            weights: `sampling_weights()` (possibly cached).

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`, still to be unsqueezed.
        """
        weight, bias = weights[0].unbind(0), weights[1].unbind(0)
        params = self._coupling_params()
        for k in range(self.flow_depth):
            x = F.conv2d(self._coupling(x, params, k, reverse=True)[0], weight[k], bias[k])
        return x

    @torch.no_grad()
    def initialize_actnorm(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the steps in the density direction, initialising every not yet initialised ActNorm on its input.

        t = per-channel mean, s = log(per-channel unbiased std + 1e-6) over batch, height and width (reduced across
        ranks under `torch.distributed`). The parameters and the `actnorm_initialized` flags are updated in place.

        Returns:
            The level's output for x (B, C, H, W).
        """
        flags = self.actnorm_initialized.tolist()
        params = self._coupling_params()
        weights = self.conv_weight()
        for k in reversed(range(self.flow_depth)):
            if not flags[k]:
                mean, std = _channel_statistics(x)
                self.actnorm_shift[k].copy_(mean)
                self.actnorm_log_scale[k].copy_(torch.log(std + ACTNORM_EPS))
                self.actnorm_initialized[k] = True
            x = (x - self.actnorm_shift[k][None, :, None, None]) * torch.exp(-self.actnorm_log_scale[k])[
                None, :, None, None
            ]
            x = self._coupling(F.conv2d(x, weights[k][..., None, None]), params, k)[0]
        return x


class FlowPriorModel(ModelMixin, ConfigMixin):
    r"""The DiNof flow prior: a multi-scale Glow normalizing flow with exact log-likelihood.

    Level i (0 = coarsest) works on `in_channels * 2 ** (num_levels + 1 - i)` channels at resolution
    `sample_size / 2 ** (num_levels - i)`; for CIFAR-10 (3 x 32 x 32, 3 levels): 48 channels at 4 x 4, 24 at 8 x 8,
    12 at 16 x 16, and latents of shapes (48, 4, 4), (12, 8, 8), (6, 16, 16). The model is fully convolutional and
    its base distributions are per channel, so any input whose height and width are divisible by
    `2 ** num_levels` is accepted; `sample_size` only fixes the size that `sample` draws.

    ActNorm is initialised from the data on the first density-direction call (`forward`, `encode`, `log_prob`,
    `bits_per_dim`), in training or evaluation mode; the flags are buffers in the state dict, so a saved and reloaded
    model never initialises again. Until then ActNorm is the identity, and `decode` / `sample` are well defined
    (they use it as it is and do not initialise it).

    Parameters:
        sample_size (`int` or `Tuple[int, int]`, *optional*, defaults to 32):
            Height and width of the samples (`sample`, `latent_shapes`); divisible by `2 ** num_levels`.
        in_channels (`int`, *optional*, defaults to 3): Number of channels of the data.
        num_levels (`int`, *optional*, defaults to 3): L, the number of levels (squeeze operations).
        flow_depth (`int`, *optional*, defaults to 16): K, the number of flow steps per level.
        hidden_channels (`int`, *optional*, defaults to 256): Width of the coupling networks.
        coupling (`str`, *optional*, defaults to `"affine"`):
            `"affine"`: y2 = (x2 - shift) * sigmoid(h + 2) (Glow, the published setting); `"additive"`:
            y2 = x2 - shift (normflows' `GlowBlock(..., scale=False)`).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: Union[int, Tuple[int, int]] = 32,
        in_channels: int = 3,
        num_levels: int = 3,
        flow_depth: int = 16,
        hidden_channels: int = 256,
        coupling: str = "affine",
    ):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_levels, "num_levels")
        check_positive_int(flow_depth, "flow_depth")
        check_positive_int(hidden_channels, "hidden_channels")
        check_choice(coupling, "coupling", COUPLING_TYPES)
        height, width = check_size_pair(sample_size)
        factor = 2**num_levels
        if height % factor or width % factor:
            raise ValueError(
                f"`sample_size` must be divisible by 2 ** num_levels = {factor} (`num_levels`={num_levels}), "
                f"got {sample_size!r}."
            )
        layout = GlowLayout(in_channels, num_levels)
        self.levels = nn.ModuleList(
            GlowLevel(layout.level_channels(i), layout.latent_channels(i), flow_depth, hidden_channels, coupling)
            for i in range(num_levels)
        )
        # Python-side caches; see `_maybe_initialize_actnorm` and `_cached_sampling_weights`.
        self._actnorm_ready = False
        self._sampling_cache = None
        self.register_load_state_dict_post_hook(FlowPriorModel._reset_caches_hook)

    # ----------------------------------------------------------------------------------------------------------------
    # Shapes and validation.

    def _latent_shapes_for(self, height: int, width: int) -> List[Tuple[int, int, int]]:
        return GlowLayout(self.config.in_channels, self.config.num_levels).latent_shapes(height, width)

    @property
    def latent_shapes(self) -> List[Tuple[int, int, int]]:
        """Per-level latent shapes (C, H, W) at `sample_size`, level 0 (the coarsest) first."""
        return self._latent_shapes_for(*check_size_pair(self.config.sample_size))

    def _check_sample(self, sample, name: str = "sample") -> None:
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"`{name}` must be a 4-D tensor (batch, channels, height, width), got {shape}.")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`{name}` has {sample.shape[1]} channels, but the model has `in_channels`={self.config.in_channels}."
            )
        factor = 2**self.config.num_levels
        if sample.shape[2] % factor or sample.shape[3] % factor or sample.shape[2] == 0 or sample.shape[3] == 0:
            raise ValueError(
                f"`{name}` height and width must be positive multiples of 2 ** num_levels = {factor} "
                f"(`num_levels`={self.config.num_levels}), got {tuple(sample.shape[2:])}."
            )
        if sample.shape[0] == 0:
            raise ValueError(f"`{name}` has an empty batch.")

    def _check_latents(self, latents) -> Tuple[int, int]:
        """Checks per-level latents (level 0 first) against each other; returns the image height and width."""
        num_levels = self.config.num_levels
        if not isinstance(latents, (list, tuple)) or len(latents) != num_levels:
            raise ValueError(f"`latents` must be a list of {num_levels} tensors (one per level, level 0 first).")
        z0 = latents[0]
        if not isinstance(z0, torch.Tensor) or z0.ndim != 4:
            raise ValueError("`latents` must hold 4-D tensors (batch, channels, height, width).")
        height, width = z0.shape[2] * 2**num_levels, z0.shape[3] * 2**num_levels
        expected = self._latent_shapes_for(height, width)
        for i, (z, shape) in enumerate(zip(latents, expected)):
            if not isinstance(z, torch.Tensor) or tuple(z.shape) != (z0.shape[0], *shape):
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"`latents`[{i}] must have shape {(z0.shape[0], *shape)}, got {got}.")
        return height, width

    # ----------------------------------------------------------------------------------------------------------------
    # Caches.

    @staticmethod
    def _reset_caches_hook(module, incompatible_keys) -> None:
        module._actnorm_ready = False
        module._sampling_cache = None

    def train(self, mode: bool = True):
        self._sampling_cache = None
        return super().train(mode)

    def _maybe_initialize_actnorm(self, x: torch.Tensor) -> None:
        if self._actnorm_ready:
            return
        flags = torch.cat([level.actnorm_initialized for level in self.levels])
        if bool(flags.all()):
            self._actnorm_ready = True
            return
        num_levels = self.config.num_levels
        for i in reversed(range(num_levels)):
            x = self.levels[i].initialize_actnorm(squeeze2d(x))
            if i > 0:
                x = x[:, : x.shape[1] // 2]
        self._actnorm_ready = True
        self._sampling_cache = None

    def _cached_sampling_weights(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """`GlowLevel.sampling_weights` of every level, cached while their sources do not change.

        The cache is used only when no gradient is needed. It is valid while the sources (1x1 convolution and
        ActNorm parameters and buffers) are equal to a snapshot taken when it was built: parameter versions alone
        would not do, since writes through `.data` (e.g. `diffusers.training_utils.EMAModel.copy_to`) do not bump
        `_version`. It is also dropped on `train()` / `eval()`, `load_state_dict` and ActNorm initialisation.
        """
        sources = [t for level in self.levels for t in level.sampling_weight_sources()]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        if needs_grad:
            return [level.sampling_weights() for level in self.levels]
        with torch.no_grad():
            snapshot = torch.cat([t.detach().reshape(-1) for t in sources])
            cache = self._sampling_cache
            if (
                cache is not None
                and cache[0].dtype == snapshot.dtype
                and cache[0].device == snapshot.device
                and torch.equal(cache[0], snapshot)
            ):
                return cache[1]
            weights = [level.sampling_weights() for level in self.levels]
            weights = [(w.detach(), b.detach().clone()) for w, b in weights]
            self._sampling_cache = (snapshot, weights)
            return weights

    # ----------------------------------------------------------------------------------------------------------------
    # Density direction.

    def _encode(self, sample: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        self._check_sample(sample)
        x = sample.to(dtype=self.dtype)
        self._maybe_initialize_actnorm(x)
        num_levels = self.config.num_levels
        logdet = x.new_zeros(x.shape[0])
        latents: List[Optional[torch.Tensor]] = [None] * num_levels
        for i in reversed(range(num_levels)):
            x, logdet = self.levels[i].density(squeeze2d(x), logdet)
            if i > 0:
                half = x.shape[1] // 2
                x, latents[i] = x[:, :half], x[:, half:]
            else:
                latents[0] = x
        return latents, logdet

    def _base_log_prob(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        log_prob = 0.0
        for level, z in zip(self.levels, latents):
            mean, log_sigma = level.prior_parameters()
            dim = z.shape[1] * z.shape[2] * z.shape[3]
            log_prob = (
                log_prob
                - 0.5 * dim * math.log(2 * math.pi)
                - z.shape[2] * z.shape[3] * log_sigma.sum()
                - 0.5 * ((z - mean) * torch.exp(-log_sigma)).square().sum(dim=(1, 2, 3))
            )
        return log_prob

    def encode(self, sample: torch.Tensor) -> List[torch.Tensor]:
        """Maps data to latents (density direction).

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                height and width divisible by `2 ** num_levels`.

        Returns:
            `List[torch.Tensor]`: one latent per level, level 0 (the coarsest) first, shapes `(batch_size, C_i, H_i,
            W_i)` as in `latent_shapes`.
        """
        return self._encode(sample)[0]

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> Union[FlowPriorOutput, Tuple]:
        """Latents and log-density of data.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): the data x.
            return_dict (`bool`, *optional*, defaults to `True`): return a `FlowPriorOutput` instead of a tuple.

        Returns:
            [`FlowPriorOutput`] or `(latents, log_prob)`: the per-level latents (level 0 first) and log p(x) in nats,
            shape `(batch_size,)`.
        """
        latents, logdet = self._encode(sample)
        log_prob = self._base_log_prob(latents) + logdet
        if not return_dict:
            return latents, log_prob
        return FlowPriorOutput(latents=latents, log_prob=log_prob)

    def log_prob(self, sample: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): the data x.

        Returns:
            `torch.Tensor` of shape `(batch_size,)`.
        """
        return self.forward(sample).log_prob

    def bits_per_dim(
        self,
        sample: torch.Tensor,
        num_bits: Optional[int] = None,
        data_range: Tuple[float, float] = (0.0, 1.0),
    ) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension.

        Without `num_bits`, this is the continuous -log p(x) / (D ln 2), D = channels * height * width.

        With `num_bits` = n, x is taken to be dequantised n-bit data: integers k in {0, ..., 2^n - 1} mapped linearly
        onto `data_range` = (low, high) with uniform dequantisation noise, x = low + (k + u) * (high - low) / 2^n,
        u ~ U[0, 1). The bits per dimension of the integer data are then those of the density over integer units,
        whose bins have width 1 instead of (high - low) / 2^n:

            bpd = -log p(x) / (D ln 2) + n - log2(high - low),

        i.e. + 8 for 8-bit data in [0, 1] (VE SDE) and + 7 for 8-bit data in [-1, 1] (VP / sub-VP SDE), the
        convention of Song et al.'s likelihood evaluation.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): the data x.
            num_bits (`int`, *optional*): bit depth of the quantised data; `None` for continuous data.
            data_range (`Tuple[float, float]`, *optional*, defaults to `(0.0, 1.0)`):
                the interval the n-bit data was scaled to (only used with `num_bits`).

        Returns:
            `torch.Tensor` of shape `(batch_size,)`.
        """
        check_positive_int(num_bits, "num_bits", allow_none=True)
        if num_bits is not None:
            low, high = check_range_pair(data_range)
        log_prob = self.log_prob(sample)
        dim = sample.shape[1] * sample.shape[2] * sample.shape[3]
        bpd = -log_prob / (dim * math.log(2.0))
        if num_bits is not None:
            bpd = bpd + num_bits - math.log2(high - low)
        return bpd

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling direction.

    def decode(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Maps latents to data (sampling direction); the exact inverse of `encode`.

        Args:
            latents (`List[torch.Tensor]`): one latent per level, level 0 first, shapes as returned by `encode`.

        Returns:
            `torch.Tensor` of shape `(batch_size, in_channels, height, width)`.
        """
        num_levels = self.config.num_levels
        self._check_latents(latents)
        weights = self._cached_sampling_weights()
        x = None
        for i in range(num_levels):
            z = latents[i].to(dtype=self.dtype)
            x = z if i == 0 else torch.cat([x, z], dim=1)
            x = unsqueeze2d(self.levels[i].inverse(x, weights[i]))
        return x

    def noise_to_latents(self, noise: torch.Tensor, temperature: float = 1.0) -> List[torch.Tensor]:
        """Maps standard normal noise of the image shape to the per-level latents.

        The noise is flattened per sample and cut, in order, into the latent sizes of levels 0, 1, ...; level i's
        piece eps_i becomes z_i = mean_i + exp(log sigma_i + log(temperature)) * eps_i.

        Args:
            noise (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): standard normal noise.
            temperature (`float`, *optional*, defaults to 1.0): tau > 0; scales the standard deviations.

        Returns:
            `List[torch.Tensor]`: the latents, level 0 first.
        """
        self._check_sample(noise, "noise")
        log_tau = math.log(check_temperature(temperature))
        batch = noise.shape[0]
        shapes = self._latent_shapes_for(noise.shape[2], noise.shape[3])
        pieces = noise.to(dtype=self.dtype).reshape(batch, -1).split([c * h * w for c, h, w in shapes], dim=1)
        latents = []
        for level, piece, shape in zip(self.levels, pieces, shapes):
            mean, log_sigma = level.prior_parameters()
            latents.append(mean + torch.exp(log_sigma + log_tau) * piece.reshape(batch, *shape))
        return latents

    def latents_to_noise(self, latents: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """The exact inverse of `noise_to_latents`: per-level latents -> standard normal noise of the image shape.

        Level i's latent z_i becomes eps_i = (z_i - mean_i) * exp(-(log sigma_i + log(temperature))); the pieces are
        flattened and concatenated in level order, so `encode` followed by `latents_to_noise` gives the noise that
        `sample(noise=...)` maps back to the data.

        Args:
            latents (`List[torch.Tensor]`): one latent per level, level 0 first, shapes as returned by `encode`.
            temperature (`float`, *optional*, defaults to 1.0): tau > 0, the temperature of `noise_to_latents`.

        Returns:
            `torch.Tensor` of shape `(batch_size, in_channels, height, width)`, in the model's dtype.
        """
        log_tau = math.log(check_temperature(temperature))
        height, width = self._check_latents(latents)
        batch = latents[0].shape[0]
        pieces = []
        for level, z in zip(self.levels, latents):
            mean, log_sigma = level.prior_parameters()
            pieces.append(((z.to(dtype=self.dtype) - mean) * torch.exp(-(log_sigma + log_tau))).reshape(batch, -1))
        return torch.cat(pieces, dim=1).reshape(batch, self.config.in_channels, height, width)

    def sample(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        temperature: float = 1.0,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Draws samples x = decode(noise_to_latents(noise, temperature)).

        Args:
            batch_size (`int`, *optional*, defaults to 1): number of samples, >= 1.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                for the noise, via `diffusers.utils.torch_utils.randn_tensor` (a list: one generator per sample).
            temperature (`float`, *optional*, defaults to 1.0): tau > 0, added as log(tau) to every log sigma.
            noise (`torch.Tensor` of shape `(batch_size, in_channels, H, W)`, *optional*):
                standard normal noise to use instead of drawing it; H and W may differ from `sample_size` (multiples
                of `2 ** num_levels`).

        Returns:
            `torch.Tensor` of shape `(batch_size, in_channels, H, W)` on the model's device, in its dtype.
        """
        check_sample_arguments(batch_size, generator, temperature)
        if noise is None:
            height, width = check_size_pair(self.config.sample_size)
            noise = randn_tensor(
                (batch_size, self.config.in_channels, height, width),
                generator=generator,
                device=self.device,
                dtype=self.dtype,
            )
        else:
            self._check_sample(noise, "noise")
            if noise.shape[0] != batch_size:
                raise ValueError(f"`noise` has batch size {noise.shape[0]}, but `batch_size`={batch_size}.")
            noise = noise.to(device=self.device, dtype=self.dtype)
        return self.decode(self.noise_to_latents(noise, temperature))

    # ----------------------------------------------------------------------------------------------------------------
    # The published normflows layout.

    @classmethod
    def from_original_state_dict(
        cls, state_dict: Dict[str, torch.Tensor], torch_dtype: Optional[torch.dtype] = None, **config
    ) -> "FlowPriorModel":
        """Builds a model from a state dict of the published layout (normflows `MultiscaleFlow` of `GlowBlock`s).

        Keys: `q0.{i}.{loc,loc_logs,log_scale,log_scale_logs}`; `flows.{i}.{k}.flows.0.flows.1.param_map.net.
        {0,2,4}.{weight,bias}`; `flows.{i}.{k}.flows.1.{L,U,log_S,P,sign_S,eye}`;
        `flows.{i}.{k}.flows.2.{s,t,data_dep_init_done}`. A common `module.` prefix (DataParallel) is removed.

        Args:
            state_dict (`Dict[str, torch.Tensor]`): the flow's state dict.
            torch_dtype (`torch.dtype`, *optional*): dtype of the model; defaults to that of the state dict.
            **config: `FlowPriorModel` config. `in_channels`, `num_levels`, `flow_depth`, `hidden_channels` and
                `coupling` are read from the state dict when not given (given ones are checked against it);
                `sample_size` cannot be and defaults to 32.

        Returns:
            `FlowPriorModel` in evaluation mode.

        Raises:
            ValueError: missing or unexpected keys, shapes that do not fit the config, or an unsupported variant
                (class-conditional base distributions), each named.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"`state_dict` must be a mapping of key -> tensor, got {type(state_dict).__name__}.")
        state_dict = strip_module_prefix(state_dict)
        full_config = check_original_state_dict(state_dict, **config)
        state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}  # the model is built on the CPU
        if torch_dtype is None:
            torch_dtype = state_dict[FLOW_MARKER_KEY].dtype
        if not torch_dtype.is_floating_point:
            raise ValueError(f"`torch_dtype` must be a floating point dtype, got {torch_dtype}.")
        new_state, not_initialized = original_to_diffusers_state_dict(state_dict, full_config)
        if not_initialized:
            logger.warning(
                f"ActNorm of {short_key_list(not_initialized)} is not initialised in the state dict; it will be "
                "initialised on the first density-direction batch."
            )
        model = cls(**full_config)
        # nn.Module.to: ModelMixin.to warns about `_keep_in_fp32_modules` on every dtype cast, even when there are none.
        model = nn.Module.to(model, dtype=torch_dtype)
        new_state = {k: (v if v.dtype == torch.bool else v.to(torch_dtype)) for k, v in new_state.items()}
        model.load_state_dict(new_state, strict=True)
        return model.eval()
