# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The DiNof predictor-corrector scheduler (score SDEs of Song et al. 2021, sampled from t* = flow_start * T).

The mathematics is in docs/DESIGN.md ("The SDEs", "Reverse steps"); every SDE quantity (marginal, drift, diffusion,
per-step discretisation) is computed by exactly one of the SDE classes of `sde.py`, and every public method of
`DiNofScheduler` goes through them.

Time convention: every public time is the continuous t in [0, T] with T = 1, for continuous and discrete models alike.
The discrete index of a time is i(t) = floor(t * (N - 1) / T) (docs/DESIGN.md, "Time convention"), in float64.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..validation import check_choice, check_int, check_number, check_positive_int
from .sde import VESDE, VPSDE, SubVPSDE

SDE_TYPES = ("ve", "vp", "subvp")
PREDICTION_TYPES = ("score", "epsilon")
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")
LANGEVIN_NORMS = ("batch", "sample")
# What `model_timestep` feeds the network of a discrete model (continuous ones: the same under both; docs/DESIGN.md,
# "Network conditioning"): "diffusers" (UNet2DModel: sigma_i / the index i) or "score_sde" (the published get_score_fn:
# the SMLD label N - 1 - i / the float t (N - 1); NCSNppModel).
MODEL_CONDITIONINGS = ("diffusers", "score_sde")
DEFAULT_SAMPLING_EPS = {"ve": 1e-5, "vp": 1e-3, "subvp": 1e-3}

# Continuous "epsilon"/VP-style models are conditioned on 999 * t whatever N is (Song et al. hard-code 999), so that
# a continuous model can be sampled on a finer grid (larger num_train_timesteps) without changing its conditioning.
CONTINUOUS_LABEL_SCALE = 999.0
# A public time within this distance of a point of the sampling grid is taken to be that grid point; grid points are
# at least ~1 / N apart, so this only absorbs float32 rounding of the stored grid.
_GRID_ATOL = 1e-6
# Guards float64 rounding in floor(t * (N - 1) / T) (e.g. 598.9999999999999 for an exact 599).
_INDEX_ATOL = 1e-7


@dataclass
class DiNofSchedulerOutput(BaseOutput):
    """Output of `DiNofScheduler.step_correct`, `step_pred` and `step`.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The new noisy sample x (mean plus noise); the input of the next network evaluation.
        prev_sample_mean (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The same update without its noise term (x_mean). The last predictor's `prev_sample_mean` is the sampler's
            output ("noise removal").
    """

    prev_sample: Optional[torch.Tensor] = None
    prev_sample_mean: Optional[torch.Tensor] = None


def _rand_uniform(batch_size, generator, device):
    """U(0, 1) of shape (batch_size,) float64 on `device`; a list of generators gives one draw per sample."""
    if isinstance(generator, list):
        if len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators, but batch_size is {batch_size}.")
        u = [torch.rand(1, generator=g, device=g.device, dtype=torch.float64).cpu() for g in generator]
        return torch.cat(u).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.rand(batch_size, generator=generator, device=rand_device, dtype=torch.float64).to(device)


def num_flow_steps(num_train_timesteps: int, flow_start: float) -> int:
    """int(N * flow_start): the reverse steps from t* of a scheduler with these settings (`DiNofScheduler.num_flow_steps`)."""
    # The tolerance guards products like 0.58 * 100 = 57.99999999999999 that are integers in exact arithmetic.
    return int(math.floor(num_train_timesteps * flow_start + 1e-9))


class DiNofScheduler(SchedulerMixin, ConfigMixin):
    """Predictor-corrector sampler of the score SDEs (VE, VP, sub-VP) run from t* = flow_start * T down to eps.

    DiNof replaces the first (1 - flow_start) of the reverse SDE by a normalizing flow that samples x(t*) directly; this
    scheduler provides the remaining reverse-time steps, and, for training and likelihoods, the forward marginals, the
    SDE coefficients and the network conditioning. With `flow_start=1.0` and `set_timesteps(use_flow_prior=False)` it is
    the plain PC sampler of Song et al. (2021).

    Args:
        sde_type (`str`, defaults to `"ve"`): `"ve"`, `"vp"` or `"subvp"`.
        num_train_timesteps (`int`, defaults to 1000): N, the number of noise scales of the discretisation.
        sigma_min (`float`, defaults to 0.01): VE's smallest noise scale.
        sigma_max (`float`, defaults to 50.0): VE's largest noise scale (348 for CelebA-HQ-256).
        beta_min (`float`, defaults to 0.1): VP / sub-VP beta(0).
        beta_max (`float`, defaults to 20.0): VP / sub-VP beta(T).
        sampling_eps (`float`, *optional*): the last sampling time; `None` means 1e-5 for VE and 1e-3 for VP / sub-VP.
        continuous (`bool`, defaults to `True`): whether the network was trained in continuous time (conditioned on
            sigma(t) or 999 t, marginals of the SDE) or on the discrete chain (conditioned on sigma_i or the index i,
            marginals of the SMLD / DDPM chain). `False` is not defined for sub-VP.
        prediction_type (`str`, defaults to `"score"`): `"score"` (the network returns grad_x log p_t) or `"epsilon"`
            (it returns the noise; score = -output / std(t)).
        predictor (`str`, defaults to `"reverse_diffusion"`): `"reverse_diffusion"`, `"euler_maruyama"`, `"ancestral"`
            (VE and VP only) or `"none"`.
        corrector (`str`, defaults to `"langevin"`): `"langevin"`, `"ald"` (annealed Langevin) or `"none"`.
        snr (`float`, defaults to 0.16): the corrector's signal-to-noise ratio (0.17 for CelebA-HQ-256).
        correct_steps (`int`, defaults to 1): corrector steps per reverse step (each one network evaluation).
        flow_start (`float`, defaults to 0.6): t* / T, where the flow prior hands over to the reverse SDE; in (0, 1].
        langevin_norm (`str`, defaults to `"batch"`): how the Langevin step size averages norms. `"batch"` (published):
            step = 2 a (snr * mean_b ||z_b|| / mean_b ||grad_b||)^2, shared by the batch, so a sample depends on the
            rest of its batch; `"sample"`: per-sample norms, so every sample is independent of its batch.
        model_conditioning (`str`, defaults to `"diffusers"`): what `model_timestep` feeds a discrete model's network.
            `"diffusers"` (UNet2DModel, the google/* checkpoints): SMLD sigma_i, DDPM the index i (long);
            `"score_sde"` (NCSNppModel, the published `get_score_fn`): SMLD the label N - 1 - i (long; label 0 is
            sigma_max), DDPM t (N - 1) (float). Continuous models get sigma(t) (VE score models) or 999 t under both.

    The seven published DiNof configurations are `DINOF_PUBLISHED_SCHEDULER_CONFIGS` (`published_configs.py`): NCSN++
    VE with reverse diffusion and one Langevin step (snr 0.16, CelebA-HQ-256 0.17 with sigma_max 348), DDPM++ VP and
    sub-VP with Euler-Maruyama and no corrector (discrete VP: ancestral), all with `flow_start=0.6`.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(
        self,
        sde_type: str = "ve",
        num_train_timesteps: int = 1000,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        sampling_eps: Optional[float] = None,
        continuous: bool = True,
        prediction_type: str = "score",
        predictor: str = "reverse_diffusion",
        corrector: str = "langevin",
        snr: float = 0.16,
        correct_steps: int = 1,
        flow_start: float = 0.6,
        langevin_norm: str = "batch",
        model_conditioning: str = "diffusers",
    ):
        check_choice(sde_type, "sde_type", SDE_TYPES)
        check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
        check_choice(predictor, "predictor", PREDICTORS)
        check_choice(corrector, "corrector", CORRECTORS)
        check_choice(langevin_norm, "langevin_norm", LANGEVIN_NORMS)
        check_choice(model_conditioning, "model_conditioning", MODEL_CONDITIONINGS)
        check_int(num_train_timesteps, "num_train_timesteps", minimum=2)
        check_number(snr, "snr", minimum=0.0, exclusive_minimum=True)
        check_int(correct_steps, "correct_steps", minimum=0)
        check_number(flow_start, "flow_start", minimum=0.0, maximum=1.0, exclusive_minimum=True)
        # every noise level must be finite, also those of the SDE not in use (they are saved with the config)
        noise_levels = {"sigma_min": sigma_min, "sigma_max": sigma_max, "beta_min": beta_min, "beta_max": beta_max}
        for name, value in noise_levels.items():
            check_number(value, name, minimum=0.0, exclusive_minimum=True)
        check_number(sampling_eps, "sampling_eps", minimum=0.0, exclusive_minimum=True, allow_none=True)
        if sde_type == "ve" and not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"`sigma_min` and `sigma_max` must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}."
            )
        if sde_type != "ve" and not 0.0 < beta_min < beta_max:
            raise ValueError(
                f"`beta_min` and `beta_max` must satisfy 0 < beta_min < beta_max, got {beta_min}, {beta_max}."
            )
        if sde_type == "vp" and beta_max / num_train_timesteps >= 1.0:
            raise ValueError(
                f"`beta_max / num_train_timesteps` must be < 1 (discrete betas), got {beta_max}, {num_train_timesteps}."
            )
        if predictor == "ancestral" and sde_type == "subvp":
            raise ValueError("`predictor='ancestral'` is defined for sde_type 've' and 'vp' only, not 'subvp'.")
        if not continuous and sde_type == "subvp":
            raise ValueError(
                "`continuous=False` is defined for sde_type 've' (SMLD) and 'vp' (DDPM) only, not 'subvp'."
            )

        self.T = 1.0
        self.sampling_eps = DEFAULT_SAMPLING_EPS[sde_type] if sampling_eps is None else float(sampling_eps)
        if not 0.0 < self.sampling_eps < flow_start * self.T:
            raise ValueError(
                f"`sampling_eps` must lie in (0, flow_start * T) = (0, {flow_start * self.T}), got {self.sampling_eps}."
            )

        if sde_type == "ve":
            self._sde = VESDE(num_train_timesteps, sigma_min, sigma_max, self.T)
        elif sde_type == "vp":
            self._sde = VPSDE(num_train_timesteps, beta_min, beta_max, self.T)
        else:
            self._sde = SubVPSDE(num_train_timesteps, beta_min, beta_max, self.T)

        # standard deviation of the SDE prior at T (diffusers' name for it)
        self.init_noise_sigma = self._sde.prior_std
        self.num_inference_steps = None
        self.timesteps = None
        self._grid = None  # float64 CPU copy of `timesteps`
        self._grid_indices = None  # i(t_k), long (n,)
        self._grid_next_indices = None  # i(t_{k+1}), -1 after the last grid point, long (n,)
        self._grid_positions = None  # {float(timesteps[k]): k}

    # ------------------------------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def data_range(self) -> Tuple[float, float]:
        """(low, high) of the data the model works on: (0, 1) for VE, (-1, 1) for VP and sub-VP."""
        return (0.0, 1.0) if self.config.sde_type == "ve" else (-1.0, 1.0)

    @property
    def t_star(self) -> float:
        """t* = flow_start * T, the time at which the flow prior hands over."""
        return self.config.flow_start * self.T

    @property
    def num_flow_steps(self) -> int:
        """int(N * flow_start), the number of reverse steps of the published DiNof sampler (600 for N = 1000)."""
        return num_flow_steps(self.config.num_train_timesteps, self.config.flow_start)

    # ------------------------------------------------------------------------------------------------------------------
    # time handling
    # ------------------------------------------------------------------------------------------------------------------

    def _index_of(self, t64: torch.Tensor) -> torch.Tensor:
        """i(t) = floor(t (N - 1) / T) of float64 CPU times (B,), as long (B,)."""
        N = self.config.num_train_timesteps
        return torch.floor(t64 * (N - 1) / self.T + _INDEX_ATOL).long().clamp(0, N - 1)

    def _resolve(self, t, low: float = 0.0, name: str = "timestep"):
        """Turns a public time into float64 CPU times, chain indices and grid positions.

        Args:
            t (`float` or `torch.Tensor` of shape `()` or `(B,)`): continuous times.
            low (`float`): the smallest allowed time (eps for sampling steps, 0 otherwise).
            name (`str`): the argument's name for error messages.

        Returns:
            `(t64, index, position)`, each of shape `(B,)` (B = 1 for a scalar) on the CPU: the times in float64 (a time
            on the sampling grid is replaced by the exact float64 grid value), i(t) (long), and the position of t in
            `timesteps` (long, -1 where t is not a grid point).
        """
        if self._grid_positions is not None and (not torch.is_tensor(t) or t.numel() == 1):
            # fast path for the pipeline's loop: t is an element of `timesteps`
            position = self._grid_positions.get(float(t))
            if position is not None:
                k = slice(position, position + 1)
                return self._grid[k], self._grid_indices[k], torch.tensor([position])
        t64 = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
        if t64.numel() == 0:
            raise ValueError(f"`{name}` is empty.")
        if not torch.isfinite(t64).all() or (t64 < low - _GRID_ATOL).any() or (t64 > self.T + _GRID_ATOL).any():
            raise ValueError(
                f"`{name}` must lie in [{low}, {self.T}], got values in [{t64.min().item()}, {t64.max().item()}]."
            )
        t64 = t64.clamp(low, self.T)
        index = self._index_of(t64)
        position = torch.full_like(index, -1)
        if self._grid is not None:
            distance, nearest = (t64[:, None] - self._grid[None, :]).abs().min(dim=1)
            on_grid = distance <= _GRID_ATOL
            position = torch.where(on_grid, nearest, position)
            t64 = torch.where(on_grid, self._grid[nearest], t64)
            index = torch.where(on_grid, self._grid_indices[nearest], index)
        return t64, index, position

    @staticmethod
    def _upcast(x: torch.Tensor) -> torch.Tensor:
        """x itself, or x in float32 if it is half precision: the SDE arithmetic is never done in float16 / bfloat16."""
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    @staticmethod
    def _to(values: torch.Tensor, like: torch.Tensor, ndim: int = 1) -> torch.Tensor:
        """float64 CPU (B,) -> `like`'s device, float32 (float64 if `like` is), shaped (B, 1, ..., 1) with `ndim` dims."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return values.to(device=like.device, dtype=dtype).reshape(-1, *([1] * (ndim - 1)))

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        use_flow_prior: bool = True,
    ):
        """Sets the sampling grid `timesteps`, decreasing from the start time to `sampling_eps`.

        With the flow prior the grid is linspace(t*, eps, n) with n = int(N * flow_start) by default; without it,
        linspace(T, eps, n) with n = N by default (the baseline PC sampler from the SDE prior).

        Step sizes. A reverse step at grid point t_k covers the chain indices (j, i], i = i(t_k), j = i(t_{k+1})
        (j = -1 after the last grid point, i.e. down to the data), and uses the forward transition over exactly that
        range: VE G^2 = sigma_i^2 - sigma_j^2, VP alpha = alphabar_i / alphabar_j, sub-VP and Euler-Maruyama
        dt = (i - j) / N. With the default n the grid visits every index from i(t_start) down to 0 exactly once
        (e.g. N = 1000, t* = 0.6: i(t_k) = 599 - k), so i - j = 1 and these are exactly the per-index steps
        (sigma_i and sigma_{i-1}, alpha_i and beta_i, dt = 1 / N; docs/DESIGN.md, "Reverse steps"). With fewer steps each step spans several indices and
        uses the forward chain's transition over that span, so the steps always tile [0, t_start] without gap or
        overlap. More steps than the index grid has points would put two grid points on one index and are rejected;
        for a continuous model raise `num_train_timesteps` to refine the grid instead.

        Args:
            num_inference_steps (`int`, *optional*): n, the number of reverse steps; at least 1.
            device (`str` or `torch.device`, *optional*): where to put `timesteps`.
            use_flow_prior (`bool`, defaults to `True`): start at t* (DiNof) or at T (baseline).
        """
        start = self.t_star if use_flow_prior else self.T
        default_steps = self.num_flow_steps if use_flow_prior else self.config.num_train_timesteps
        if num_inference_steps is None:
            num_inference_steps = default_steps
        check_positive_int(num_inference_steps, "num_inference_steps")
        if num_inference_steps > 1 and not start > self.sampling_eps:
            raise ValueError(f"The start time {start} must exceed `sampling_eps` = {self.sampling_eps}.")

        grid = torch.linspace(start, self.sampling_eps, num_inference_steps, dtype=torch.float64)
        indices = self._index_of(grid)
        if num_inference_steps > 1 and not (indices[1:] < indices[:-1]).all():
            raise ValueError(
                f"`num_inference_steps` = {num_inference_steps} puts two grid points on one of the "
                f"{int(indices[0]) + 1} noise-scale indices below t = {start}; use at most {default_steps} steps, or "
                "raise `num_train_timesteps` for a continuous model."
            )
        self.num_inference_steps = num_inference_steps
        self._grid = grid
        self._grid_indices = indices
        self._grid_next_indices = torch.cat([indices[1:], torch.full((1,), -1, dtype=torch.long)])
        self.timesteps = grid.to(device=device, dtype=torch.float32)
        self._grid_positions = {value: k for k, value in enumerate(grid.float().tolist())}

    # ------------------------------------------------------------------------------------------------------------------
    # SDE quantities (training, likelihood, conditioning)
    # ------------------------------------------------------------------------------------------------------------------

    def _mean_std64(self, t64: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The marginal the network was trained on: the SDE's (continuous) or its chain's at i(t) (discrete)."""
        if self.config.continuous:
            return self._sde.marginal_mean_std(t64)
        return self._sde.chain_mean_std(index)

    def marginal_mean_std(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean coefficient and standard deviation of the forward marginal, x(t) = mean_coeff * x(0) + std * noise.

        For continuous models the SDE's marginal at t; for discrete ones the chain's at i(t) (SMLD: (1, sigma_i);
        DDPM: (sqrt(alphabar_i), sqrt(1 - alphabar_i))).

        Args:
            t (`torch.Tensor` of shape `(B,)`): times in [0, T].

        Returns:
            `(mean_coeff, std)`, each a `torch.Tensor` of shape `(B,)` on t's device (float64 if t is, else float32).
        """
        t = torch.as_tensor(t)
        t64, index, _ = self._resolve(t, name="t")
        like = t if t.is_floating_point() else t.float()
        mean, std = self._mean_std64(t64, index)
        return self._to(mean, like), self._to(std, like)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Samples the forward marginal: mean_coeff(t) * x(0) + std(t) * noise.

        Args:
            original_samples (`torch.Tensor` of shape `(B, C, H, W)`): clean data in `data_range`.
            noise (`torch.Tensor` of shape `(B, C, H, W)`): standard normal noise.
            timesteps (`torch.Tensor` of shape `(B,)` or `()`): continuous times in [0, T].

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)` and the dtype of `original_samples`: x(t).
        """
        t64, index, _ = self._resolve(timesteps, name="timesteps")
        mean, std = self._mean_std64(t64, index)
        x = original_samples
        compute = self._upcast(x)
        noisy = self._to(mean, compute, x.ndim) * compute + self._to(std, compute, x.ndim) * noise.to(compute.dtype)
        return noisy.to(x.dtype)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on at time t (docs/DESIGN.md, "Network conditioning").

        - continuous models: VE "score" models sigma(t), the marginal std (what `UNet2DModel(
          time_embedding_type="fourier")` and NCSN++ expect: they embed log(timestep) and divide their output by it);
          otherwise 999 t (float32).
        - discrete models, `model_conditioning="diffusers"`: VE "score" models sigma_i(t) (float32), otherwise the
          index i(t) (long), as the google/ddpm-* checkpoints.
        - discrete models, `model_conditioning="score_sde"` (NCSNppModel, the published `get_score_fn`): SMLD the
          label N - 1 - i(t) (long), which indexes the network's descending noise levels at sigma_i(t) (the published
          round((T - t)(N - 1)) on every grid point); DDPM t (N - 1) (float32), whose floor is i(t).

        Args:
            t (`torch.Tensor` of shape `(B,)` or `()`, or `float`): times in [0, T].

        Returns:
            `torch.Tensor` of shape `(B,)` (`(1,)` for a scalar) on t's device.
        """
        t = torch.as_tensor(t)
        device = t.device
        t64, index, _ = self._resolve(t, name="t")
        config = self.config
        if not config.continuous and config.model_conditioning == "score_sde":
            if config.sde_type == "ve":
                return (config.num_train_timesteps - 1 - index).to(device)
            return (t64 * (config.num_train_timesteps - 1) / self.T).to(device=device, dtype=torch.float32)
        if config.sde_type == "ve" and config.prediction_type == "score":
            return self._mean_std64(t64, index)[1].to(device=device, dtype=torch.float32)
        if config.continuous:
            return (CONTINUOUS_LABEL_SCALE * t64).to(device=device, dtype=torch.float32)
        return index.to(device)

    def _score(self, model_output, t64, index, like):
        """model output -> score (float32/64 like `like`), given resolved times."""
        out = model_output.to(like.dtype)
        if self.config.prediction_type == "score":
            return out
        std = self._mean_std64(t64, index)[1]
        return -out / self._to(std, like, like.ndim)

    def output_to_score(self, model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Converts the network output to the score grad_x log p_t(x).

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`): the network's output at (sample, model_timestep(t)).
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the input x(t) (used for its dtype and device).
            t (`torch.Tensor` of shape `(B,)` or `()`): times in (0, T].

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)` in the dtype of `sample`: the score.
        """
        t64, index, _ = self._resolve(t, name="t")
        like = self._upcast(sample)
        return self._score(model_output, t64, index, like).to(sample.dtype)

    def drift_diffusion(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward SDE coefficients, for the probability-flow ODE dx/dt = f - 0.5 g^2 score.

        Args:
            x (`torch.Tensor` of shape `(B, C, H, W)`): the state.
            t (`torch.Tensor` of shape `(B,)` or `()`): times in [0, T].

        Returns:
            `(f, g)`: the drift f(x, t) of shape `(B, C, H, W)` in x's dtype, and the diffusion g(t) of shape `(B,)`.
        """
        t64, _, _ = self._resolve(t, name="t")
        like = self._upcast(x)
        drift = self._to(self._sde.drift_coeff(t64), like, x.ndim) * like
        return drift.to(x.dtype), self._to(self._sde.diffusion(t64), like)

    def _check_continuous(self, what: str) -> None:
        if not self.config.continuous:
            raise ValueError(
                f"{what} is defined for continuous-time models only (`continuous=True`); this scheduler's model is "
                f"discrete ({'SMLD' if self.config.sde_type == 've' else 'DDPM'}): use the PC sampler."
            )

    def ode_drift(self, model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE's drift, dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t) (Song et al. 2021, eq. 13).

        Differentiable in `sample` and `model_output` (the likelihood's divergence goes through it). Continuous-time
        models only.

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`): the network's output at (sample, model_timestep(t)).
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the state x(t).
            t (`torch.Tensor` of shape `(B,)` or `()`, or `float`): times in [0, T] (pass float64 for off-grid times).

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)` in the dtype of `sample` (computed in float32 for half inputs).
        """
        self._check_continuous("The probability-flow ODE")
        t64, index, _ = self._resolve(t, name="t")
        x = self._upcast(sample)
        score = self._score(model_output, t64, index, x)
        drift = self._to(self._sde.drift_coeff(t64), x, x.ndim) * x
        half_g2 = self._to(0.5 * self._sde.diffusion(t64) ** 2, x, x.ndim)
        return (drift - half_g2 * score).to(sample.dtype)

    def prior_log_prob(self, sample: torch.Tensor) -> torch.Tensor:
        """log-density of the SDE prior at T, N(0, init_noise_sigma^2 I) (sigma_max for VE, 1 for VP / sub-VP).

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`): x(T).

        Returns:
            `torch.Tensor` of shape `(B,)` in nats, in the dtype of `sample` (float32 for half inputs).
        """
        x = self._upcast(sample)
        dim, std = x[0].numel(), self._sde.prior_std
        return -0.5 * dim * math.log(2.0 * math.pi * std**2) - x.flatten(1).square().sum(1) / (2.0 * std**2)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """EDM's noise level sigma(t) = std(t) / mean_coeff(t) of the continuous marginal (Karras et al. 2022).

        sigma(t) for VE; for VP and sub-VP the noise-to-signal ratio, whose rho-spacing is EDM's grid for them.

        Args:
            t (`torch.Tensor` of shape `(B,)`): times in [0, T].

        Returns:
            `torch.Tensor` of shape `(B,)`, float64 on the CPU.
        """
        self._check_continuous("`noise_level`")
        return self._sde.noise_level(self._resolve(t, name="t")[0])

    def time_at_noise_level(self, sigma: torch.Tensor) -> torch.Tensor:
        """The inverse of `noise_level`: the times (float64 CPU, shape of `sigma`) whose noise level is `sigma`."""
        self._check_continuous("`time_at_noise_level`")
        return self._sde.time_at_noise_level(torch.as_tensor(sigma, dtype=torch.float64).cpu())

    def sample_training_timesteps(
        self,
        batch_size: int,
        device: Union[str, torch.device, None] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
    ) -> torch.Tensor:
        """Training times: the network only ever needs noise levels up to t*.

        Continuous models: t = U(eps, T) * flow_start (docs/DESIGN.md, "Training"). Discrete models: an index i uniform on
        {0, ..., int(N * flow_start) - 1}, returned as the float32 time nearest above i T / (N - 1) whose i(t) is i, so
        that the DDPM label t (N - 1) of `model_conditioning="score_sde"` is the integer i (to 1e-4) that the
        published DDPM loss feeds the network.

        Args:
            batch_size (`int`): B.
            device (`str` or `torch.device`, *optional*): where to put the result.
            generator (`torch.Generator` or list of B of them, *optional*): the random source.

        Returns:
            `torch.Tensor` of shape `(B,)`, float32: continuous times.
        """
        u = _rand_uniform(batch_size, generator, "cpu")
        if self.config.continuous:
            t = (self.sampling_eps + (self.T - self.sampling_eps) * u) * self.config.flow_start
        else:
            index = torch.floor(u * self.num_flow_steps).clamp(max=self.num_flow_steps - 1).long()
            t = (index * self.T / (self.config.num_train_timesteps - 1)).float()
            # float32 rounding may land just below i T / (N - 1), whose index is i - 1: one float32 step up fixes it
            below = self._index_of(t.double()) < index
            t = torch.where(below, torch.nextafter(t, torch.full_like(t, 2.0 * self.T)), t)
        return t.to(device=device, dtype=torch.float32)

    def prior_sample(
        self,
        shape: Tuple[int, ...],
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """A sample of the SDE prior at T (the baseline's start): N(0, sigma_max^2 I) for VE, N(0, I) for VP / sub-VP.

        Args:
            shape (`tuple`): (B, C, H, W).
            generator (`torch.Generator` or list of B of them, *optional*): the random source.
            device (`str` or `torch.device`, *optional*): where to put the sample.
            dtype (`torch.dtype`, *optional*): its dtype (float32 by default).
            noise (`torch.Tensor` of shape `shape`, *optional*): standard normal noise to scale instead of drawing it.

        Returns:
            `torch.Tensor` of shape `shape`.
        """
        dtype = dtype or torch.float32
        if noise is None:
            noise = randn_tensor(tuple(shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
        return (noise * self.init_noise_sigma).to(device=device or noise.device, dtype=dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (the network takes x(t) unscaled); for interchangeability with other schedulers."""
        return sample

    # ------------------------------------------------------------------------------------------------------------------
    # predictor-corrector steps
    # ------------------------------------------------------------------------------------------------------------------

    def _prepare_step(self, method, model_output, timestep, sample):
        """The float32/64 state, resolved times, grid positions and score of a `method` ("corrector" or
        "predictor") step; `None` when that method is "none" (the step leaves the sample unchanged)."""
        if self.timesteps is None:
            raise ValueError("`timesteps` are not set: call `set_timesteps` before stepping.")
        t64, index, position = self._resolve(timestep, low=self.sampling_eps, name="timestep")
        batch = sample.shape[0]
        if t64.numel() not in (1, batch):
            raise ValueError(f"`timestep` must be a scalar or have shape ({batch},), got {tuple(t64.shape)}.")
        t64, index, position = (v.expand(batch) for v in (t64, index, position))
        x = self._upcast(sample)
        if model_output is not None and model_output.shape != sample.shape:
            raise ValueError(f"`model_output` has shape {tuple(model_output.shape)}, `sample` {tuple(sample.shape)}.")
        if self.config[method] == "none":
            return None
        if model_output is None:
            raise ValueError(f"`model_output` is required by the {method}.")
        return x, t64, index, position, self._score(model_output, t64, index, x)

    def _noise(self, x, generator):
        # drawn in float32 whatever the compute dtype, so that float32 and float64 runs share one random stream
        return randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)

    def _output(self, prev_sample, prev_sample_mean, dtype, return_dict):
        prev_sample, prev_sample_mean = prev_sample.to(dtype), prev_sample_mean.to(dtype)
        if not return_dict:
            return (prev_sample, prev_sample_mean)
        return DiNofSchedulerOutput(prev_sample=prev_sample, prev_sample_mean=prev_sample_mean)

    def step_correct(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        return_dict: bool = True,
    ) -> Union[DiNofSchedulerOutput, Tuple]:
        """One corrector step at time t (Langevin or annealed Langevin), from the network output at the current x.

        langevin: step = 2 a (snr * mean_b ||z_b|| / mean_b ||grad_b||)^2 (`langevin_norm="batch"`) or
        2 a (snr ||z_b|| / ||grad_b||)^2 per sample (`"sample"`); ald: step = 2 a (snr * std(t))^2; then
        x_mean = x + step * score, x = x_mean + sqrt(2 step) z; a = alpha_{i(t)} for VP / sub-VP, 1 for VE.
        With `corrector="none"` the sample is returned unchanged.

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`): the network output at (sample, model_timestep(t)).
            timestep (`float` or `torch.Tensor` of shape `()` or `(B,)`): t in [eps, T].
            sample (`torch.Tensor` of shape `(B, C, H, W)`): the current x(t).
            generator (`torch.Generator` or list of B of them, *optional*): the source of z.
            return_dict (`bool`, defaults to `True`): return a `DiNofSchedulerOutput` rather than a tuple.

        Returns:
            `DiNofSchedulerOutput` or `(prev_sample, prev_sample_mean)`, shaped and typed as `sample`.
        """
        prepared = self._prepare_step("corrector", model_output, timestep, sample)
        if prepared is None:
            return self._output(sample, sample, sample.dtype, return_dict)
        x, t64, index, _, score = prepared
        noise = self._noise(x, generator)
        alpha = self._to(self._sde.langevin_alpha(index), x, x.ndim)
        snr = self.config.snr
        if self.config.corrector == "langevin":
            grad_norm = score.flatten(1).norm(dim=-1)
            noise_norm = noise.flatten(1).norm(dim=-1)
            if self.config.langevin_norm == "batch":
                grad_norm, noise_norm = grad_norm.mean(), noise_norm.mean()
            ratio = (snr * noise_norm / grad_norm).reshape(-1, *([1] * (x.ndim - 1)))
            step_size = 2.0 * alpha * ratio**2
        else:  # ald
            std = self._to(self._mean_std64(t64, index)[1], x, x.ndim)
            step_size = 2.0 * alpha * (snr * std) ** 2
        prev_sample_mean = x + step_size * score
        prev_sample = prev_sample_mean + torch.sqrt(2.0 * step_size) * noise
        return self._output(prev_sample, prev_sample_mean, sample.dtype, return_dict)

    def step_pred(
        self,
        model_output: Optional[torch.Tensor],
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        return_dict: bool = True,
    ) -> Union[DiNofSchedulerOutput, Tuple]:
        """One predictor step from grid point t_k to t_{k+1} (to the data after the last grid point).

        With (a, var) the forward transition over the step's chain indices (j, i] (see `set_timesteps`):
        reverse_diffusion: x_mean = x - ((a - 1) x - var * score), noise std sqrt(var);
        euler_maruyama: dt = (i - j) / N, x_mean = x - (f(x, t) - g(t)^2 score) dt, noise std g(t) sqrt(dt);
        ancestral: x_mean = (x + var * score) / a, noise std sqrt(sigma_j^2 var / sigma_i^2) (VE) or sqrt(var) (VP).
        With `predictor="none"` the sample is returned unchanged (and `model_output` may be None).

        Args:
            model_output (`torch.Tensor` of shape `(B, C, H, W)`): the network output at (sample, model_timestep(t)).
            timestep (`float` or `torch.Tensor` of shape `()` or `(B,)`): t_k, a point of `timesteps`.
            sample (`torch.Tensor` of shape `(B, C, H, W)`): x(t_k).
            generator (`torch.Generator` or list of B of them, *optional*): the source of the noise.
            return_dict (`bool`, defaults to `True`): return a `DiNofSchedulerOutput` rather than a tuple.

        Returns:
            `DiNofSchedulerOutput` or `(prev_sample, prev_sample_mean)`: x(t_{k+1}) and its mean, shaped and typed as
            `sample`.
        """
        prepared = self._prepare_step("predictor", model_output, timestep, sample)
        if prepared is None:
            return self._output(sample, sample, sample.dtype, return_dict)
        x, t64, index, position, score = prepared
        if (position < 0).any():
            raise ValueError("`timestep` must be one of `scheduler.timesteps` (the predictor steps to the next one).")
        next_index = self._grid_next_indices[position]
        predictor = self.config.predictor
        if predictor == "reverse_diffusion":
            a, var = self._sde.step_transition(t64, index, next_index)
            a, var = self._to(a, x, x.ndim), self._to(var, x, x.ndim)
            prev_sample_mean = x - ((a - 1.0) * x - var * score)
            noise_std = torch.sqrt(var)
        elif predictor == "euler_maruyama":
            dt = self._to(self._sde.step_dt(index, next_index), x, x.ndim)
            drift = self._to(self._sde.drift_coeff(t64), x, x.ndim) * x
            g = self._to(self._sde.diffusion(t64), x, x.ndim)
            prev_sample_mean = x - (drift - g**2 * score) * dt
            noise_std = g * torch.sqrt(dt)
        else:  # ancestral
            a, var = self._sde.step_transition(t64, index, next_index)
            noise_std = self._to(self._sde.ancestral_std(index, next_index), x, x.ndim)
            prev_sample_mean = (x + self._to(var, x, x.ndim) * score) / self._to(a, x, x.ndim)
        prev_sample = prev_sample_mean + noise_std * self._noise(x, generator)
        return self._output(prev_sample, prev_sample_mean, sample.dtype, return_dict)

    # `step` is the predictor step, so that generic denoising loops work.
    step = step_pred

    def __len__(self) -> int:
        return self.config.num_train_timesteps
