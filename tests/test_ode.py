"""The probability-flow ODE: its drift, the solvers, ODE sampling, exact likelihoods, encode / decode.

Closed forms. With data x(0) ~ N(mu, Sigma) and the exact score, the marginal at t is N(m(t) mu, m(t)^2 Sigma +
std(t)^2 I) and the probability-flow ODE is affine: in Sigma's eigenbasis Q (variances s_i^2), with
v_i(t) = m(t)^2 s_i^2 + std(t)^2,

    x(t) - m(t) mu = Q diag(sqrt(v_i(t) / v_i(eps))) Q^T (x(eps) - m(eps) mu),

so for any prior p at the ODE's end t_end the exact log-density of x(eps) is
log p(x(t_end)) + 1/2 sum_i log(v_i(t_end) / v_i(eps)) (+ D ln(high - low) for the map from [0, 1]).
"""

import math

import numpy as np
import pytest
import torch
from analytic_models import AnalyticGaussianModel, spec_mean_std
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from scipy.integrate import solve_ivp

from dinof_diffusers import DiNofLikelihoodOutput, DiNofPipeline, DiNofScheduler, FlowPriorModel
from dinof_diffusers.data import digits_images
from dinof_diffusers.models.gaussian_prior import GaussianPriorModel, ImageMoments
from dinof_diffusers.pipelines.dinof.likelihood import dequantize_images
from dinof_diffusers.schedulers.ode_solvers import integrate_fixed_steps, integrate_rk45, ode_time_grid

GAUSSIAN = {"ve": (0.5, 0.1), "vp": (0.1, 0.2), "subvp": (0.1, 0.2)}  # (mu, s), far inside the data range
PREDICTION = {"ve": "score", "vp": "epsilon", "subvp": "epsilon"}
SIZE = 4  # 1 x 4 x 4 images: D = 16


class AnalyticRotatedGaussianModel(ModelMixin, ConfigMixin):
    """The exact score of N(mu, Q diag(s^2) Q^T) on 1 x 4 x 4 images, a VE "score" model (conditioned on sigma).

    Its Jacobian is not diagonal, so Rademacher probes have a non-zero variance (on a diagonal Jacobian they are
    exact).
    """

    @register_to_config
    def __init__(self, data_mean: float = 0.5, seed: int = 0, in_channels: int = 1, sample_size: int = SIZE):
        super().__init__()
        dim = in_channels * sample_size**2
        generator = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        self.register_buffer("basis", basis)
        self.register_buffer("variances", torch.linspace(0.05, 0.3, dim, dtype=torch.float64) ** 2)

    def forward(self, sample, timestep, return_dict=True):
        sigma = torch.as_tensor(timestep).double().reshape(-1, 1)  # the marginal std of a VE model
        centred = (sample.double() - self.config.data_mean).flatten(1) @ self.basis
        score = -(centred / (self.variances + sigma**2)) @ self.basis.T
        out = score.view_as(sample).to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def exact_log_prob(self, x_eps, prior_log_prob, t_end, scheduler):
        """The closed form of the module docstring, for VE (m = 1) images x(eps) already in the data range."""
        (std_eps, std_end) = spec_mean_std("ve", torch.tensor([scheduler.sampling_eps, t_end]))[1].tolist()
        v_eps, v_end = self.variances + std_eps**2, self.variances + std_end**2
        centred = (x_eps.double() - self.config.data_mean).flatten(1) @ self.basis
        x_end = (centred * (v_end / v_eps).sqrt()) @ self.basis.T + self.config.data_mean
        return prior_log_prob(x_end.view_as(x_eps)) + 0.5 * torch.log(v_end / v_eps).sum()


def random_flow(seed=0, sample_size=SIZE, num_levels=1):
    """A tiny FlowPriorModel with every parameter perturbed: a prior far from the Gaussian at t*."""
    torch.manual_seed(seed)
    flow = FlowPriorModel(
        sample_size=sample_size, in_channels=1, num_levels=num_levels, flow_depth=2, hidden_channels=8
    )
    with torch.no_grad():
        flow.log_prob(torch.rand(8, 1, sample_size, sample_size))  # ActNorm initialisation
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return flow.eval()


def analytic_pipeline(sde_type, flow=True, **scheduler_kwargs):
    mu, s = GAUSSIAN[sde_type]
    scheduler = DiNofScheduler(sde_type=sde_type, prediction_type=PREDICTION[sde_type], **scheduler_kwargs)
    model = AnalyticGaussianModel(
        sde_type=sde_type, prediction_type=PREDICTION[sde_type], data_mean=mu, data_std=s, sample_size=SIZE
    )
    pipe = DiNofPipeline(unet=model, scheduler=scheduler, flow_prior=random_flow() if flow else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def variance(sde_type, t):
    """(m(t), v(t)) of the isotropic closed form: v = m^2 s^2 + std^2."""
    m, std = spec_mean_std(sde_type, torch.tensor([t]))
    s = GAUSSIAN[sde_type][1]
    return m.item(), (m**2 * s**2 + std**2).item()


def gaussian_images(sde_type, batch, seed=0):
    """Samples of the data distribution N(mu, s^2) as [0, 1] images (the map from the data range undone)."""
    mu, s = GAUSSIAN[sde_type]
    low, high = (0.0, 1.0) if sde_type == "ve" else (-1.0, 1.0)
    x = mu + s * torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return ((x - low) / (high - low)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Scheduler: the SDE side of the ODE
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["ve", "vp", "subvp"])
def test_ode_drift_prior_and_noise_levels_match_spec(sde_type):
    scheduler = DiNofScheduler(sde_type=sde_type, prediction_type="epsilon")
    t = torch.tensor([1e-3, 0.3, 0.6, 1.0], dtype=torch.float64)
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    eps_hat = torch.randn_like(x)
    f, g = scheduler.drift_diffusion(x, t)
    std = spec_mean_std(sde_type, t)[1].view(-1, 1, 1, 1)
    expected = f - 0.5 * g.view(-1, 1, 1, 1) ** 2 * (-eps_hat / std)  # f - g^2 / 2 * score, score = -eps / std
    torch.testing.assert_close(scheduler.ode_drift(eps_hat, x, t), expected, rtol=1e-12, atol=1e-12)
    assert scheduler.ode_drift(eps_hat.half(), x.half(), t).dtype == torch.float16

    prior_std = 50.0 if sde_type == "ve" else 1.0
    expected = torch.distributions.Normal(0.0, torch.tensor(prior_std).double()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(scheduler.prior_log_prob(x), expected, rtol=1e-12, atol=1e-12)

    mean, std = spec_mean_std(sde_type, t)
    torch.testing.assert_close(scheduler.noise_level(t), std / mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(scheduler.time_at_noise_level(std / mean), t, rtol=1e-12, atol=1e-14)


def test_discrete_models_refuse_the_ode():
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon", continuous=False)
    for call in (
        lambda: scheduler.ode_drift(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.5),
        lambda: scheduler.noise_level(torch.tensor([0.5])),
        lambda: scheduler.time_at_noise_level(torch.tensor([0.5])),
    ):
        with pytest.raises(ValueError, match="continuous"):
            call()


# ----------------------------------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------------------------------


def nonlinear_drift(x, t):
    weights = torch.linspace(-1.0, 1.0, x.shape[-1] ** 2, dtype=x.dtype).view(x.shape[-1], x.shape[-1])
    return torch.tanh(x @ weights) * (1.0 + t) - 0.3 * x


@pytest.mark.parametrize("t0,t1,tol", [(1.0, 1e-3, 1e-5), (1e-5, 0.6, 1e-5), (0.0, 2.0, 1e-8)])
def test_rk45_is_scipys_dormand_prince(t0, t1, tol):
    """Same step control as `scipy.integrate.solve_ivp(method="RK45")`: the same NFE and solution (float64)."""
    x0 = torch.randn(3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def numpy_drift(t, y):
        return nonlinear_drift(torch.from_numpy(y).view(x0.shape), t).reshape(-1).numpy()

    reference = solve_ivp(numpy_drift, (t0, t1), x0.reshape(-1).numpy(), method="RK45", rtol=tol, atol=tol)
    x, nfe = integrate_rk45(nonlinear_drift, x0, t0, t1, rtol=tol, atol=tol)
    assert nfe == reference.nfev
    np.testing.assert_allclose(x.reshape(-1).numpy(), reference.y[:, -1], rtol=1e-12, atol=1e-12)


def test_fixed_step_solvers_nfe_and_order():
    """dx/dt = -x (1 + t) from t = 1 down to 0, x(0) = x(1) e^1.5: Heun's error falls 4x per halved step (2nd
    order), Euler's 2x; NFE 2n - 1 and n."""
    x1 = torch.ones(2, dtype=torch.float64)
    errors = {}
    for solver in ("heun", "euler"):
        for n in (20, 40):
            times = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
            x, nfe = integrate_fixed_steps(lambda x, t: -x * (1.0 + t), x1, times, solver)
            assert nfe == (2 * n - 1 if solver == "heun" else n)
            errors[solver, n] = abs(x[0].item() - math.exp(1.5))
    assert errors["heun", 20] / errors["heun", 40] == pytest.approx(4.0, rel=0.15)
    assert errors["euler", 20] / errors["euler", 40] == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("sde_type", ["ve", "vp"])
def test_karras_grid_is_edms_rho_spacing(sde_type):
    scheduler = DiNofScheduler(sde_type=sde_type)
    times = ode_time_grid(scheduler, 10, scheduler.t_star, "karras")
    assert times[0].item() == scheduler.t_star and times[-1].item() == scheduler.sampling_eps
    assert (times[1:] < times[:-1]).all()
    mean, std = spec_mean_std(sde_type, times)
    sigma_root = (std / mean) ** (1 / 7)  # EDM: sigma_k^(1/rho) is linear in k
    torch.testing.assert_close(sigma_root.diff(), sigma_root.diff()[:1].expand(10), rtol=1e-9, atol=0)
    uniform = ode_time_grid(scheduler, 10, scheduler.t_star)
    torch.testing.assert_close(uniform, torch.linspace(scheduler.t_star, scheduler.sampling_eps, 11).double())


# ----------------------------------------------------------------------------------------------------------------------
# Likelihood: closed forms
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["ve", "vp", "subvp"])
def test_exact_likelihood_matches_the_closed_form(sde_type):
    """Flow prior at t* and SDE prior at T: flow.log_prob(x(t*)) + D/2 log(v(t*) / v(eps)) + D ln(high - low)."""
    pipe = analytic_pipeline(sde_type)
    scheduler, flow = pipe.scheduler, pipe.flow_prior
    mu = GAUSSIAN[sde_type][0]
    images = gaussian_images(sde_type, 3)
    low, high = scheduler.data_range
    x_eps = low + (high - low) * images.double()
    dim = images[0].numel()
    m_eps, v_eps = variance(sde_type, scheduler.sampling_eps)
    for use_flow_prior, t_end in ((True, scheduler.t_star), (False, 1.0)):
        output = pipe.log_likelihood(
            images, num_bits=None, dequantize=False, use_flow_prior=use_flow_prior, trace_estimator="exact"
        )
        m_end, v_end = variance(sde_type, t_end)
        x_end = m_end * mu + (x_eps - m_eps * mu) * math.sqrt(v_end / v_eps)
        with torch.no_grad():
            prior = flow.log_prob(x_end.float()).double() if use_flow_prior else scheduler.prior_log_prob(x_end)
        delta = dim / 2 * math.log(v_end / v_eps)
        expected = prior + delta + dim * math.log(high - low)
        torch.testing.assert_close(output.log_prob, expected, rtol=1e-3, atol=0)
        torch.testing.assert_close(output.prior_log_prob, prior, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(
            output.delta_log_prob, torch.full((3,), delta, dtype=torch.float64), rtol=1e-3, atol=0
        )
        bits = -output.log_prob / (dim * math.log(2.0))
        torch.testing.assert_close(output.bits_per_dim, bits)
        assert output.nfe == pipe.unet.calls > 0
        pipe.unet.calls = 0


def test_hutchinson_estimates_are_unbiased():
    """64 probes of one image (one per batch row) average to the exact value within 4 standard errors."""
    model = AnalyticRotatedGaussianModel()
    scheduler = DiNofScheduler(sde_type="ve", prediction_type="score")
    pipe = DiNofPipeline(unet=model, scheduler=scheduler, flow_prior=random_flow())
    pipe.set_progress_bar_config(disable=True)
    image = (0.5 + 0.2 * torch.randn(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    exact = pipe.log_likelihood(image, num_bits=None, dequantize=False, trace_estimator="exact").log_prob
    with torch.no_grad():
        closed_form = model.exact_log_prob(image, lambda x: pipe.flow_prior.log_prob(x.float()), 0.6, scheduler)
    torch.testing.assert_close(exact, closed_form.double(), rtol=1e-3, atol=0)
    for estimator in ("rademacher", "gaussian"):
        estimates = pipe.log_likelihood(
            image.expand(64, -1, -1, -1),
            num_bits=None,
            dequantize=False,
            trace_estimator=estimator,
            generator=torch.Generator().manual_seed(1),
        ).log_prob
        standard_error = estimates.std() / 8.0
        assert standard_error > 1e-3 * exact.abs().item()  # the probes vary: the test can fail
        assert abs(estimates.mean() - exact.item()) < 4 * standard_error, (estimator, estimates.mean(), exact)


def test_dequantization_and_the_range_map_are_exact_constants():
    pipe = analytic_pipeline("vp")
    images = torch.randint(0, 256, (2, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0)) / 255.0
    quantized = pipe.log_likelihood(images, trace_estimator="exact", generator=torch.Generator().manual_seed(5))
    dequantized = dequantize_images(images, 8, torch.Generator().manual_seed(5))
    assert ((dequantized * 256).floor() == (images * 255).round()).all()  # one bin per value, inside [0, 1)
    continuous = pipe.log_likelihood(dequantized, num_bits=None, dequantize=False, trace_estimator="exact")
    torch.testing.assert_close(quantized.log_prob, continuous.log_prob, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        quantized.bits_per_dim - continuous.bits_per_dim, torch.full((2,), 8.0, dtype=torch.float64)
    )
    # log p on [0, 1]^D = log p in [-1, 1]^D + D ln 2
    range_term = continuous.log_prob - continuous.prior_log_prob - continuous.delta_log_prob
    torch.testing.assert_close(range_term, torch.full((2,), 16 * math.log(2.0), dtype=torch.float64))
    ve = analytic_pipeline("ve").log_likelihood(images, num_bits=None, dequantize=False, trace_estimator="exact")
    torch.testing.assert_close(ve.log_prob, ve.prior_log_prob + ve.delta_log_prob, rtol=0, atol=1e-12)
    assert isinstance(quantized, DiNofLikelihoodOutput) and DiNofLikelihoodOutput().nfe is None  # defaults


def test_likelihood_batches_and_seeds():
    pipe = analytic_pipeline("ve")
    images = gaussian_images("ve", 4)

    def run(**kwargs):
        return pipe.log_likelihood(images, generator=torch.Generator().manual_seed(0), **kwargs)

    whole, again = run(), run()
    torch.testing.assert_close(whole.log_prob, again.log_prob, rtol=0, atol=0)
    split = run(batch_size=3)
    assert split.nfe > whole.nfe  # two solves
    torch.testing.assert_close(split.log_prob, whole.log_prob, rtol=1e-4, atol=0)  # steps differ with the batch
    as_tuple = pipe.log_likelihood(images, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert len(as_tuple) == 5 and torch.equal(as_tuple[0], whole.log_prob)


def test_evaluate_likelihood_is_the_pipelines_per_batch_with_paired_standard_errors():
    from dinof_diffusers.evaluation import batch_seed, evaluate_likelihood
    from dinof_diffusers.evaluation.likelihood import likelihood_batches

    pipe = analytic_pipeline("ve")
    images = gaussian_images("ve", 5)
    result = evaluate_likelihood(pipe, images, batch_size=2, seed=3, rtol=1e-4, atol=1e-4, show_progress=False)
    values = {}
    for prior in ("flow", "sde"):  # batch b with the seed batch_seed(3, b), the same for both priors
        values[prior] = torch.cat([
            pipe.log_likelihood(
                images[part], use_flow_prior=prior == "flow", rtol=1e-4, atol=1e-4,
                generator=torch.Generator().manual_seed(batch_seed(3, index)),
            ).bits_per_dim
            for index, part in enumerate(likelihood_batches(5, 2))
        ])  # fmt: skip
        assert result.per_image[prior] == values[prior].tolist()
        estimate = result.priors[prior]
        assert estimate.num_images == 5 and estimate.bits_per_dim == pytest.approx(values[prior].mean().item())
        assert estimate.bits_per_dim_se == pytest.approx(values[prior].std().item() / math.sqrt(5))
        assert result.nfe[prior] > 0 and result.seconds_per_image[prior] > 0
    difference = values["flow"] - values["sde"]
    assert result.difference.bits_per_dim == pytest.approx(difference.mean().item())
    assert result.difference.bits_per_dim_se == pytest.approx(difference.std().item() / math.sqrt(5))
    assert "per_image" not in result.to_dict() and result.to_dict(per_image=True)["per_image"] == result.per_image

    # batches run by another runner (e.g. shared out across processes) in another order: the same result
    def reversed_runner(indices, run_batch, on_round):
        records = {index: run_batch(index) for index in reversed(indices)}
        on_round(records)
        return records

    again = evaluate_likelihood(
        pipe, images, batch_size=2, seed=3, rtol=1e-4, atol=1e-4, show_progress=False, run_batches=reversed_runner
    )
    assert again.per_image == result.per_image and again.difference == result.difference
    # resuming: the batches already recorded are not run again
    seen = {}
    first = {0: {prior: {"bits_per_dim": result.per_image[prior][:2], "nfe": 1, "seconds": 1.0} for prior in values}}
    resumed = evaluate_likelihood(
        pipe, images, batch_size=2, seed=3, rtol=1e-4, atol=1e-4, show_progress=False, records=first,
        on_round=seen.update,
    )  # fmt: skip
    assert sorted(seen) == [1, 2] and resumed.per_image == result.per_image

    only_sde = evaluate_likelihood(analytic_pipeline("ve", flow=False), images[:2], show_progress=False, rtol=1e-3)
    assert list(only_sde.priors) == ["sde"] and only_sde.difference is None
    with pytest.raises(ValueError, match="no flow prior"):
        evaluate_likelihood(analytic_pipeline("ve", flow=False), images, priors=["flow"])
    with pytest.raises(ValueError, match="priors"):
        evaluate_likelihood(pipe, images, priors=["gaussian"])


# ----------------------------------------------------------------------------------------------------------------------
# ODE sampling and encode / decode
# ----------------------------------------------------------------------------------------------------------------------

# max |x - closed form| / s measured: rk45 <= 1.3e-4, heun (50 karras steps) <= 7.7e-3, euler (400 uniform) <= 7.5e-2
SOLVER_CASES = [("rk45", None, "uniform", 1e-3), ("heun", 50, "karras", 2e-2), ("euler", 400, "uniform", 1.5e-1)]


@pytest.mark.parametrize("sde_type", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("solver,steps,spacing,tolerance", SOLVER_CASES)
def test_ode_sampler_maps_the_marginal_at_t_star_to_the_data(sde_type, solver, steps, spacing, tolerance):
    """Each sample lands where the affine closed form puts it; the samples have the data's mean and std at eps."""
    pipe = analytic_pipeline(sde_type, flow=False)
    scheduler = pipe.scheduler
    mu, s = GAUSSIAN[sde_type]
    m_star, v_star = variance(sde_type, scheduler.t_star)
    m_eps, v_eps = variance(sde_type, scheduler.sampling_eps)
    noise = torch.randn(256, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = m_star * mu + math.sqrt(v_star) * noise
    output = pipe(
        batch_size=256,
        prior_sample=start.float(),
        sampler="ode",
        ode_solver=solver,
        num_inference_steps=steps,
        timestep_spacing=spacing,
        output_type="pt",
    )
    assert output.nfe == pipe.unet.calls == {"rk45": output.nfe, "heun": 2 * 50 - 1, "euler": 400}[solver]
    low, high = scheduler.data_range
    x = low + (high - low) * output.images.double()
    expected = m_eps * mu + (start.float().double() - m_star * mu) * math.sqrt(v_eps / v_star)
    assert (x - expected).abs().max() < tolerance * s
    n = x.numel()
    assert abs(x.mean().item() - m_eps * mu) < 4.5 * s / n**0.5
    assert abs(x.std().item() / math.sqrt(v_eps) - 1) < 4.5 * (0.5 / n) ** 0.5 + tolerance


def test_ode_sampler_inputs_determinism_callbacks_and_outputs():
    pipe = analytic_pipeline("ve")
    kwargs = dict(batch_size=2, sampler="ode", num_inference_steps=5, output_type="pt")
    first = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    again = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    other = pipe(generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, other.images)
    assert first.nfe == 9 and pipe.num_timesteps == 5
    latents = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipe(latents=latents, **kwargs).images, first.images)  # latents = the generator's noise
    from_flow = pipe.flow_prior.sample(2, noise=latents, temperature=0.7)
    assert torch.equal(
        pipe(latents=latents, flow_temperature=0.7, **kwargs).images, pipe(prior_sample=from_flow, **kwargs).images
    )
    as_numpy = pipe(generator=torch.Generator().manual_seed(0), **{**kwargs, "output_type": "np"}).images
    np.testing.assert_array_equal(as_numpy, first.images.permute(0, 2, 3, 1).numpy())
    baseline = pipe(generator=torch.Generator().manual_seed(0), use_flow_prior=False, **kwargs)
    assert baseline.nfe == 9 and not torch.equal(baseline.images, first.images)

    seen = []

    def callback(pipeline, i, t, tensors):
        seen.append((i, t.item()))
        if i == 2:
            pipeline._interrupt = True
        return {"latents": tensors["latents"] + 1.0} if i == 0 else {}

    shifted = pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=callback, **kwargs)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] < pipe.scheduler.t_star  # stopped after step 2
    assert shifted.nfe == 6 and not torch.equal(shifted.images, first.images)

    rk45_calls = []
    pipe(
        generator=torch.Generator().manual_seed(0),
        **{**kwargs, "ode_solver": "rk45", "num_inference_steps": None},
        callback_on_step_end=lambda p, i, t, tensors: rk45_calls.append(i) or {},
    )
    assert rk45_calls == list(range(len(rk45_calls))) and len(rk45_calls) == pipe.num_timesteps > 1


def test_pc_sampler_is_the_default_and_ignores_the_ode_options():
    pipe = analytic_pipeline("ve")
    kwargs = dict(batch_size=2, num_inference_steps=5, output_type="pt")
    default = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    explicit = pipe(
        generator=torch.Generator().manual_seed(0), sampler="pc", ode_solver="euler", rtol=1e-3, atol=1e-3, **kwargs
    )
    assert torch.equal(default.images, explicit.images) and default.nfe == explicit.nfe == 10


@pytest.mark.parametrize("sde_type,use_flow_prior", [("ve", True), ("vp", True), ("subvp", False)])
def test_encode_and_decode_are_inverse(sde_type, use_flow_prior):
    pipe = analytic_pipeline(sde_type)
    images = gaussian_images(sde_type, 4)
    tolerances = dict(rtol=1e-7, atol=1e-7)
    latents = pipe.encode(images, use_flow_prior=use_flow_prior, **tolerances)
    assert latents.shape == images.shape and latents.dtype == torch.float32
    torch.testing.assert_close(
        pipe.decode(latents, use_flow_prior=use_flow_prior, **tolerances), images, rtol=0, atol=1e-5
    )
    noise = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    decoded = pipe.decode(noise, use_flow_prior=use_flow_prior, **tolerances)
    round_trip = pipe.encode(decoded, use_flow_prior=use_flow_prior, **tolerances)
    torch.testing.assert_close(round_trip, noise, rtol=0, atol=1e-4)


def test_the_exact_gaussian_prior_gives_the_data_density_and_its_latents():
    """With the exact marginal at t* as a GaussianPriorModel, log_likelihood is the data's own density at eps,
    log N(x; m(eps) mu, v(eps) I) (+ D ln 2), and encode gives its standardised noise (x - m(eps) mu) / sqrt(v(eps))."""
    sde_type = "vp"
    pipe = analytic_pipeline(sde_type, flow=False)
    mu, s = GAUSSIAN[sde_type]
    dim = SIZE * SIZE
    moments = ImageMoments(
        mean=torch.full((dim,), mu, dtype=torch.float64),
        variances=torch.full((dim,), s**2, dtype=torch.float64),
        num_images=1,
        image_shape=(1, SIZE, SIZE),
    )
    pipe.flow_prior = GaussianPriorModel.from_moments(moments, pipe.scheduler, covariance="diagonal")
    images = gaussian_images(sde_type, 3)
    x_eps = 2.0 * images.double() - 1.0
    m_eps, v_eps = variance(sde_type, pipe.scheduler.sampling_eps)
    expected = torch.distributions.Normal(m_eps * mu, math.sqrt(v_eps)).log_prob(x_eps).flatten(1).sum(1)
    output = pipe.log_likelihood(images, num_bits=None, dequantize=False, trace_estimator="exact")
    torch.testing.assert_close(output.log_prob, expected + dim * math.log(2.0), rtol=1e-4, atol=0)
    latents = pipe.encode(images, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(latents.double(), (x_eps - m_eps * mu) / math.sqrt(v_eps), rtol=0, atol=1e-4)
    torch.testing.assert_close(pipe.decode(latents, rtol=1e-7, atol=1e-7), images, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# A trained model on held-out digits
# ----------------------------------------------------------------------------------------------------------------------


def test_trained_flow_gives_lower_bits_per_dim_on_test_digits(trained_tiny_pipeline_dir):
    from trained_pipeline import untrained_tiny_pipeline

    pipe = DiNofPipeline.from_pretrained(trained_tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    images = torch.from_numpy(digits_images(split="test")[:16]).float().div(255).unsqueeze(1)
    kwargs = dict(generator=torch.Generator().manual_seed(0), rtol=1e-3, atol=1e-3)
    trained = pipe.log_likelihood(images, **kwargs)
    assert torch.isfinite(trained.bits_per_dim).all() and 0 < trained.bits_per_dim.mean() < 8
    pipe.flow_prior = untrained_tiny_pipeline().flow_prior
    untrained = pipe.log_likelihood(images, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    torch.testing.assert_close(untrained.delta_log_prob, trained.delta_log_prob)  # same ODE, same probes
    # paired over the same images: x(t*) is nearly Gaussian, so an ActNorm-initialised flow is a fair Gaussian
    # baseline and the gain is small (~0.07 bits/dim) but many standard errors from zero
    gain = untrained.bits_per_dim - trained.bits_per_dim
    assert gain.mean() > 3 * gain.std() / len(gain) ** 0.5 > 0


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any network evaluation
# ----------------------------------------------------------------------------------------------------------------------

GOOD = torch.full((1, 1, SIZE, SIZE), 0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(images=GOOD * 3), r"\[0, 1\]"),
        (dict(images=GOOD - 1), r"\[0, 1\]"),
        (dict(images=GOOD * float("nan")), "finite"),
        (dict(images=GOOD[0]), "shape"),
        (dict(images=torch.full((1, 3, SIZE, SIZE), 0.5)), "shape"),
        (dict(images=torch.full((1, 1, 8, 8), 0.5)), "shape"),
        (dict(images=np.full((1, 1, SIZE, SIZE), 0.5)), "float tensor"),
        (dict(trace_estimator="hutch"), "trace_estimator"),
        (dict(rtol=0.0), "rtol"),
        (dict(atol=-1e-5), "atol"),
        (dict(rtol=float("inf")), "rtol"),
        (dict(num_bits=0), "num_bits"),
        (dict(num_bits=None), "dequantize"),
        (dict(batch_size=0), "batch_size"),
        (dict(generator=[torch.Generator()]), "generator"),
    ],
)
def test_bad_likelihood_inputs_raise_before_any_work(kwargs, match):
    pipe = analytic_pipeline("ve")
    kwargs = {"images": GOOD, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.log_likelihood(**kwargs)
    assert pipe.unet.calls == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampler="sde"), "sampler"),
        (dict(sampler="ode", ode_solver="rk4"), "ode_solver"),
        (dict(sampler="ode", timestep_spacing="edm"), "timestep_spacing"),
        (dict(sampler="ode", rtol=0), "rtol"),
        (dict(sampler="ode", ode_solver="rk45", num_inference_steps=10), "rk45"),
        (dict(sampler="pc", timestep_spacing="karras"), "timestep_spacing"),
    ],
)
def test_bad_sampler_inputs_raise_before_any_work(kwargs, match):
    pipe = analytic_pipeline("ve")
    with pytest.raises(ValueError, match=match):
        pipe(output_type="pt", **kwargs)
    assert pipe.unet.calls == 0


def test_discrete_models_and_large_exact_traces_are_refused():
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon", continuous=False)
    model = AnalyticGaussianModel(sde_type="vp", prediction_type="epsilon", continuous=False, sample_size=SIZE)
    pipe = DiNofPipeline(unet=model, scheduler=scheduler, flow_prior=random_flow())
    for call in (
        lambda: pipe(sampler="ode"),
        lambda: pipe.log_likelihood(GOOD),
        lambda: pipe.encode(GOOD),
        lambda: pipe.decode(torch.zeros(1, 1, SIZE, SIZE)),
    ):
        with pytest.raises(ValueError, match="continuous"):
            call()
    assert model.calls == 0
    large = AnalyticGaussianModel(sample_size=16)
    pipe = DiNofPipeline(unet=large, scheduler=DiNofScheduler(), flow_prior=None)
    with pytest.raises(ValueError, match="D <= 64"):
        pipe.log_likelihood(torch.full((1, 1, 16, 16), 0.5), trace_estimator="exact", use_flow_prior=False)
    with pytest.raises(ValueError, match="flow_prior"):
        pipe.log_likelihood(torch.full((1, 1, 16, 16), 0.5))
    assert large.calls == 0
