# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Exact log-likelihoods with the probability-flow ODE and a prior at its end (SPEC, "Likelihood with a flow prior").

log p_eps(x) = log p_prior(x(t_end)) + integral from eps to t_end of div_x dx/dt (x(t), t) dt, where x(t) solves the
probability-flow ODE from x(eps) = x up to t_end (t* with the flow prior, T with the SDE prior): the instantaneous
change of variables (Chen et al. 2018) of Song et al. (2021). The state and the running log-determinant are integrated
together (one augmented ODE) by `integrate_rk45`. The divergence is estimated by Hutchinson-Skilling with one probe
per integration (the published code's choice: a fixed probe makes the integrand smooth in t), Rademacher or Gaussian,
or computed exactly by probing with each of the D basis vectors (D copies of the batch in one network pass and one
backward pass: small images only, the tests' reference).
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from diffusers.utils import BaseOutput

from ...schedulers.ode_solvers import integrate_rk45
from ...validation import check_choice, check_positive_int

TRACE_ESTIMATORS = ("rademacher", "gaussian", "exact")
# "exact" evaluates the network on D copies of the batch: meant for analytic test models and tiny images.
EXACT_TRACE_MAX_DIM = 64


@dataclass
class DiNofLikelihoodOutput(BaseOutput):
    """Output of `DiNofPipeline.log_likelihood`; every tensor has shape `(B,)`, float64 on the CPU.

    Args:
        log_prob (`torch.Tensor`): log-density of the (dequantized) images on [0, 1]^D in nats: the density the ODE
            gives x(eps), including the map to the model's data range.
        bits_per_dim (`torch.Tensor`): -log_prob / (D ln 2) + num_bits (without + num_bits when `num_bits=None`).
        prior_log_prob (`torch.Tensor`): the prior's log-density at the ODE's end (the flow's at t*, or the SDE
            prior's at T).
        delta_log_prob (`torch.Tensor`): the ODE's log-determinant, the integral of the drift's divergence.
        nfe (`int`): network evaluations (each with one backward pass; with `"exact"` on a D-times larger batch).
    """

    log_prob: torch.Tensor = None
    bits_per_dim: torch.Tensor = None
    prior_log_prob: torch.Tensor = None
    delta_log_prob: torch.Tensor = None
    nfe: int = None


def check_images(images, expected_shape: Tuple[int, int, int], name: str = "images") -> None:
    """Raises `ValueError` unless `images` is a finite float tensor (B, C, H, W) of the model's (C, H, W) in [0, 1]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"`{name}` must be a float tensor of shape (B, C, H, W) in [0, 1], got {type(images)}.")
    if images.ndim != 4 or images.shape[0] < 1 or tuple(images.shape[1:]) != tuple(expected_shape):
        raise ValueError(
            f"`{name}` must have shape (B, {', '.join(map(str, expected_shape))}), got {tuple(images.shape)}."
        )
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"`{name}` must hold finite values in [0, 1] (as the pipeline returns with output_type='pt'), got values "
            f"in [{images.min().item()}, {images.max().item()}]."
        )


def check_likelihood_options(num_bits, dequantize, trace_estimator, generator, batch_size, dim: int) -> None:
    """Raises `ValueError` for arguments of `DiNofPipeline.log_likelihood` that it cannot use."""
    check_positive_int(num_bits, "num_bits", allow_none=True)
    if not isinstance(dequantize, bool):
        raise ValueError(f"`dequantize` must be a bool, got {dequantize!r}.")
    if dequantize and num_bits is None:
        raise ValueError("`dequantize=True` needs `num_bits` (the bit depth of the data); pass dequantize=False.")
    check_choice(trace_estimator, "trace_estimator", TRACE_ESTIMATORS)
    if trace_estimator == "exact" and dim > EXACT_TRACE_MAX_DIM:
        raise ValueError(
            f"`trace_estimator='exact'` costs one network pass per dimension and is limited to D <= "
            f"{EXACT_TRACE_MAX_DIM} (analytic test models, tiny images); these images have D = {dim}: use "
            "'rademacher' or 'gaussian'."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be None or one torch.Generator, got {type(generator)}.")
    check_positive_int(batch_size, "batch_size", allow_none=True)


def _random(kind: str, shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """float64 draws on the generator's device (the CPU without one), moved to `device`: seeded results do not
    depend on where the model runs."""
    source = generator.device if generator is not None else torch.device("cpu")
    if kind == "uniform":
        values = torch.rand(shape, generator=generator, device=source, dtype=torch.float64)
    elif kind == "gaussian":
        values = torch.randn(shape, generator=generator, device=source, dtype=torch.float64)
    else:  # rademacher
        values = torch.randint(0, 2, shape, generator=generator, device=source).to(torch.float64) * 2.0 - 1.0
    return values.to(device)


def dequantize_images(images: torch.Tensor, num_bits: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Uniform dequantization as in the published code: k / (2^b - 1) -> (k + u) / 2^b, u ~ U(0, 1).

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): b-bit images in [0, 1].
        num_bits (`int`): b.
        generator (`torch.Generator`, *optional*): the source of u.

    Returns:
        `torch.Tensor` of the shape of `images`, float64, in [0, 1).
    """
    levels = 2.0**num_bits
    u = _random("uniform", images.shape, generator, images.device)
    return (images.double() * (levels - 1.0) + u) / levels


def _divergence_fn(
    drift: Callable[[torch.Tensor, float], torch.Tensor], trace_estimator: str, probe: Optional[torch.Tensor]
) -> Callable[[torch.Tensor, float], Tuple[torch.Tensor, torch.Tensor]]:
    """(x, t) -> (drift, its divergence (B,)), by one vector-Jacobian product with the probe, or exactly."""

    def hutchinson(x, t):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            value = drift(x, t)
            (vjp,) = torch.autograd.grad((value * probe).sum(), x)
        return value.detach(), (vjp * probe).flatten(1).sum(1)

    def exact(x, t):
        # D copies of the batch, copy d probed with the d-th basis vector: one pass, one backward, exact trace.
        batch, dim = x.shape[0], x[0].numel()
        basis = (
            torch.eye(dim, dtype=x.dtype, device=x.device)
            .repeat_interleave(batch, dim=0)
            .view(dim * batch, *x.shape[1:])
        )
        with torch.enable_grad():
            copies = x.detach().repeat(dim, *([1] * (x.ndim - 1))).requires_grad_(True)
            value = drift(copies, t)
            (vjp,) = torch.autograd.grad((value * basis).sum(), copies)
        divergence = (vjp * basis).flatten(1).sum(1).view(dim, batch).sum(0)
        return value[:batch].detach(), divergence

    return exact if trace_estimator == "exact" else hutchinson


def integrate_log_density(
    drift: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    t0: float,
    t1: float,
    trace_estimator: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    step_callback=None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Solves the probability-flow ODE from x(t0) = x to t1 together with the integral of its divergence.

    Args:
        drift: dx/dt as a function of (x, t), differentiable in x (the pipeline's network plus `ode_drift`).
        x (`torch.Tensor` of shape `(B, C, H, W)`): the state at t0 (float64 recommended, as the published code).
        t0, t1 (`float`): eps and t* (or T).
        trace_estimator (`str`): "rademacher", "gaussian" (one probe per sample, fixed over the integration) or
            "exact".
        generator (`torch.Generator`, *optional*): the source of the probe.
        rtol, atol (`float`): the rk45 tolerances, applied to the state and the log-determinant alike (published).
        step_callback: passed to `integrate_rk45` (called with the augmented state).

    Returns:
        `(x(t1), delta_log_prob (B,), nfe)`.
    """
    shape, dim = x.shape, x[0].numel()
    probe = None if trace_estimator == "exact" else _random(trace_estimator, shape, generator, x.device).to(x.dtype)
    divergence = _divergence_fn(drift, trace_estimator, probe)

    def augmented_drift(state, t):
        value, div = divergence(state[:, :dim].reshape(shape), t)
        return torch.cat([value.flatten(1), div.to(state.dtype)[:, None]], dim=1)

    state = torch.cat([x.flatten(1), x.new_zeros(shape[0], 1)], dim=1)
    state, nfe = integrate_rk45(augmented_drift, state, t0, t1, rtol=rtol, atol=atol, step_callback=step_callback)
    return state[:, :dim].reshape(shape), state[:, dim], nfe


def range_log_det(data_range: Tuple[float, float], dim: int) -> float:
    """log|det| of the map [0, 1]^D -> data_range^D, x -> low + (high - low) x: D ln(high - low) (D ln 2 for VP)."""
    low, high = data_range
    return dim * math.log(high - low)
