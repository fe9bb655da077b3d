"""Test helpers: score networks with closed forms, written from docs/DESIGN.md ("The SDEs") independently of the
scheduler.

With data x(0) ~ N(mu, s^2 I), the marginal at any t is N(m mu, (m^2 s^2 + std^2) I), where (m, std) is the SDE's
(continuous models) or its discrete chain's (discrete models) mean coefficient and standard deviation; its score is
-(x - m mu) / (m^2 s^2 + std^2), exactly.
"""

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput


def spec_mean_std(sde_type, t, *, sigma_min=0.01, sigma_max=50.0, beta_min=0.1, beta_max=20.0):
    """The continuous marginal (mean coefficient, std) at float64 times t (B,)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if sde_type == "ve":
        return torch.ones_like(t), sigma_min * (sigma_max / sigma_min) ** t
    log_mean_coeff = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    mean = torch.exp(log_mean_coeff)
    var_or_std = 1.0 - torch.exp(2.0 * log_mean_coeff)
    return mean, (torch.sqrt(var_or_std) if sde_type == "vp" else var_or_std)


def spec_chain_mean_std(sde_type, index, *, N=1000, sigma_min=0.01, sigma_max=50.0, beta_min=0.1, beta_max=20.0):
    """The discrete chains: SMLD (1, sigma_i) and DDPM (sqrt(alphabar_i), sqrt(1 - alphabar_i)) at indices (B,)."""
    index = torch.as_tensor(index).long()
    if sde_type == "ve":
        sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), N, dtype=torch.float64))
        return torch.ones(index.shape, dtype=torch.float64), sigmas[index]
    betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[index]
    return torch.sqrt(alphas_cumprod), torch.sqrt(1.0 - alphas_cumprod)


class AnalyticGaussianModel(ModelMixin, ConfigMixin):
    """A "UNet2DModel" whose output is the exact score (or noise) of Gaussian data N(data_mean, data_std^2 I).

    It inverts the scheduler's conditioning: sigma for VE "score" models, 999 t for continuous models, the index i
    for discrete ones.
    """

    @register_to_config
    def __init__(
        self,
        sde_type: str = "ve",
        prediction_type: str = "score",
        continuous: bool = True,
        data_mean: float = 0.5,
        data_std: float = 0.1,
        in_channels: int = 1,
        sample_size: int = 8,
        num_train_timesteps: int = 1000,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
    ):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))  # gives the model a device and a dtype
        self.calls = 0

    def _params(self):
        c = self.config
        return dict(sigma_min=c.sigma_min, sigma_max=c.sigma_max, beta_min=c.beta_min, beta_max=c.beta_max)

    def mean_std(self, timestep):
        """(mean coefficient, std) float64 (B,) of the marginal the network is conditioned on."""
        c = self.config
        timestep = torch.as_tensor(timestep).reshape(-1).double().cpu()
        if c.sde_type == "ve" and c.prediction_type == "score":
            return torch.ones_like(timestep), timestep
        if c.continuous:
            return spec_mean_std(c.sde_type, timestep / 999.0, **self._params())
        return spec_chain_mean_std(c.sde_type, timestep, N=c.num_train_timesteps, **self._params())

    def marginal(self, timestep):
        """Mean and std (float64 (B,)) of x(t) ~ N(m mu, m^2 s^2 + std^2)."""
        m, std = self.mean_std(timestep)
        return m * self.config.data_mean, torch.sqrt(m**2 * self.config.data_std**2 + std**2)

    def forward(self, sample, timestep, return_dict=True):
        self.calls += 1
        batch = sample.shape[0]
        mean, total_std = (v.expand(batch) if v.numel() == 1 else v for v in self.marginal(timestep))
        shape = (batch,) + (1,) * (sample.ndim - 1)
        mean = mean.to(sample.device, torch.float32).reshape(shape)
        total_var = (total_std**2).to(sample.device, torch.float32).reshape(shape)
        score = -(sample.float() - mean) / total_var
        if self.config.prediction_type == "epsilon":
            std = self.mean_std(timestep)[1]
            std = std.expand(batch) if std.numel() == 1 else std
            score = -std.to(sample.device, torch.float32).reshape(shape) * score
        out = score.to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class StandardNormalScoreModel(ModelMixin, ConfigMixin):
    """A trivially cheap network: the score of N(0, I), -x, whatever the timestep. Counts its calls."""

    @register_to_config
    def __init__(self, in_channels: int = 1, sample_size: int = 4):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))
        self.calls = 0

    def forward(self, sample, timestep, return_dict=True):
        self.calls += 1
        return UNet2DOutput(sample=-sample) if return_dict else (-sample,)
