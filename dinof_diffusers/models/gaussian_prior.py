"""A closed-form Gaussian prior of x(t*): the moment-matched control for DiNof's normalizing flow.

x(t*) = a x(0) + s n with n ~ N(0, I), (a, s) = the scheduler's `marginal_mean_std(t*)`. If the training images have
mean mu and covariance Sigma, x(t*) has mean a mu and covariance a^2 Sigma + s^2 I, and the Gaussian with those
moments is the best Gaussian prior of x(t*) (the one closest to it in KL(p_t* || q)). `GaussianPriorModel` is that
Gaussian with `FlowPriorModel`'s interface, so that `DiNofPipeline(flow_prior=GaussianPriorModel(...))` samples
exactly as with the flow, and likelihoods of x(t*) under the flow and under the Gaussian can be compared directly.

The covariance C is kept in one of three forms (the image dimension is D = channels * height * width):

- `covariance="diagonal"`: C = diag(v), the per-dimension variances.
- `covariance="full"`, D <= `max_full_dim`: C = U diag(lambda) U^T, its full eigendecomposition (D x D).
- `covariance="full"`, D > `max_full_dim`: the top `rank` eigenpairs and one variance rho for the orthogonal
  complement, C = U_k diag(lambda_k) U_k^T + rho (I - U_k U_k^T), rho = the mean of the discarded eigenvalues. This is
  the maximum-likelihood covariance of that form (probabilistic PCA, Tipping & Bishop 1999); the top eigenvectors are
  found by randomised subspace iteration over the data, so no D x D matrix is ever formed.

Every form is a Gaussian whose density, sampling map and inverse are exact. The sampling map uses the symmetric square
root, x = m + tau C^(1/2) n, so `decode` / `encode` map standard normal noise of the image shape to samples and back.
"""

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..validation import (
    check_choice,
    check_number,
    check_positive_int,
    check_range_pair,
    check_sample_arguments,
    check_size_pair,
    check_temperature,
)

COVARIANCE_TYPES = ("full", "diagonal")


@dataclass
class GaussianPriorOutput(BaseOutput):
    """The output of [`GaussianPriorModel`] in the density direction.

    Args:
        latents (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
            the whitened sample C^(-1/2) (x - m): standard normal noise if x is drawn from the prior (`encode`).
        log_prob (`torch.Tensor` of shape `(batch_size,)`): log p(x) in nats.
    """

    latents: Optional[torch.Tensor] = None
    log_prob: Optional[torch.Tensor] = None


@dataclass
class ImageMoments:
    """Mean and covariance of a set of images, as `estimate_image_moments` returns them (all float64, on the CPU).

    Args:
        mean (`torch.Tensor` of shape `(D,)`): the mean image, flattened.
        variances (`torch.Tensor` of shape `(D,)`): the per-dimension variances (the covariance's diagonal).
        eigenvalues (`torch.Tensor` of shape `(k,)`, *optional*): the covariance's top k eigenvalues, descending,
            clamped at 0; `None` for diagonal moments.
        eigenvectors (`torch.Tensor` of shape `(D, k)`, *optional*): the matching orthonormal eigenvectors.
        residual_variance (`float`): the mean of the D - k discarded eigenvalues (0 when k = D).
        num_images (`int`): N, the number of images.
        image_shape (`Tuple[int, int, int]`): (C, H, W).
        rank (`int`), max_full_dim (`int`): the settings they were estimated with (see `estimate_image_moments`).

    The covariance is the maximum-likelihood one (normalised by N, not N - 1), so the Gaussian built from these moments
    matches the empirical distribution's (and, after diffusion, the training images' mixture's) moments exactly.
    """

    mean: torch.Tensor = None
    variances: torch.Tensor = None
    eigenvalues: Optional[torch.Tensor] = None
    eigenvectors: Optional[torch.Tensor] = None
    residual_variance: float = 0.0
    num_images: int = 0
    image_shape: Tuple[int, int, int] = None
    rank: int = 256
    max_full_dim: int = 4096

    @property
    def covariance(self) -> str:
        return "diagonal" if self.eigenvectors is None else "full"


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """Yields (B, C, H, W) float64 CPU batches of a tensor / array, or of an iterable of batches (e.g. a DataLoader,
    whose elements may be tensors or tuples / lists with the images first)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size].to(device="cpu", dtype=torch.float64)
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if not isinstance(batch, torch.Tensor):
            raise ValueError(f"`images` must yield tensors or arrays (B, C, H, W), got {type(batch).__name__}.")
        yield batch.to(device="cpu", dtype=torch.float64)


def _num_batches(images, batch_size: int) -> Optional[int]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return math.ceil(images.shape[0] / batch_size)
    return len(images) if hasattr(images, "__len__") else None


def estimate_image_moments(
    images,
    covariance: str = "full",
    data_range: Optional[Tuple[float, float]] = None,
    batch_size: int = 1024,
    show_progress: bool = True,
    rank: int = 256,
    max_full_dim: int = 4096,
    power_iterations: int = 6,
    seed: int = 0,
) -> ImageMoments:
    """Mean and covariance of images, streamed over batches in float64.

    Full covariances of dimension D <= `max_full_dim` are accumulated as D x D sums and eigendecomposed; above it, the
    top `rank` eigenpairs are found by randomised subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4
    with a Rayleigh-Ritz step), one pass over the data per iteration, and the remaining eigenvalues are summarised by
    their mean (the trace minus the kept eigenvalues, over D - rank).

    Args:
        images: `torch.Tensor` / `np.ndarray` of shape `(N, C, H, W)`, or a re-iterable of such batches (a
            `DataLoader`; the low-rank branch reads it `1 + power_iterations` times).
        covariance (`str`): `"full"` or `"diagonal"`.
        data_range (`Tuple[float, float]`, *optional*): if given, images outside it raise a `ValueError`.
        batch_size (`int`): images per step when `images` is a tensor or array.
        show_progress (`bool`): tqdm progress bars over the batches.
        rank (`int`): k, the eigenpairs kept when D > `max_full_dim`.
        max_full_dim (`int`): the largest D whose covariance is kept in full.
        power_iterations (`int`): passes of subspace iteration (low-rank branch only).
        seed (`int`): seed of the subspace iteration's random start.

    Returns:
        [`ImageMoments`].
    """
    check_choice(covariance, "covariance", COVARIANCE_TYPES)
    for value, name in ((rank, "rank"), (max_full_dim, "max_full_dim"), (batch_size, "batch_size")):
        check_positive_int(value, name)
    check_positive_int(power_iterations, "power_iterations")
    if data_range is not None:
        low, high = check_range_pair(data_range)
    if isinstance(images, (torch.Tensor, np.ndarray)) and (images.ndim != 4 or images.shape[0] == 0):
        raise ValueError(f"`images` must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}.")
    total = _num_batches(images, batch_size)
    settings = {"rank": rank, "max_full_dim": max_full_dim}

    # pass 1: sums of (x - K) and of its squares or outer products, K = the first image (keeps cancellation small)
    count, shift, image_shape = 0, None, None
    first_sum = second_sum = None
    full = covariance == "full"
    for batch in tqdm(_batches(images, batch_size), total=total, desc="image moments", disable=not show_progress):
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise ValueError(f"`images` must hold (B, C, H, W) batches, got shape {tuple(batch.shape)}.")
        if image_shape is None:
            image_shape = tuple(batch.shape[1:])
            dim = math.prod(image_shape)
            full_matrix = full and dim <= max_full_dim
            shift = batch[0].reshape(-1).clone()
            first_sum = torch.zeros(dim, dtype=torch.float64)
            second_sum = torch.zeros((dim, dim) if full_matrix else dim, dtype=torch.float64)
        elif tuple(batch.shape[1:]) != image_shape:
            raise ValueError(f"`images` batches must all have shape (B, *{image_shape}), got {tuple(batch.shape)}.")
        if data_range is not None and (batch.min() < low - 1e-6 or batch.max() > high + 1e-6):
            raise ValueError(
                f"`images` must lie in the data range {(low, high)}, got values in "
                f"[{batch.min().item():.4g}, {batch.max().item():.4g}]."
            )
        centred = batch.reshape(batch.shape[0], -1) - shift
        count += batch.shape[0]
        first_sum += centred.sum(0)
        second_sum += centred.T @ centred if full_matrix else (centred * centred).sum(0)
    if count == 0:
        raise ValueError("`images` is empty.")

    offset = first_sum / count
    mean = shift + offset
    if not full:
        variances = (second_sum / count - offset * offset).clamp_min(0.0)
        return ImageMoments(mean=mean, variances=variances, num_images=count, image_shape=image_shape, **settings)
    if full_matrix:
        cov = second_sum / count - torch.outer(offset, offset)
        eigenvalues, eigenvectors = torch.linalg.eigh((cov + cov.T) / 2)
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)
        return ImageMoments(
            mean=mean,
            variances=torch.diagonal(cov).clamp_min(0.0).clone(),
            eigenvalues=eigenvalues,
            eigenvectors=eigenvectors,
            num_images=count,
            image_shape=image_shape,
            **settings,
        )

    # low rank: randomised subspace iteration on C = E[(x - mean)(x - mean)^T], one pass over the data per iteration
    variances = (second_sum / count - offset * offset).clamp_min(0.0)
    k = min(rank, dim)
    width = min(dim, k + 10)  # oversampling
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, width, generator=generator, dtype=torch.float64))[0]
    for _ in tqdm(range(power_iterations), desc="covariance subspace", disable=not show_progress):
        product = torch.zeros(dim, width, dtype=torch.float64)
        seen = 0
        for batch in _batches(images, batch_size):
            centred = batch.reshape(batch.shape[0], -1) - mean
            product += centred.T @ (centred @ basis)
            seen += batch.shape[0]
        if seen != count:
            raise ValueError(
                f"The low-rank covariance (D = {dim} > `max_full_dim` = {max_full_dim}) reads `images` several times, "
                f"but a later pass saw {seen} images instead of {count}: pass a tensor, an array or a re-iterable "
                "(a DataLoader), not a one-shot iterator."
            )
        product /= count
        ritz_values, ritz_vectors = torch.linalg.eigh(basis.T @ product)  # Rayleigh-Ritz on the current basis
        top_vectors = basis @ ritz_vectors.flip(1)
        basis = torch.linalg.qr(product)[0]
    eigenvalues = ritz_values.flip(0)[:k].clamp_min(0.0)
    eigenvectors = top_vectors[:, :k]
    residual = max(float(variances.sum() - eigenvalues.sum()), 0.0) / (dim - k) if dim > k else 0.0
    return ImageMoments(
        mean=mean,
        variances=variances,
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        residual_variance=residual,
        num_images=count,
        image_shape=image_shape,
        **settings,
    )


class GaussianPriorModel(ModelMixin, ConfigMixin):
    r"""A Gaussian prior N(m, C) of x(t*), with [`FlowPriorModel`]'s interface (see the module docstring).

    Build it with [`GaussianPriorModel.fit`] (or [`GaussianPriorModel.from_moments`]); a model constructed directly is
    the standard normal N(0, I) until its buffers are loaded. The buffers (`mean`; `variances` for the diagonal
    form; `eigenvalues`, `eigenvectors`, `residual_variance` for the full and low-rank forms) are saved and loaded with
    `save_pretrained` / `from_pretrained`; the config records what the prior was fitted for.

    Parameters:
        sample_size (`int` or `Tuple[int, int]`, *optional*, defaults to 32): height and width of x.
        in_channels (`int`, *optional*, defaults to 3): channels of x.
        covariance (`str`, *optional*, defaults to `"full"`): `"full"` or `"diagonal"`.
        rank (`int`, *optional*, defaults to 256): eigenpairs kept when D > `max_full_dim`.
        max_full_dim (`int`, *optional*, defaults to 4096): the largest D whose covariance is kept in full.
        flow_start (`float`, *optional*, defaults to 0.6): t* / T, the time whose marginal this prior models;
            `DiNofPipeline` refuses a prior whose `flow_start` differs from its scheduler's.
        data_range (`Tuple[float, float]`, *optional*, defaults to `(0.0, 1.0)`): the range of the clean data
            (the scheduler's `data_range`); the default of `bits_per_dim`'s `data_range`.
        mean_coeff (`float`, *optional*): a(t*) of the marginal it was fitted for (checked by the pipeline).
        noise_std (`float`, *optional*): s(t*) of the marginal it was fitted for (checked by the pipeline).
        num_images (`int`, *optional*): the number of images it was fitted on (a record).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: Union[int, Tuple[int, int]] = 32,
        in_channels: int = 3,
        covariance: str = "full",
        rank: int = 256,
        max_full_dim: int = 4096,
        flow_start: float = 0.6,
        data_range: Tuple[float, float] = (0.0, 1.0),
        mean_coeff: Optional[float] = None,
        noise_std: Optional[float] = None,
        num_images: Optional[int] = None,
    ):
        super().__init__()
        height, width = check_size_pair(sample_size)
        for value, name in ((in_channels, "in_channels"), (rank, "rank"), (max_full_dim, "max_full_dim")):
            check_positive_int(value, name)
        check_choice(covariance, "covariance", COVARIANCE_TYPES)
        check_number(flow_start, "flow_start", 0.0, 1.0, exclusive_minimum=True)
        check_range_pair(data_range)
        for value, name in ((mean_coeff, "mean_coeff"), (noise_std, "noise_std")):
            check_number(value, name, minimum=0.0, exclusive_minimum=True, allow_none=True)

        dim = in_channels * height * width
        self.register_buffer("mean", torch.zeros(dim))
        if covariance == "diagonal":
            self.register_buffer("variances", torch.ones(dim))
        else:
            k = dim if dim <= max_full_dim else min(rank, dim)
            self.register_buffer("eigenvalues", torch.ones(k))
            self.register_buffer("eigenvectors", torch.eye(dim, k))
            self.register_buffer("residual_variance", torch.ones(()))

    # ----------------------------------------------------------------------------------------------------------------
    # Fitting.

    @classmethod
    def from_moments(
        cls,
        moments: ImageMoments,
        scheduler,
        flow_start: Optional[float] = None,
        covariance: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
    ) -> "GaussianPriorModel":
        """The Gaussian of x(t*) = a x(0) + s n for images with the given moments: N(a mu, a^2 Sigma + s^2 I).

        Args:
            moments ([`ImageMoments`]): from `estimate_image_moments`, in the scheduler's data range.
            scheduler ([`DiNofScheduler`]): gives (a, s) = `marginal_mean_std(t*)` and the data range.
            flow_start (`float`, *optional*): t* / T; default the scheduler's `flow_start`.
            covariance (`str`, *optional*): `"full"` or `"diagonal"`; default the moments' own form (full moments
                also give the diagonal prior).
            dtype (`torch.dtype`, defaults to `torch.float32`): of the buffers (float64 for precise likelihoods: the
                eigenvectors are then orthonormal to float64 rounding).

        Returns:
            `GaussianPriorModel` in `dtype`, in evaluation mode.
        """
        covariance = check_choice(
            moments.covariance if covariance is None else covariance, "covariance", COVARIANCE_TYPES
        )
        if covariance == "full" and moments.eigenvectors is None:
            raise ValueError("`covariance='full'` needs full moments (`estimate_image_moments(covariance='full')`).")
        flow_start = scheduler.config.flow_start if flow_start is None else flow_start
        check_number(flow_start, "flow_start", 0.0, 1.0, exclusive_minimum=True)
        t = torch.tensor([flow_start * scheduler.T], dtype=torch.float64)
        mean_coeff, noise_std = (float(v[0]) for v in scheduler.marginal_mean_std(t))
        channels, height, width = moments.image_shape
        dim = channels * height * width
        k = moments.eigenvectors.shape[1] if covariance == "full" else dim
        model = cls(
            sample_size=(height, width) if height != width else height,
            in_channels=channels,
            covariance=covariance,
            rank=moments.rank,
            max_full_dim=moments.max_full_dim,
            flow_start=float(flow_start),
            data_range=tuple(float(v) for v in scheduler.data_range),
            mean_coeff=mean_coeff,
            noise_std=noise_std,
            num_images=moments.num_images,
        )
        a2, s2 = mean_coeff**2, noise_std**2
        state = {"mean": mean_coeff * moments.mean}
        if covariance == "diagonal":
            state["variances"] = a2 * moments.variances + s2
        else:
            state["eigenvalues"] = a2 * moments.eigenvalues + s2
            state["eigenvectors"] = moments.eigenvectors
            residual = a2 * moments.residual_variance + s2 if k < dim else 1.0
            state["residual_variance"] = torch.tensor(residual, dtype=torch.float64)
        model.load_state_dict({name: value.to(dtype) for name, value in state.items()}, assign=True)
        return model.eval()

    @classmethod
    def fit(
        cls,
        images,
        scheduler,
        covariance: str = "full",
        flow_start: Optional[float] = None,
        dtype: torch.dtype = torch.float32,
        **moment_kwargs,
    ) -> "GaussianPriorModel":
        """Fits the prior of x(t*) in closed form from clean training images (one streaming pass; more for low rank).

        Args:
            images: clean images in `scheduler.data_range`: a `torch.Tensor` / `np.ndarray` of shape `(N, C, H, W)`
                or a re-iterable of such batches (see `estimate_image_moments`).
            scheduler ([`DiNofScheduler`]): the SDE; t* = `flow_start` * T.
            covariance (`str`, defaults to `"full"`): `"full"` or `"diagonal"`.
            flow_start (`float`, *optional*): default the scheduler's `flow_start`.
            dtype (`torch.dtype`, defaults to `torch.float32`): of the buffers.
            **moment_kwargs: `rank`, `max_full_dim`, `batch_size`, `power_iterations`, `seed`, `show_progress` of
                `estimate_image_moments`.

        Returns:
            `GaussianPriorModel` (evaluation mode).

        Example:
            >>> prior = GaussianPriorModel.fit(train_images, pipe.scheduler, covariance="full")
            >>> pipe.flow_prior = prior  # or DiNofPipeline(unet, scheduler, flow_prior=prior)
        """
        data_range = scheduler.data_range
        moments = estimate_image_moments(images, covariance=covariance, data_range=data_range, **moment_kwargs)
        return cls.from_moments(moments, scheduler, flow_start=flow_start, dtype=dtype)

    # ----------------------------------------------------------------------------------------------------------------
    # Shapes and validation.

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of x."""
        return (self.config.in_channels, *check_size_pair(self.config.sample_size))

    @property
    def t_star(self) -> float:
        """t* = flow_start * T (T = 1), the time whose marginal this prior models."""
        return float(self.config.flow_start)

    @property
    def is_low_rank(self) -> bool:
        """Whether the covariance is kept as top eigenpairs plus one variance for the rest."""
        return self.config.covariance == "full" and self.eigenvectors.shape[1] < self.mean.shape[0]

    def covariance_matrix(self) -> torch.Tensor:
        """C as a dense (D, D) matrix (for tests and small D)."""
        if self.config.covariance == "diagonal":
            return torch.diag(self.variances)
        u, lam, rho = self.eigenvectors, self.eigenvalues, self.residual_variance
        cov = (u * lam) @ u.T
        if self.is_low_rank:
            cov = cov + rho * (torch.eye(u.shape[0], dtype=u.dtype, device=u.device) - u @ u.T)
        return cov

    def _check_sample(self, sample, name: str = "sample") -> None:
        shape = self.image_shape
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4 or tuple(sample.shape[1:]) != shape:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"`{name}` must be a tensor of shape (batch, {', '.join(map(str, shape))}), got {got}.")
        if sample.shape[0] == 0:
            raise ValueError(f"`{name}` has an empty batch.")

    # ----------------------------------------------------------------------------------------------------------------
    # Density direction.

    def _whiten(self, sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z = C^(-1/2) (x - m) flattened, log det C) for x of shape (B, C, H, W)."""
        residual = sample.to(dtype=self.mean.dtype).reshape(sample.shape[0], -1) - self.mean
        if self.config.covariance == "diagonal":
            return residual * torch.rsqrt(self.variances), torch.log(self.variances).sum()
        u, lam = self.eigenvectors, self.eigenvalues
        coords = residual @ u
        z = (coords * torch.rsqrt(lam)) @ u.T
        log_det = torch.log(lam).sum()
        if self.is_low_rank:
            rho = self.residual_variance
            z = z + (residual - coords @ u.T) * torch.rsqrt(rho)
            log_det = log_det + (u.shape[0] - u.shape[1]) * torch.log(rho)
        return z, log_det

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> Union[GaussianPriorOutput, Tuple]:
        """Whitened sample and log-density.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): x.
            return_dict (`bool`, *optional*, defaults to `True`): return a `GaussianPriorOutput` instead of a tuple.

        Returns:
            [`GaussianPriorOutput`] or `(latents, log_prob)`: C^(-1/2) (x - m) of x's shape and log p(x) in nats,
            shape `(batch_size,)`, in the model's dtype.
        """
        self._check_sample(sample)
        z, log_det = self._whiten(sample)
        dim = z.shape[1]
        log_prob = -0.5 * ((z * z).sum(1) + log_det + dim * math.log(2.0 * math.pi))
        latents = z.reshape(sample.shape)
        if not return_dict:
            return latents, log_prob
        return GaussianPriorOutput(latents=latents, log_prob=log_prob)

    def log_prob(self, sample: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, shape `(batch_size,)`; x of shape `(batch_size, in_channels, height, width)`."""
        return self.forward(sample).log_prob

    def bits_per_dim(
        self,
        sample: torch.Tensor,
        num_bits: Optional[int] = None,
        data_range: Optional[Tuple[float, float]] = None,
    ) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension, as [`FlowPriorModel.bits_per_dim`].

        Without `num_bits`, -log p(x) / (D ln 2); with `num_bits` = n, the bits per dimension of n-bit data
        dequantised onto `data_range` = (low, high): + n - log2(high - low).

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): x.
            num_bits (`int`, *optional*): bit depth of the quantised data; `None` for continuous data.
            data_range (`Tuple[float, float]`, *optional*): default the `data_range` it was fitted for.

        Returns:
            `torch.Tensor` of shape `(batch_size,)`.
        """
        check_positive_int(num_bits, "num_bits", allow_none=True)
        low, high = check_range_pair(self.config.data_range if data_range is None else data_range)
        bpd = -self.log_prob(sample) / (math.prod(self.image_shape) * math.log(2.0))
        if num_bits is not None:
            bpd = bpd + num_bits - math.log2(high - low)
        return bpd

    def encode(self, sample: torch.Tensor) -> torch.Tensor:
        """The inverse of `decode` at temperature 1: x -> C^(-1/2) (x - m), of x's shape."""
        return self.forward(sample).latents

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling direction.

    def decode(self, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Maps standard normal noise of the image shape to x = m + tau C^(1/2) noise (C^(1/2) symmetric).

        Args:
            noise (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): standard normal noise.
            temperature (`float`, *optional*, defaults to 1.0): tau > 0, scales the standard deviations.

        Returns:
            `torch.Tensor` of noise's shape, in the model's dtype and on its device.
        """
        self._check_sample(noise, "noise")
        tau = check_temperature(temperature)
        n = noise.to(device=self.mean.device, dtype=self.mean.dtype).reshape(noise.shape[0], -1)
        if self.config.covariance == "diagonal":
            x = torch.sqrt(self.variances) * n
        else:
            u = self.eigenvectors
            coords = n @ u
            x = (coords * torch.sqrt(self.eigenvalues)) @ u.T
            if self.is_low_rank:
                x = x + torch.sqrt(self.residual_variance) * (n - coords @ u.T)
        return (self.mean + tau * x).reshape(noise.shape)

    def sample(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, list]] = None,
        temperature: float = 1.0,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Draws x = decode(noise, temperature), as [`FlowPriorModel.sample`].

        Args:
            batch_size (`int`, *optional*, defaults to 1): number of samples, >= 1.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): for the noise, via `randn_tensor`.
            temperature (`float`, *optional*, defaults to 1.0): tau > 0.
            noise (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`, *optional*): standard normal
                noise to use instead of drawing it.

        Returns:
            `torch.Tensor` of shape `(batch_size, in_channels, height, width)` on the model's device, in its dtype.
        """
        check_sample_arguments(batch_size, generator, temperature)
        if noise is None:
            noise = randn_tensor(
                (batch_size, *self.image_shape), generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        elif isinstance(noise, torch.Tensor) and noise.ndim == 4 and noise.shape[0] != batch_size:
            raise ValueError(f"`noise` has batch size {noise.shape[0]}, but `batch_size`={batch_size}.")
        return self.decode(noise, temperature)
