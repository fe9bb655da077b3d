"""The two DiNof training losses (docs/DESIGN.md, "Training").

- `score_matching_loss`: denoising score matching on t ~ U(eps, T) * flow_start, so the score network only learns
  the noise levels below t* that the DiNof sampler visits. With the scheduler's marginals and conditioning the same
  formula ||std(t) * score + n||^2 is the continuous-time loss of Song et al., the DDPM epsilon loss (discrete VP:
  score = -eps_hat / std) and the SMLD loss (discrete VE), each on the indices below int(N * flow_start).
- `flow_nll_loss`: the negative log-likelihood, in nats, of x(t*) drawn from the forward marginal at t*.

Both draw their randomness in a fixed order (times, then noise) from `generator`, or from the global torch RNG when
it is `None`; the training script uses the global RNG, whose state `accelerate` checkpoints.
"""

import math
from typing import Optional, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..validation import check_choice

LOSS_REDUCTIONS = ("mean", "sum")


def _expand_as(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def score_matching_loss(
    unet: torch.nn.Module,
    scheduler,
    clean_images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    reduce: str = "mean",
) -> torch.Tensor:
    """Denoising score matching at times below t*, one value per sample.

    t = `scheduler.sample_training_timesteps(B)` (continuous: U(eps, T) * flow_start; discrete: an index below
    int(N * flow_start)), n ~ N(0, I), x(t) = mean(t) * x0 + std(t) * n, score = the network's output converted by
    `scheduler.output_to_score`, loss = ||std(t) * score + n||^2 averaged over the dimensions (`reduce="mean"`) or
    halved and summed (`reduce="sum"`, Song et al.'s `reduce_mean=False`).

    Args:
        unet (`torch.nn.Module`): the score network, called as `unet(x, scheduler.model_timestep(t)).sample`
            (a `UNet2DModel`, possibly wrapped for distributed training).
        scheduler (`DiNofScheduler`): gives the times, marginals, conditioning and parameterisation.
        clean_images (`torch.Tensor` of shape `(B, C, H, W)`): data x0 in `scheduler.data_range`.
        generator (`torch.Generator`, *optional*): source of the times and the noise (in that order).
        reduce (`str`, defaults to `"mean"`): `"mean"` or `"sum"` over the dimensions of a sample.

    Returns:
        `torch.Tensor` of shape `(B,)`, float32: the per-sample losses.
    """
    check_choice(reduce, "reduce", LOSS_REDUCTIONS)
    batch_size = clean_images.shape[0]
    timesteps = scheduler.sample_training_timesteps(batch_size, device=clean_images.device, generator=generator)
    noise = randn_tensor(clean_images.shape, generator=generator, device=clean_images.device, dtype=torch.float32)
    noise = noise.to(clean_images.dtype)

    _, std = scheduler.marginal_mean_std(timesteps)
    noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
    model_output = unet(noisy_images, scheduler.model_timestep(timesteps)).sample
    score = scheduler.output_to_score(model_output.float(), noisy_images.float(), timesteps)

    residual = (_expand_as(std, score) * score + noise.float()).flatten(1)
    if reduce == "mean":
        return residual.square().mean(dim=1)
    return 0.5 * residual.square().sum(dim=1)


def flow_marginal_sample(
    scheduler, clean_images: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """x(t*) = mean(t*) * x0 + std(t*) * n, n ~ N(0, I): what the flow prior learns to model.

    Args:
        scheduler (`DiNofScheduler`): gives t* and the marginal.
        clean_images (`torch.Tensor` of shape `(B, C, H, W)`): data x0 in `scheduler.data_range`.
        generator (`torch.Generator`, *optional*): source of the noise.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)` in the dtype of `clean_images`.
    """
    batch_size = clean_images.shape[0]
    t_star = torch.full((batch_size,), scheduler.t_star, device=clean_images.device, dtype=torch.float32)
    noise = randn_tensor(clean_images.shape, generator=generator, device=clean_images.device, dtype=torch.float32)
    return scheduler.add_noise(clean_images, noise.to(clean_images.dtype), t_star)


def flow_nll_loss(
    flow_prior: torch.nn.Module,
    scheduler,
    clean_images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Negative log-likelihood of x(t*) under the flow prior, in nats, one value per sample.

    The flow is called through its `forward` (not `log_prob`), so that a `DistributedDataParallel` wrapper sees the
    call and synchronises the gradients. On its first call the flow initialises its ActNorm layers from this batch
    (all-reducing the statistics across ranks under `torch.distributed`).

    Args:
        flow_prior (`torch.nn.Module`): a `FlowPriorModel`, possibly wrapped for distributed training.
        scheduler (`DiNofScheduler`): gives t* and the marginal.
        clean_images (`torch.Tensor` of shape `(B, C, H, W)`): data x0 in `scheduler.data_range`.
        generator (`torch.Generator`, *optional*): source of the noise.

    Returns:
        `torch.Tensor` of shape `(B,)`, float32: -log p(x(t*)).
    """
    noisy_images = flow_marginal_sample(scheduler, clean_images, generator=generator)
    return -flow_prior(noisy_images).log_prob.float()


def nats_to_bits_per_dim(nll: Union[torch.Tensor, float], num_dims: int) -> Union[torch.Tensor, float]:
    """Converts a negative log-likelihood in nats per sample to bits per dimension: nll / (D ln 2).

    x(t*) is continuous (it carries Gaussian noise), so no dequantisation offset applies.
    """
    return nll / (num_dims * math.log(2.0))
