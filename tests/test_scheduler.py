"""DiNofScheduler: the formulas of docs/DESIGN.md on fixed inputs, the time grid, the training API, validation."""

import math

import pytest
import torch
from analytic_models import spec_chain_mean_std, spec_mean_std

from dinof_diffusers.schedulers import DiNofScheduler, DiNofSchedulerOutput

N = 1000
SIGMA_MIN, SIGMA_MAX, BETA_MIN, BETA_MAX = 0.01, 50.0, 0.1, 20.0
SHAPE = (4, 3, 4, 4)


# ----------------------------------------------------------------------------------------------------------------------
# docs/DESIGN.md ("The SDEs", "Reverse steps"), transcribed directly (float64)
# ----------------------------------------------------------------------------------------------------------------------


def spec_sigmas():
    return torch.exp(torch.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), N, dtype=torch.float64))


def spec_betas():
    return torch.linspace(BETA_MIN / N, BETA_MAX / N, N, dtype=torch.float64)


def spec_beta_t(t):
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def spec_f_g(sde_type, x, t):
    """Continuous drift f(x, t) and diffusion g(t)."""
    if sde_type == "ve":
        sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
        return torch.zeros_like(x), sigma * math.sqrt(2 * math.log(SIGMA_MAX / SIGMA_MIN))
    f = -0.5 * spec_beta_t(t) * x
    if sde_type == "vp":
        return f, math.sqrt(spec_beta_t(t))
    discount = 1 - math.exp(-2 * BETA_MIN * t - (BETA_MAX - BETA_MIN) * t**2)
    return f, math.sqrt(spec_beta_t(t) * discount)


def spec_index(t):
    return math.floor(t * (N - 1))


def spec_score(sde_type, prediction_type, model_output, t):
    if prediction_type == "score":
        return model_output
    std = spec_mean_std(sde_type, torch.tensor([t], dtype=torch.float64))[1].item()
    return -model_output / std


def spec_predictor(sde_type, predictor, x, score, t, z):
    """One predictor step at t on the full N-grid (i = i(t), i - 1 the next index). Returns (x, x_mean)."""
    i = spec_index(t)
    if predictor == "reverse_diffusion":
        if sde_type == "ve":
            sig = spec_sigmas()
            adjacent = sig[i - 1] if i > 0 else 0.0
            f, G = torch.zeros_like(x), math.sqrt(sig[i] ** 2 - adjacent**2)
        elif sde_type == "vp":
            beta = spec_betas()[i].item()
            f, G = (math.sqrt(1 - beta) - 1) * x, math.sqrt(beta)
        else:
            f, g = spec_f_g(sde_type, x, t)
            f, G = f / N, g / math.sqrt(N)
        x_mean = x - (f - G**2 * score)
        return x_mean + G * z, x_mean
    if predictor == "euler_maruyama":
        dt = -1.0 / N
        f, g = spec_f_g(sde_type, x, t)
        x_mean = x + (f - g**2 * score) * dt
        return x_mean + g * math.sqrt(-dt) * z, x_mean
    if predictor == "ancestral":
        if sde_type == "ve":
            sig = spec_sigmas()
            s_i, s_prev = sig[i].item(), (sig[i - 1].item() if i > 0 else 0.0)
            x_mean = x + score * (s_i**2 - s_prev**2)
            std = math.sqrt(s_prev**2 * (s_i**2 - s_prev**2) / s_i**2)
        else:
            beta = spec_betas()[i].item()
            x_mean = (x + beta * score) / math.sqrt(1 - beta)
            std = math.sqrt(beta)
        return x_mean + std * z, x_mean
    raise AssertionError(predictor)


def spec_corrector(sde_type, corrector, x, score, t, z, snr, norm="batch"):
    a = 1.0 if sde_type == "ve" else (1 - spec_betas()[spec_index(t)]).item()
    if corrector == "langevin":
        grad_norm = score.reshape(score.shape[0], -1).norm(dim=-1)
        noise_norm = z.reshape(z.shape[0], -1).norm(dim=-1)
        if norm == "batch":
            step = 2 * a * (snr * noise_norm.mean() / grad_norm.mean()) ** 2
        else:
            step = (2 * a * (snr * noise_norm / grad_norm) ** 2).reshape(-1, 1, 1, 1)
    else:
        std = spec_mean_std(sde_type, torch.tensor([t], dtype=torch.float64))[1].item()
        step = 2 * a * (snr * std) ** 2
    x_mean = x + step * score
    return x_mean + torch.sqrt(2 * torch.as_tensor(step)) * z, x_mean


def fixed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    out = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x, out


def noise(seed, dtype=torch.float64):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def prediction_for(sde_type):
    return "score" if sde_type == "ve" else "epsilon"


CASES = [("ve", p) for p in ("reverse_diffusion", "euler_maruyama", "ancestral")]
CASES += [("vp", p) for p in ("reverse_diffusion", "euler_maruyama", "ancestral")]
CASES += [("subvp", p) for p in ("reverse_diffusion", "euler_maruyama")]


# ----------------------------------------------------------------------------------------------------------------------
# the update formulas
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type,predictor", CASES)
@pytest.mark.parametrize("k", [0, 17, 599])
def test_predictor_matches_spec(sde_type, predictor, k):
    prediction_type = prediction_for(sde_type)
    scheduler = DiNofScheduler(sde_type=sde_type, predictor=predictor, prediction_type=prediction_type)
    scheduler.set_timesteps()
    t = scheduler.timesteps[k]
    t_exact = scheduler.t_star - k * (scheduler.t_star - scheduler.sampling_eps) / 599
    assert spec_index(t_exact) == 599 - k
    x, out = fixed_inputs(k)
    result = scheduler.step_pred(out, t, x, generator=torch.Generator().manual_seed(3))
    assert isinstance(result, DiNofSchedulerOutput)
    score = spec_score(sde_type, prediction_type, out, t_exact)
    expected, expected_mean = spec_predictor(sde_type, predictor, x, score, t_exact, noise(3))
    torch.testing.assert_close(result.prev_sample_mean, expected_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.prev_sample, expected, rtol=1e-6, atol=1e-6)  # z is drawn in float32
    # `step` is the predictor
    again = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(3), return_dict=False)
    torch.testing.assert_close(again[0], result.prev_sample, rtol=0, atol=0)


@pytest.mark.parametrize("sde_type", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("corrector,norm", [("langevin", "batch"), ("langevin", "sample"), ("ald", "batch")])
@pytest.mark.parametrize("k", [0, 599])
def test_corrector_matches_spec(sde_type, corrector, norm, k):
    prediction_type = prediction_for(sde_type)
    scheduler = DiNofScheduler(
        sde_type=sde_type, corrector=corrector, prediction_type=prediction_type, snr=0.17, langevin_norm=norm
    )
    scheduler.set_timesteps()
    t = scheduler.timesteps[k]
    t_exact = scheduler.t_star - k * (scheduler.t_star - scheduler.sampling_eps) / 599
    x, out = fixed_inputs(100 + k)
    result = scheduler.step_correct(out, t, x, generator=torch.Generator().manual_seed(5))
    score = spec_score(sde_type, prediction_type, out, t_exact)
    expected, expected_mean = spec_corrector(sde_type, corrector, x, score, t_exact, noise(5), 0.17, norm)
    torch.testing.assert_close(result.prev_sample_mean, expected_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.prev_sample, expected, rtol=1e-6, atol=1e-6)


def test_batch_langevin_norm_couples_the_batch_and_sample_norm_does_not():
    x, out = fixed_inputs(1)
    for norm, coupled in (("batch", True), ("sample", False)):
        scheduler = DiNofScheduler(langevin_norm=norm)
        scheduler.set_timesteps()
        t = scheduler.timesteps[5]
        full = scheduler.step_correct(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample_mean
        changed_out = out.clone()
        changed_out[1:] *= 3.0
        other = scheduler.step_correct(changed_out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample_mean
        assert torch.equal(full[0], other[0]) != coupled


@pytest.mark.parametrize("sde_type,predictor", CASES)
def test_coarse_grid_uses_the_chain_over_each_step(sde_type, predictor):
    """With n < int(N * flow_start) a step from t_k to t_{k+1} covers the chain indices (j, i]."""
    prediction_type = prediction_for(sde_type)
    scheduler = DiNofScheduler(sde_type=sde_type, predictor=predictor, prediction_type=prediction_type)
    scheduler.set_timesteps(50)
    grid = torch.linspace(scheduler.t_star, scheduler.sampling_eps, 50, dtype=torch.float64)
    for k in (0, 20, 49):
        t = grid[k].item()
        i, j = spec_index(t), (spec_index(grid[k + 1].item()) if k < 49 else -1)
        assert i - j >= 10 or k == 49
        x, out = fixed_inputs(k)
        result = scheduler.step_pred(out, scheduler.timesteps[k], x, generator=torch.Generator().manual_seed(1))
        score = spec_score(sde_type, prediction_type, out, t)
        span = i - j
        if predictor == "euler_maruyama" or sde_type == "subvp":
            f, g = spec_f_g(sde_type, x, t)
            x_mean = x - (f - g**2 * score) * span / N
        elif sde_type == "ve":
            sig = spec_sigmas()
            var = sig[i] ** 2 - (sig[j] ** 2 if j >= 0 else 0.0)
            x_mean = x + var * score
        else:
            alphas_cumprod = torch.cumprod(1 - spec_betas(), 0)
            alpha = alphas_cumprod[i] / (alphas_cumprod[j] if j >= 0 else 1.0)
            if predictor == "reverse_diffusion":
                x_mean = x - ((alpha.sqrt() - 1) * x - (1 - alpha) * score)
            else:
                x_mean = (x + (1 - alpha) * score) / alpha.sqrt()
        torch.testing.assert_close(result.prev_sample_mean, x_mean, rtol=1e-9, atol=1e-9)


def test_half_precision_keeps_dtype_and_computes_in_float32():
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon")
    scheduler.set_timesteps()
    x, out = fixed_inputs(2)
    t = scheduler.timesteps[10]
    for step in (scheduler.step_correct, scheduler.step_pred):
        half = step(out.half(), t, x.half(), generator=torch.Generator().manual_seed(0))
        full = step(out.half().float(), t, x.half().float(), generator=torch.Generator().manual_seed(0))
        assert half.prev_sample.dtype == torch.float16 and half.prev_sample_mean.dtype == torch.float16
        torch.testing.assert_close(half.prev_sample.float(), full.prev_sample.half().float(), rtol=0, atol=0)


def test_list_of_generators_gives_per_sample_noise():
    scheduler = DiNofScheduler(langevin_norm="sample")
    scheduler.set_timesteps()
    x, out = fixed_inputs(4)
    t = scheduler.timesteps[3]
    generators = [torch.Generator().manual_seed(s) for s in range(SHAPE[0])]
    batched = scheduler.step_pred(out, t, x, generator=generators).prev_sample
    for b in range(SHAPE[0]):
        single = scheduler.step_pred(out[b : b + 1], t, x[b : b + 1], generator=torch.Generator().manual_seed(b))
        torch.testing.assert_close(batched[b : b + 1], single.prev_sample, rtol=0, atol=0)


def test_predictor_none_and_corrector_none_are_the_identity():
    scheduler = DiNofScheduler(predictor="none", corrector="none")
    scheduler.set_timesteps()
    x, _ = fixed_inputs(0)
    for step in (scheduler.step_correct, scheduler.step_pred):
        result = step(None, scheduler.timesteps[0], x)
        assert torch.equal(result.prev_sample, x) and torch.equal(result.prev_sample_mean, x)


# ----------------------------------------------------------------------------------------------------------------------
# the time grid
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["ve", "vp", "subvp"])
def test_default_grid_visits_every_index_once(sde_type):
    scheduler = DiNofScheduler(sde_type=sde_type)
    scheduler.set_timesteps()
    eps = scheduler.sampling_eps
    assert eps == (1e-5 if sde_type == "ve" else 1e-3)
    assert len(scheduler.timesteps) == 600 and scheduler.num_inference_steps == 600
    assert scheduler.timesteps[0].item() == pytest.approx(0.6) and scheduler.timesteps[-1].item() == pytest.approx(eps)
    exact = torch.linspace(0.6, eps, 600, dtype=torch.float64)
    assert [spec_index(t) for t in exact.tolist()] == list(range(599, -1, -1))
    assert scheduler._grid_indices.tolist() == list(range(599, -1, -1))
    # model conditioning of discrete models follows the same indices, from the float32 grid
    if sde_type != "subvp":
        discrete = DiNofScheduler(sde_type=sde_type, continuous=False, prediction_type="epsilon")
        discrete.set_timesteps(use_flow_prior=False)
        labels = torch.cat([discrete.model_timestep(t) for t in discrete.timesteps])
        assert labels.tolist() == list(range(999, -1, -1))

    scheduler.set_timesteps(use_flow_prior=False)
    assert len(scheduler.timesteps) == 1000 and scheduler.timesteps[0].item() == 1.0
    assert scheduler._grid_indices.tolist() == list(range(999, -1, -1))

    scheduler.set_timesteps(7)
    assert len(scheduler.timesteps) == 7 and scheduler.timesteps[0].item() == pytest.approx(0.6)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [pytest.approx(0.6)]


def test_set_timesteps_device_and_dtype():
    scheduler = DiNofScheduler()
    scheduler.set_timesteps(10, device="cpu")
    assert scheduler.timesteps.dtype == torch.float32 and scheduler.timesteps.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------------------------
# training / likelihood API
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type", ["ve", "vp", "subvp"])
def test_marginals_drift_diffusion_match_spec(sde_type):
    scheduler = DiNofScheduler(sde_type=sde_type)
    t = torch.tensor([0.0, 1e-3, 0.3, 0.6, 1.0], dtype=torch.float64)
    mean, std = scheduler.marginal_mean_std(t)
    spec_mean, spec_std = spec_mean_std(sde_type, t)
    torch.testing.assert_close(mean, spec_mean)
    torch.testing.assert_close(std, spec_std)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    n = torch.randn_like(x)
    expected = spec_mean.view(-1, 1, 1, 1) * x + spec_std.view(-1, 1, 1, 1) * n
    torch.testing.assert_close(scheduler.add_noise(x, n, t), expected)
    f, g = scheduler.drift_diffusion(x, t)
    for b, tb in enumerate(t.tolist()):
        spec_f, spec_g = spec_f_g(sde_type, x[b], tb)
        torch.testing.assert_close(f[b], spec_f)
        assert g[b].item() == pytest.approx(spec_g, rel=1e-12)
    assert scheduler.data_range == ((0.0, 1.0) if sde_type == "ve" else (-1.0, 1.0))
    assert scheduler.add_noise(x.float(), n.float(), t.float()).dtype == torch.float32


@pytest.mark.parametrize("sde_type", ["ve", "vp"])
def test_discrete_marginals_are_the_chains(sde_type):
    scheduler = DiNofScheduler(sde_type=sde_type, continuous=False)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    mean, std = scheduler.marginal_mean_std(t)
    spec_mean, spec_std = spec_chain_mean_std(sde_type, [0, 249, 599, 999])
    torch.testing.assert_close(mean, spec_mean.float())
    torch.testing.assert_close(std, spec_std.float())


def test_model_timestep_conventions():
    t = torch.tensor([0.25, 0.6])
    ve = DiNofScheduler(sde_type="ve", prediction_type="score")
    torch.testing.assert_close(ve.model_timestep(t), spec_mean_std("ve", t.double())[1].float())
    ve_discrete = DiNofScheduler(sde_type="ve", prediction_type="score", continuous=False)
    torch.testing.assert_close(ve_discrete.model_timestep(t), spec_sigmas()[[249, 599]].float())
    vp = DiNofScheduler(sde_type="vp", prediction_type="epsilon")
    torch.testing.assert_close(vp.model_timestep(t), 999 * t)
    vp_discrete = DiNofScheduler(sde_type="vp", prediction_type="epsilon", continuous=False)
    assert vp_discrete.model_timestep(t).tolist() == [249, 599]
    assert vp_discrete.model_timestep(t).dtype == torch.long
    # a scalar time gives shape (1,)
    assert ve.model_timestep(0.5).shape == (1,)


def test_model_timestep_feeds_a_fourier_unet_as_ncsnpp():
    """UNet2DModel(time_embedding_type="fourier") embeds log(timestep) and divides its output by it."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        time_embedding_type="fourier",
    ).eval()
    scheduler = DiNofScheduler(sde_type="ve", prediction_type="score")
    t = torch.tensor([0.3, 0.3])
    sigma = scheduler.model_timestep(t)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = unet(x, sigma).sample
        raw = unet(x, torch.ones(2)).sample  # same network, conditioned on log 1 = 0, divided by 1
    assert torch.isfinite(out).all()
    assert not torch.allclose(out * sigma.view(-1, 1, 1, 1), raw)  # the conditioning does depend on sigma


@pytest.mark.parametrize("sde_type,prediction_type", [("ve", "score"), ("vp", "epsilon"), ("ve", "epsilon")])
def test_output_to_score(sde_type, prediction_type):
    scheduler = DiNofScheduler(sde_type=sde_type, prediction_type=prediction_type)
    x, out = fixed_inputs(9)
    t = torch.full((SHAPE[0],), 0.4, dtype=torch.float64)
    expected = spec_score(sde_type, prediction_type, out, 0.4)
    torch.testing.assert_close(scheduler.output_to_score(out, x, t), expected)


def test_sample_training_timesteps():
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon")
    t = scheduler.sample_training_timesteps(4096, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert t.min() >= 1e-3 * 0.6 - 1e-7 and t.max() <= 0.6 + 1e-7 and t.max() > 0.55 and t.min() < 0.05
    again = scheduler.sample_training_timesteps(4096, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    per_sample = scheduler.sample_training_timesteps(
        3, "cpu", generator=[torch.Generator().manual_seed(s) for s in range(3)]
    )
    assert per_sample.shape == (3,)

    discrete = DiNofScheduler(sde_type="vp", prediction_type="epsilon", continuous=False)
    t = discrete.sample_training_timesteps(8192, "cpu", generator=torch.Generator().manual_seed(1))
    index = discrete.model_timestep(t)
    assert index.min().item() == 0 and index.max().item() == 599
    mean, std = discrete.marginal_mean_std(t)
    torch.testing.assert_close(std, spec_chain_mean_std("vp", index)[1].float())


@pytest.mark.parametrize("sde_type,expected_std", [("ve", 50.0), ("vp", 1.0), ("subvp", 1.0)])
def test_prior_sample(sde_type, expected_std):
    scheduler = DiNofScheduler(sde_type=sde_type)
    x = scheduler.prior_sample((64, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32
    assert x.std().item() == pytest.approx(expected_std, rel=0.03)
    assert scheduler.init_noise_sigma == expected_std


def test_config_round_trip(tmp_path):
    scheduler = DiNofScheduler(sde_type="subvp", prediction_type="epsilon", snr=0.17, langevin_norm="sample")
    scheduler.save_pretrained(tmp_path)
    loaded = DiNofScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert loaded.sampling_eps == 1e-3 and len(loaded) == 1000


# ----------------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"sde_type": "vpsde"}, "sde_type"),
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"predictor": "heun"}, "predictor"),
        ({"corrector": "hmc"}, "corrector"),
        ({"langevin_norm": "global"}, "langevin_norm"),
        ({"snr": 0.0}, "snr"),
        ({"snr": -0.1}, "snr"),
        ({"flow_start": 0.0}, "flow_start"),
        ({"flow_start": 1.2}, "flow_start"),
        ({"correct_steps": -1}, "correct_steps"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"sampling_eps": 0.7}, "sampling_eps"),
        ({"sde_type": "subvp", "predictor": "ancestral"}, "ancestral"),
        ({"sde_type": "subvp", "continuous": False}, "continuous"),
        ({"sigma_min": 60.0}, "sigma_min"),
        # non-finite values, also for the SDE not in use (they are saved with the config)
        ({"sigma_max": float("inf")}, "sigma_max"),
        ({"sigma_min": float("nan")}, "sigma_min"),
        ({"sde_type": "vp", "beta_max": float("inf")}, "beta_max"),
        ({"sde_type": "subvp", "beta_min": float("nan")}, "beta_min"),
        ({"beta_max": float("inf")}, "beta_max"),
        ({"sampling_eps": float("nan")}, "sampling_eps"),
    ],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiNofScheduler(**kwargs)


def test_bad_calls_raise():
    scheduler = DiNofScheduler()
    x, out = fixed_inputs(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step_pred(out, 0.5, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step_correct(out, 0.5, x)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(700)  # more points than indices below t*
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step_pred(out, 1.5, x)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step_correct(out, 1e-7, x)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step_pred(out, 0.3, x)  # not a grid point: the next time is unknown
    with pytest.raises(ValueError, match="t"):
        scheduler.add_noise(x, out, torch.tensor([1.5] * 4))


def test_per_sample_timesteps_equal_separate_calls():
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon", langevin_norm="sample")
    scheduler.set_timesteps(30)
    x, out = fixed_inputs(6)
    t = scheduler.timesteps[[0, 7, 19, 29]]
    for step in (scheduler.step_correct, scheduler.step_pred):
        generators = [torch.Generator().manual_seed(s) for s in range(4)]
        batched = step(out, t, x, generator=generators).prev_sample
        for b in range(4):
            single = step(out[b : b + 1], t[b], x[b : b + 1], generator=torch.Generator().manual_seed(b))
            torch.testing.assert_close(batched[b : b + 1], single.prev_sample, rtol=1e-12, atol=1e-12)
