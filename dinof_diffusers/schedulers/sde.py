# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The forward SDEs of Song et al. (2021) and their discrete chains: the one place where SDE quantities are computed.

VE (its chain is SMLD's), VP (DDPM's) and sub-VP (no chain of its own: Euler steps); the mathematics is in
docs/DESIGN.md ("The SDEs", "Reverse steps"). `DiNofScheduler` (scheduling_dinof.py) builds one of them from its
config and goes through it for every marginal, drift, diffusion and step transition.

All inputs and outputs are float64 CPU tensors of shape (B,): times t in [0, T], chain indices i in [0, N - 1] and j in
[-1, N - 2] (-1 stands for the data, x_{-1} = x(0)). Every SDE has the linear drift f(x, t) = drift_coeff(t) * x.
"""

import math
from abc import ABC, abstractmethod
from typing import Tuple

import torch


class SDE(ABC):
    """A forward SDE dx = f(x, t) dt + g(t) dw on [0, T] and its N-step discretisation.

    `step_transition(t, i, j)` returns (a, var) of the forward transition from chain index j to chain index i,
    x_i = a * x_j + sqrt(var) * z. The default is the Euler discretisation of the SDE over
    dt = (i - j) / N, i.e. f_i = f(x, t) / N, G_i = g(t) / sqrt(N) for one index; VE and VP override it with their
    exact discrete chains (SMLD and DDPM).
    """

    prior_std = 1.0

    def __init__(self, num_train_timesteps: int, T: float = 1.0):
        self.N = num_train_timesteps
        self.T = T

    # continuous SDE
    @abstractmethod
    def marginal_mean_std(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """See the subclasses."""

    @abstractmethod
    def drift_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """See the subclasses."""

    @abstractmethod
    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """See the subclasses."""

    # discrete chain
    @abstractmethod
    def chain_mean_std(self, i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """See the subclasses."""

    def step_dt(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The time a step over the chain indices (j, i] advances: (i - j) / N, 1 / N for one index."""
        return (i - j).double() * self.T / self.N

    def step_transition(self, t: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dt = self.step_dt(i, j)
        return 1.0 + self.drift_coeff(t) * dt, self.diffusion(t) ** 2 * dt

    @abstractmethod
    def ancestral_std(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """See the subclasses."""

    def langevin_alpha(self, i: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(i, dtype=torch.float64)

    # noise levels of the probability-flow ODE's time grids
    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """EDM's sigma(t) = std(t) / mean_coeff(t) (Karras et al. 2022): sigma(t) for VE; increasing in t."""
        mean, std = self.marginal_mean_std(t)
        return std / mean

    def time_at_noise_level(self, sigma: torch.Tensor) -> torch.Tensor:
        """The t in [0, T] with noise_level(t) = sigma (clipped to the ends), by bisection to float64 resolution."""
        low, high = torch.zeros_like(sigma), torch.full_like(sigma, self.T)
        for _ in range(64):  # 2^-64 T is below float64's resolution of t
            middle = 0.5 * (low + high)
            above = self.noise_level(middle) > sigma
            low, high = torch.where(above, low, middle), torch.where(above, middle, high)
        return 0.5 * (low + high)


class VESDE(SDE):
    """Variance exploding SDE; its chain is SMLD's with sigma_i = exp(linspace(ln sigma_min, ln sigma_max, N))."""

    def __init__(self, num_train_timesteps: int, sigma_min: float, sigma_max: float, T: float = 1.0):
        super().__init__(num_train_timesteps, T)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.prior_std = sigma_max
        self.discrete_sigmas = torch.exp(
            torch.linspace(math.log(sigma_min), math.log(sigma_max), num_train_timesteps, dtype=torch.float64)
        )

    def _sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (t / self.T)

    def _chain_sigma(self, i):  # sigma_{-1} = 0
        return torch.where(i >= 0, self.discrete_sigmas[i.clamp(min=0)], torch.zeros((), dtype=torch.float64))

    def marginal_mean_std(self, t):
        return torch.ones_like(t), self._sigma(t)

    def drift_coeff(self, t):
        return torch.zeros_like(t)

    def diffusion(self, t):
        return self._sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min) / self.T)

    def chain_mean_std(self, i):
        return torch.ones_like(i, dtype=torch.float64), self._chain_sigma(i)

    def step_transition(self, t, i, j):
        return torch.ones_like(t), self._chain_sigma(i) ** 2 - self._chain_sigma(j) ** 2

    def ancestral_std(self, i, j):
        sigma_i, sigma_j = self._chain_sigma(i), self._chain_sigma(j)
        return torch.sqrt(sigma_j**2 * (sigma_i**2 - sigma_j**2) / sigma_i**2)


class LinearBetaSDE(SDE):
    """What VP and sub-VP share: beta(t) = beta_min + t (beta_max - beta_min) / T, the drift -beta(t) x / 2 and its
    mean coefficient, and DDPM's discrete beta_i = linspace(beta_min / N, beta_max / N, N), whose alpha_i = 1 - beta_i
    the Langevin corrector uses."""

    def __init__(self, num_train_timesteps: int, beta_min: float, beta_max: float, T: float = 1.0):
        super().__init__(num_train_timesteps, T)
        self.beta_min = beta_min
        self.beta_max = beta_max
        N = num_train_timesteps
        self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
        self.alphas = 1.0 - self.discrete_betas

    def _beta(self, t):
        return self.beta_min + t / self.T * (self.beta_max - self.beta_min)

    def _log_mean_coeff(self, t):
        t = t / self.T
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift_coeff(self, t):
        return -0.5 * self._beta(t)

    def langevin_alpha(self, i):
        return self.alphas[i]


class VPSDE(LinearBetaSDE):
    """Variance preserving SDE; its chain is DDPM's."""

    def __init__(self, num_train_timesteps: int, beta_min: float, beta_max: float, T: float = 1.0):
        super().__init__(num_train_timesteps, beta_min, beta_max, T)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _chain_alphas_cumprod(self, i):  # alphabar_{-1} = 1
        return torch.where(i >= 0, self.alphas_cumprod[i.clamp(min=0)], torch.ones((), dtype=torch.float64))

    def marginal_mean_std(self, t):
        log_mean = self._log_mean_coeff(t)
        return torch.exp(log_mean), torch.sqrt(1.0 - torch.exp(2.0 * log_mean))

    def diffusion(self, t):
        return torch.sqrt(self._beta(t))

    def chain_mean_std(self, i):
        alphas_cumprod = self._chain_alphas_cumprod(i)
        return torch.sqrt(alphas_cumprod), torch.sqrt(1.0 - alphas_cumprod)

    def step_transition(self, t, i, j):
        # alpha over the indices j + 1 ... i; for i = j + 1 this is alpha_i (to float64 rounding).
        alpha = self._chain_alphas_cumprod(i) / self._chain_alphas_cumprod(j)
        return torch.sqrt(alpha), 1.0 - alpha

    def ancestral_std(self, i, j):
        return torch.sqrt(self.step_transition(None, i, j)[1])


class SubVPSDE(LinearBetaSDE):
    """Sub-VP SDE: VP's drift, a smaller diffusion; no discrete chain of its own (the Euler steps of `SDE`)."""

    def marginal_mean_std(self, t):
        log_mean = self._log_mean_coeff(t)
        return torch.exp(log_mean), 1.0 - torch.exp(2.0 * log_mean)

    def diffusion(self, t):
        s = t / self.T
        discount = 1.0 - torch.exp(-2.0 * self.beta_min * s - (self.beta_max - self.beta_min) * s**2)
        return torch.sqrt(self._beta(t) * discount)

    def chain_mean_std(self, i):
        raise ValueError("`continuous=False` is not defined for sde_type='subvp'.")

    def ancestral_std(self, i, j):
        raise ValueError("`predictor='ancestral'` is not defined for sde_type='subvp'.")
