"""Where the flow prior pays: how far x(t) is from its best Gaussian, and how much of that gap a prior captures.

No prior of x(t*) can gain more over the moment-matched Gaussian than the KL divergence of x(t*) from that Gaussian,
the *headroom* (and by the data-processing inequality the reverse SDE cannot amplify a prior's error). x(t) = a x0 +
s n is a Gaussian mixture whenever the data is a finite set: over the N training images x_i its exact density is

    p_train,t(x) = 1/N sum_i N(x; a x_i, s^2 I),

computed here with logsumexp, batched over points and over training images. Two estimates of the headroom bracket it:

- on noisy *training* images (x = a x_i + s n), E[log p_train,t - log N_full] is the KL divergence of the training
  set's x(t) from its moment-matched Gaussian (the full Gaussian fitted to the same images matches the mixture's
  moments exactly): an *upper* estimate of the population's headroom, since an empirical distribution is spikier
  than the population (more so at small t, where the mixture's components barely overlap);
- on noisy *held-out* images the same difference is a *lower* estimate: the mixture is then a kernel density
  estimate, which loses to the truth (and turns negative once it overfits).

The flow's share is the held-out (full Gaussian - flow) NLL difference over the training-set headroom, a
conservative fraction. Every difference is paired over the same points; each image gets several noise draws, which
are averaged per image before the standard error is taken over images (the image is the independent unit).
Differences are reported in nats per image and in bits per dimension (nats / (D ln 2)).
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.gaussian_prior import GaussianPriorModel, ImageMoments, estimate_image_moments
from ..pipelines.dinof.pipeline_dinof import check_prior_matches_scheduler
from ..validation import check_int, check_number, check_positive_int

MIXTURE, GAUSSIAN_FULL, GAUSSIAN_DIAGONAL, FLOW = "mixture", "gaussian_full", "gaussian_diagonal", "flow"
BUILTIN_MODELS = (MIXTURE, GAUSSIAN_FULL, GAUSSIAN_DIAGONAL)  # the densities computed from the training images
# (minuend, subtrahend) of the reported NLL differences; "a - b" > 0 means b fits x(t) better than a
DIFFERENCES = (
    (GAUSSIAN_FULL, MIXTURE),  # the headroom
    (GAUSSIAN_DIAGONAL, GAUSSIAN_FULL),  # what the full covariance gains over the diagonal one
)
# and for every prior p: (GAUSSIAN_FULL, p), its gain over the full Gaussian; (p, MIXTURE), what it leaves on the table


@dataclass
class Estimate:
    """A mean over images with its standard error, in nats per image and in bits per dimension.

    Args:
        nats (`float`): the mean, nats per image.
        nats_se (`float`): its standard error (over images; each image's draws averaged first).
        bits_per_dim (`float`): nats / (D ln 2).
        bits_per_dim_se (`float`): the standard error in bits per dimension.
        num_images (`int`): the number of images.
        num_draws (`int`): the noise draws per image.
    """

    nats: float = float("nan")
    nats_se: float = float("nan")
    bits_per_dim: float = float("nan")
    bits_per_dim_se: float = float("nan")
    num_images: int = 0
    num_draws: int = 0


def mean_estimate(values: torch.Tensor, num_dims: int) -> Estimate:
    """The mean of per-point values (nats) with its standard error over images.

    Args:
        values (`torch.Tensor` of shape `(num_draws, num_images)`): one value per noise draw and image, in nats.
        num_dims (`int`): D, for the bits per dimension.

    Returns:
        [`Estimate`].
    """
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"`values` must have shape (num_draws, num_images), got {tuple(values.shape)}.")
    per_image = values.double().mean(0)
    num_images = per_image.shape[0]
    mean = per_image.mean().item()
    se = (per_image.std(unbiased=True) / math.sqrt(num_images)).item() if num_images > 1 else float("nan")
    scale = 1.0 / (num_dims * math.log(2.0))
    return Estimate(mean, se, mean * scale, se * scale, num_images, values.shape[0])


def images_to_tensor(images, data_range=(0.0, 1.0)) -> torch.Tensor:
    """8-bit images as a float64 tensor (N, C, H, W) in `data_range`.

    Args:
        images: `np.ndarray` uint8 of shape `(N, H, W)` (greyscale) or `(N, H, W, C)`.
        data_range: the scheduler's `data_range`.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise ValueError(f"`images` must be uint8 (N, H, W) or (N, H, W, C), got {array.dtype} {array.shape}.")
    tensor = torch.from_numpy(array).double() / 255.0
    tensor = tensor.unsqueeze(1) if array.ndim == 3 else tensor.permute(0, 3, 1, 2)
    low, high = data_range
    return (low + (high - low) * tensor).contiguous()


def _marginal(scheduler, t: float):
    mean_coeff, std = scheduler.marginal_mean_std(torch.tensor([t], dtype=torch.float64))
    return float(mean_coeff[0]), float(std[0])


def _check_time(scheduler, t: Optional[float]) -> float:
    t = scheduler.t_star if t is None else t
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= scheduler.T:
        raise ValueError(f"`t` must lie in (0, T] = (0, {scheduler.T}], got {t!r}.")
    return float(t)


def diffuse_images(images: torch.Tensor, scheduler, t: Optional[float] = None, num_draws: int = 4, seed: int = 0):
    """x(t) = a x0 + s n for every image and `num_draws` seeded noise draws, in float64.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`): clean images in `scheduler.data_range`.
        scheduler ([`DiNofScheduler`]): the forward marginal (`add_noise`).
        t (`float`, *optional*): the time; default the scheduler's t*.
        num_draws (`int`): noise draws per image.
        seed (`int`): seed of a CPU generator; the draws are (draw, image)-ordered standard normals from it.

    Returns:
        `torch.Tensor` of shape `(num_draws, N, C, H, W)`, float64.
    """
    t = _check_time(scheduler, t)
    check_positive_int(num_draws, "num_draws")
    images = images.double().cpu()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_draws, *images.shape), generator=generator, dtype=torch.float64)
    times = torch.full((images.shape[0],), t, dtype=torch.float64)
    return torch.stack([scheduler.add_noise(images, noise[k], times) for k in range(num_draws)])


def mixture_log_prob(
    points: torch.Tensor,
    components: torch.Tensor,
    mean_coeff: float,
    std: float,
    point_batch_size: int = 512,
    component_batch_size: int = 4096,
    show_progress: bool = True,
) -> torch.Tensor:
    """log of 1/M sum_i N(x; a x_i, s^2 I) for every point x: the exact density of x(t) over the images x_i.

    Squared distances come from ||x||^2 + a^2 ||x_i||^2 - 2 a <x, x_i> in float64 (matrix products, blocks of
    `point_batch_size` x `component_batch_size`), and each block's logsumexp is combined across blocks, so memory
    stays O(block) for any number of points and images.

    Args:
        points (`torch.Tensor` of shape `(P, C, H, W)` or `(P, D)`): the points x.
        components (`torch.Tensor` of shape `(M, C, H, W)` or `(M, D)`): the clean images x_i.
        mean_coeff (`float`): a.
        std (`float`): s > 0.
        point_batch_size, component_batch_size (`int`): block sizes.
        show_progress (`bool`): a tqdm bar over the blocks.

    Returns:
        `torch.Tensor` of shape `(P,)`, float64, nats.
    """
    check_number(std, "std", minimum=0.0, exclusive_minimum=True)
    x = points.reshape(points.shape[0], -1).double().cpu()
    centres = mean_coeff * components.reshape(components.shape[0], -1).double().cpu()
    if x.shape[1] != centres.shape[1]:
        raise ValueError(f"`points` have {x.shape[1]} dimensions, `components` {centres.shape[1]}.")
    num_points, dim = x.shape
    num_components = centres.shape[0]
    centre_sq = (centres * centres).sum(1)
    point_blocks = range(0, num_points, point_batch_size)
    component_blocks = range(0, num_components, component_batch_size)
    out = torch.empty(num_points, dtype=torch.float64)
    with tqdm(total=len(point_blocks) * len(component_blocks), desc="mixture", disable=not show_progress) as bar:
        for p0 in point_blocks:
            xb = x[p0 : p0 + point_batch_size]
            x_sq = (xb * xb).sum(1, keepdim=True)
            block_lse = []
            for c0 in component_blocks:
                cb = centres[c0 : c0 + component_batch_size]
                dist = (x_sq + centre_sq[c0 : c0 + component_batch_size] - 2.0 * xb @ cb.T).clamp_min(0.0)
                block_lse.append(torch.logsumexp(dist / (-2.0 * std * std), dim=1))
                bar.update()
            out[p0 : p0 + point_batch_size] = torch.logsumexp(torch.stack(block_lse, dim=1), dim=1)
    return out - math.log(num_components) - 0.5 * dim * math.log(2.0 * math.pi * std * std)


@torch.no_grad()
def prior_log_prob(
    prior, points: torch.Tensor, batch_size: int = 1024, show_progress: bool = True, desc: str = "log p"
) -> torch.Tensor:
    """`prior.log_prob` (a flow or a Gaussian prior) over points in batches, in the prior's dtype and device.

    Args:
        prior: any model with `log_prob(sample) -> (B,)`, e.g. `FlowPriorModel` or `GaussianPriorModel`.
        points (`torch.Tensor` of shape `(P, C, H, W)`).

    Returns:
        `torch.Tensor` of shape `(P,)`, float64, nats.
    """
    reference = next(value for value in prior.state_dict().values() if value.is_floating_point())
    device, dtype = getattr(prior, "device", reference.device), getattr(prior, "dtype", reference.dtype)
    out = []
    for start in tqdm(range(0, points.shape[0], batch_size), desc=desc, disable=not show_progress):
        batch = points[start : start + batch_size].to(device=device, dtype=dtype)
        out.append(prior.log_prob(batch).double().cpu())
    return torch.cat(out)


@dataclass
class FlowGainResult:
    """What `flow_gain` measured at one time t (see the module docstring).

    Args:
        t (`float`): the time; `mean_coeff`, `std`: (a, s) of x(t) = a x0 + s n.
        num_dims (`int`): D.
        num_train_images, num_test_images (`int`): images behind the mixture / Gaussians, and held-out images.
        nll (`Dict[str, Dict[str, Estimate]]`): split ("train", "test") -> model ("mixture", "gaussian_full",
            "gaussian_diagonal", "flow") -> mean negative log-likelihood of the noisy points.
        differences (`Dict[str, Dict[str, Estimate]]`): split -> "a - b" -> the paired NLL difference (nats, bits
            per dimension); "gaussian_full - mixture" is the headroom.
        headroom_train (`Estimate`): the upper estimate of the headroom (training points).
        headroom_test (`Estimate`): the lower estimate (held-out points).
        shares (`Dict[str, Dict[str, float]]`): prior name -> {"share": held-out (gaussian_full - prior) /
            headroom_train, "se": its standard error (delta method; the two are independent)}.
        flow_share (`float`, *optional*), flow_share_se (`float`, *optional*): the share of the prior named "flow".
    """

    t: float = float("nan")
    mean_coeff: float = float("nan")
    std: float = float("nan")
    num_dims: int = 0
    num_train_images: int = 0
    num_test_images: int = 0
    nll: Dict[str, Dict[str, Estimate]] = field(default_factory=dict)
    differences: Dict[str, Dict[str, Estimate]] = field(default_factory=dict)
    headroom_train: Optional[Estimate] = None
    headroom_test: Optional[Estimate] = None
    shares: Dict[str, Dict[str, float]] = field(default_factory=dict)
    flow_share: Optional[float] = None
    flow_share_se: Optional[float] = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def flow_gain(
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    scheduler,
    t: Optional[float] = None,
    flow_prior=None,
    priors: Optional[Dict[str, object]] = None,
    num_draws: int = 4,
    seed: int = 0,
    max_train_points: Optional[int] = 2000,
    moments: Optional[ImageMoments] = None,
    models: Sequence[str] = (MIXTURE, GAUSSIAN_FULL, GAUSSIAN_DIAGONAL, FLOW),
    point_batch_size: int = 512,
    component_batch_size: int = 4096,
    show_progress: bool = True,
) -> FlowGainResult:
    """The headroom of x(t) over its best Gaussian, both estimates, and (with priors) each prior's share of it.

    Args:
        train_images (`torch.Tensor` of shape `(N, C, H, W)`): the clean training images, in the scheduler's data
            range: the mixture's components and the Gaussians' data.
        test_images (`torch.Tensor` of shape `(M, C, H, W)`): held-out clean images.
        scheduler ([`DiNofScheduler`]): the SDE.
        t (`float`, *optional*): the time; default the scheduler's t* (the only one allowed with priors).
        flow_prior (*optional*): a prior of x(t*) with `log_prob` (a `FlowPriorModel`, or any other prior); the same
            as `priors={"flow": flow_prior}`.
        priors (`Dict[str, prior]`, *optional*): several priors of x(t*) by name (not a built-in model's name), e.g.
            flows of two sizes and a trained `GaussianPriorModel`.
        num_draws (`int`, defaults to 4): noise draws per image.
        seed (`int`, defaults to 0): the training points use `seed`, the held-out points `seed + 1`; the training
            images behind the training points are a seeded subset.
        max_train_points (`int`, *optional*, defaults to 2000): training images noised for the upper estimate (all
            when `None`); every training image is a mixture component regardless.
        moments ([`ImageMoments`], *optional*): full moments of `train_images` (`estimate_image_moments`), to reuse
            across times; computed when `None`.
        models (`Sequence[str]`): the densities to evaluate: built-in ones, and "flow" for the priors (skipped
            without any).
        point_batch_size, component_batch_size (`int`): the mixture's blocks.
        show_progress (`bool`): tqdm progress bars.

    Returns:
        [`FlowGainResult`].
    """
    t = _check_time(scheduler, t)
    for name, images in (("train_images", train_images), ("test_images", test_images)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"`{name}` must be a (N, C, H, W) tensor with N >= 2.")
    if tuple(train_images.shape[1:]) != tuple(test_images.shape[1:]):
        raise ValueError(
            f"`train_images` and `test_images` differ in shape: {tuple(train_images.shape[1:])} vs "
            f"{tuple(test_images.shape[1:])}."
        )
    unknown = sorted(set(models) - {MIXTURE, GAUSSIAN_FULL, GAUSSIAN_DIAGONAL, FLOW})
    if unknown:
        raise ValueError(
            f"`models` must be a subset of {[MIXTURE, GAUSSIAN_FULL, GAUSSIAN_DIAGONAL, FLOW]}, got {unknown}."
        )
    check_int(max_train_points, "max_train_points", minimum=2, allow_none=True)
    if flow_prior is not None and priors:
        raise ValueError("Pass the priors either as `flow_prior` or as `priors`, not both.")
    priors = {FLOW: flow_prior} if flow_prior is not None else dict(priors or {})
    clashing = sorted(set(priors) & set(BUILTIN_MODELS))
    if clashing:
        raise ValueError(f"`priors` may not be named like the built-in models {list(BUILTIN_MODELS)}: {clashing}.")
    if FLOW not in models:
        priors = {}
    for name, prior in priors.items():
        if abs(t - scheduler.t_star) > 1e-9:
            raise ValueError(f"The prior {name!r} models x(t*) at t* = {scheduler.t_star}; `t` = {t} differs.")
        check_prior_matches_scheduler(prior, scheduler)
    models = [m for m in models if m in BUILTIN_MODELS] + list(priors)

    mean_coeff, std = _marginal(scheduler, t)
    num_dims = math.prod(train_images.shape[1:])
    train_images, test_images = train_images.double().cpu(), test_images.double().cpu()

    gaussians = {}
    if GAUSSIAN_FULL in models or GAUSSIAN_DIAGONAL in models:
        if moments is None:
            moments = estimate_image_moments(train_images, covariance="full", show_progress=show_progress)
        if tuple(moments.image_shape) != tuple(train_images.shape[1:]):
            raise ValueError(f"`moments` are of images {moments.image_shape}, not {tuple(train_images.shape[1:])}.")
        flow_start = t / scheduler.T
        for name, covariance in ((GAUSSIAN_FULL, "full"), (GAUSSIAN_DIAGONAL, "diagonal")):
            if name in models:
                gaussians[name] = GaussianPriorModel.from_moments(
                    moments, scheduler, flow_start=flow_start, covariance=covariance, dtype=torch.float64
                )

    subset = train_images
    if max_train_points is not None and max_train_points < train_images.shape[0]:
        order = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(seed))
        subset = train_images[order[:max_train_points].sort().values]
    points = {
        "train": diffuse_images(subset, scheduler, t, num_draws, seed),
        "test": diffuse_images(test_images, scheduler, t, num_draws, seed + 1),
    }

    log_probs = {}
    for split, split_points in points.items():
        flat = split_points.reshape(-1, *split_points.shape[2:])
        shape = split_points.shape[:2]
        log_probs[split] = {}
        for name in models:
            desc = f"{name} ({split})"
            if name == MIXTURE:
                values = mixture_log_prob(
                    flat, train_images, mean_coeff, std, point_batch_size, component_batch_size, show_progress
                )
            else:
                values = prior_log_prob({**gaussians, **priors}[name], flat, show_progress=show_progress, desc=desc)
            log_probs[split][name] = values.reshape(shape)

    result = FlowGainResult(
        t=t,
        mean_coeff=mean_coeff,
        std=std,
        num_dims=num_dims,
        num_train_images=train_images.shape[0],
        num_test_images=test_images.shape[0],
    )
    pairs = list(DIFFERENCES) + [pair for name in priors for pair in ((GAUSSIAN_FULL, name), (name, MIXTURE))]
    for split, values in log_probs.items():
        result.nll[split] = {name: mean_estimate(-lp, num_dims) for name, lp in values.items()}
        result.differences[split] = {
            f"{a} - {b}": mean_estimate(values[b] - values[a], num_dims)
            for a, b in pairs
            if a in values and b in values
        }
    headroom = f"{GAUSSIAN_FULL} - {MIXTURE}"
    result.headroom_train = result.differences["train"].get(headroom)
    result.headroom_test = result.differences["test"].get(headroom)
    for name in priors:
        gain = result.differences["test"].get(f"{GAUSSIAN_FULL} - {name}")
        if gain is not None and result.headroom_train is not None:
            h = result.headroom_train
            share = gain.nats / h.nats
            se = abs(share) * math.sqrt((gain.nats_se / gain.nats) ** 2 + (h.nats_se / h.nats) ** 2)
            result.shares[name] = {"share": share, "se": se}
    if FLOW in result.shares:
        result.flow_share, result.flow_share_se = result.shares[FLOW]["share"], result.shares[FLOW]["se"]
    return result
