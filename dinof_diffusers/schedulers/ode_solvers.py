# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Solvers of the probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t) (Song et al. 2021), and its time grids.

The SDE quantities (the drift, the noise levels) come from `DiNofScheduler`; this module only integrates. A drift is a
function `drift(x, t) -> dx/dt` of a state tensor x (any shape; the batch is the first dimension) and a Python float
time t; integration may run backwards in time (t1 < t0, as sampling does).

- `"rk45"`: adaptive Dormand-Prince 5(4) with the error control of `scipy.integrate.solve_ivp(method="RK45")` (which
  the published likelihood and ODE sampler call): the same Butcher tableau, initial step selection (Hairer, Norsett &
  Wanner, Sec. II.4), error norm (root mean square over every element of the state, all samples together, so a batch
  shares its steps, as in the published code) and step-size rule (safety 0.9, factors in [0.2, 10]). It runs on the
  state's device in its dtype, without copies to NumPy; NFE = 2 + 6 x attempted steps, like scipy's `nfev`.
- `"heun"`: EDM's second-order Heun steps (Karras et al. 2022, Algorithm 1) on a given grid, the last step Euler
  (NFE = 2 n - 1 for n steps).
- `"euler"`: first-order steps (NFE = n).

Grids for heun / euler (`ode_time_grid`): `"uniform"` in t (the PC sampler's spacing) or `"karras"`, EDM's rho = 7
spacing of the noise level sigma(t) = std(t) / mean_coeff(t) (sigma(t) for VE).
"""

import math
from typing import Callable, Optional, Tuple

import torch

from ..validation import check_choice, check_number, check_positive_int

ODE_SOLVERS = ("rk45", "heun", "euler")
TIMESTEP_SPACINGS = ("uniform", "karras")
KARRAS_RHO = 7.0

Drift = Callable[[torch.Tensor, float], torch.Tensor]
# step_callback(step_index, t, x) after every accepted step; a tensor it returns replaces the state.
StepCallback = Callable[[int, float, torch.Tensor], Optional[torch.Tensor]]

# Dormand & Prince (1980), the tableau of RK5(4)7M with FSAL; the error weights are b - b_hat.
_DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DOPRI_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DOPRI_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_ERROR_EXPONENT = -1.0 / 5.0  # -1 / (order of the embedded error estimate + 1)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def check_ode_options(ode_solver: str, timestep_spacing: str, rtol: float, atol: float) -> None:
    """Raises `ValueError` for an unknown solver or spacing, or tolerances that are not finite numbers > 0."""
    check_choice(ode_solver, "ode_solver", ODE_SOLVERS)
    check_choice(timestep_spacing, "timestep_spacing", TIMESTEP_SPACINGS)
    check_number(rtol, "rtol", minimum=0.0, exclusive_minimum=True)
    check_number(atol, "atol", minimum=0.0, exclusive_minimum=True)


def ode_time_grid(scheduler, num_steps: int, start: float, spacing: str = "uniform") -> torch.Tensor:
    """The n + 1 times of n solver steps from `start` down to `scheduler.sampling_eps`.

    Args:
        scheduler (`DiNofScheduler`): a continuous-time scheduler (its noise levels give the "karras" grid).
        num_steps (`int`): n >= 1.
        start (`float`): the first time, t* or T.
        spacing (`str`): `"uniform"`: linspace(start, eps, n + 1), the PC sampler's spacing; `"karras"`: the times of
            the noise levels (sigma_start^(1/rho) + k / n (sigma_eps^(1/rho) - sigma_start^(1/rho)))^rho, rho = 7.

    Returns:
        `torch.Tensor` of shape `(n + 1,)`, float64 on the CPU, decreasing, first `start` and last eps exactly.
    """
    check_positive_int(num_steps, "num_inference_steps")
    eps = scheduler.sampling_eps
    if spacing == "uniform":
        return torch.linspace(start, eps, num_steps + 1, dtype=torch.float64)
    sigma_start, sigma_end = scheduler.noise_level(torch.tensor([start, eps], dtype=torch.float64)).tolist()
    ramp = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    inverse_rho = 1.0 / KARRAS_RHO
    sigmas = (sigma_start**inverse_rho + ramp * (sigma_end**inverse_rho - sigma_start**inverse_rho)) ** KARRAS_RHO
    times = scheduler.time_at_noise_level(sigmas)
    times[0], times[-1] = start, eps
    return times


def _maybe_replace(x: torch.Tensor, replacement: Optional[torch.Tensor]) -> torch.Tensor:
    return x if replacement is None else replacement.to(dtype=x.dtype, device=x.device)


def integrate_fixed_steps(
    drift: Drift,
    x: torch.Tensor,
    times: torch.Tensor,
    solver: str = "heun",
    step_callback: Optional[StepCallback] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> Tuple[torch.Tensor, int]:
    """Euler or Heun steps over a time grid.

    Args:
        drift: dx/dt as a function of (x, t).
        x (`torch.Tensor`): the state at `times[0]`.
        times (`torch.Tensor` of shape `(n + 1,)`): the grid (float64).
        solver (`str`): `"heun"` (EDM: second-order steps, the last one Euler) or `"euler"`.
        step_callback: called after every step with (k, times[k + 1], x); a tensor it returns replaces x.
        should_stop: checked before every step; the integration stops early when it returns True.

    Returns:
        `(x, nfe)`: the state at `times[-1]` (or where it stopped) and the number of drift evaluations.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"`solver` must be 'heun' or 'euler', got {solver!r}.")
    grid = [float(t) for t in times]
    num_steps, nfe = len(grid) - 1, 0
    for k in range(num_steps):
        if should_stop is not None and should_stop():
            break
        t, t_next = grid[k], grid[k + 1]
        step = t_next - t
        derivative = drift(x, t)
        nfe += 1
        x_euler = x + step * derivative
        if solver == "heun" and k < num_steps - 1:
            nfe += 1
            x = x + 0.5 * step * (derivative + drift(x_euler, t_next))
        else:
            x = x_euler
        if step_callback is not None:
            x = _maybe_replace(x, step_callback(k, t_next, x))
    return x, nfe


def _rms(x: torch.Tensor) -> float:
    return torch.linalg.vector_norm(x).item() / math.sqrt(x.numel())


def _initial_step(drift, t0, t1, x0, f0, rtol, atol) -> Tuple[float, int]:
    """Hairer, Norsett & Wanner (Sec. II.4)'s starting step, as scipy's `select_initial_step`; one drift evaluation."""
    interval, direction = abs(t1 - t0), math.copysign(1.0, t1 - t0)
    scale = atol + x0.abs() * rtol
    d0, d1 = _rms(x0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, interval)
    f1 = drift(x0 + h0 * direction * f0, t0 + h0 * direction)
    d2 = _rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / 5.0)
    return min(100.0 * h0, h1, interval), 1


def integrate_rk45(
    drift: Drift,
    x: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    step_callback: Optional[StepCallback] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    max_steps: int = 100_000,
) -> Tuple[torch.Tensor, int]:
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction), with scipy RK45's error control.

    A step is accepted when the root mean square over every element of err / (atol + rtol * max(|x|, |x_new|)) is
    below 1; err is the difference of the embedded 5th and 4th order solutions. Compute the state in float64 (as the
    published code, through NumPy) for tolerances near float32's resolution.

    Args:
        drift: dx/dt as a function of (x, t).
        x (`torch.Tensor`): the state at t0.
        t0, t1 (`float`): the interval.
        rtol, atol (`float`): relative and absolute tolerances (> 0).
        step_callback: called after every accepted step with (k, t, x); a tensor it returns replaces x (the drift is
            then evaluated again there).
        should_stop: checked before every step; the integration stops early when it returns True.
        max_steps (`int`): attempted steps before giving up with a `RuntimeError`.

    Returns:
        `(x, nfe)`: the state at t1 (or where it stopped) and the number of drift evaluations.
    """
    t0, t1 = float(t0), float(t1)
    if t0 == t1:
        return x, 0
    direction = math.copysign(1.0, t1 - t0)
    f = drift(x, t0)
    step_size, nfe = _initial_step(drift, t0, t1, x, f, rtol, atol)
    nfe += 1
    # the 7 stage derivatives, stacked so that each combination of them is one contraction
    stages = x.new_empty((7, *x.shape))
    tableau_a = [torch.tensor(row, dtype=x.dtype, device=x.device) for row in _DOPRI_A]
    tableau_b = torch.tensor(_DOPRI_B, dtype=x.dtype, device=x.device)
    tableau_e = torch.tensor(_DOPRI_E, dtype=x.dtype, device=x.device)
    t, accepted, attempts = t0, 0, 0
    while direction * (t1 - t) > 0:
        if should_stop is not None and should_stop():
            break
        min_step = 10.0 * abs(math.nextafter(t, direction * math.inf) - t)
        step_size = max(step_size, min_step)
        rejected = False
        while True:
            attempts += 1
            if step_size < min_step or attempts > max_steps:
                raise RuntimeError(
                    f"rk45 could not reach t = {t1} from t = {t} (step {step_size:.3g} after {attempts} attempts): "
                    "the drift is not finite or too stiff for these tolerances."
                )
            t_new = t + direction * step_size
            if direction * (t_new - t1) > 0:
                t_new = t1
            h = t_new - t
            step_size = abs(h)
            stages[0] = f
            for s in range(1, 6):
                stages[s] = drift(x + h * torch.tensordot(tableau_a[s], stages[:s], dims=1), t + _DOPRI_C[s] * h)
            x_new = x + h * torch.tensordot(tableau_b, stages[:6], dims=1)
            stages[6] = f_new = drift(x_new, t_new)
            nfe += 6
            scale = atol + torch.maximum(x.abs(), x_new.abs()) * rtol
            error_norm = _rms(h * torch.tensordot(tableau_e, stages, dims=1) / scale)
            if not math.isfinite(error_norm):
                raise RuntimeError(f"rk45: the drift returned non-finite values at t = {t}.")
            if error_norm < 1.0:
                factor = _MAX_FACTOR if error_norm == 0 else min(_MAX_FACTOR, _SAFETY * error_norm**_ERROR_EXPONENT)
                step_size *= min(1.0, factor) if rejected else factor
                break
            step_size *= max(_MIN_FACTOR, _SAFETY * error_norm**_ERROR_EXPONENT)
            rejected = True
        x, f, t = x_new, f_new, t_new
        if step_callback is not None:
            replacement = step_callback(accepted, t, x)
            if replacement is not None and replacement is not x:
                x = _maybe_replace(x, replacement)
                f = drift(x, t)
                nfe += 1
        accepted += 1
    return x, nfe
