"""GaussianPriorModel: exact densities against torch's MultivariateNormal, sampling, save/load, use in the pipeline,
and the pipeline's refusal of a prior fitted for another t* or SDE."""

import json

import pytest
import torch
from analytic_models import StandardNormalScoreModel

from dinof_diffusers import DiNofPipeline, DiNofScheduler, GaussianPriorModel
from dinof_diffusers.models.gaussian_prior import estimate_image_moments

SHAPE = (1, 4, 4)  # D = 16


def correlated_images(n=400, seed=0, rank=None, shape=SHAPE):
    """Images in [0, 1] with a non-trivial covariance (exactly `rank` if given)."""
    generator = torch.Generator().manual_seed(seed)
    dim = shape[0] * shape[1] * shape[2]
    mixing = torch.randn(dim, rank or dim, generator=generator, dtype=torch.float64) * 0.08
    mean = 0.3 + 0.4 * torch.rand(dim, generator=generator, dtype=torch.float64)
    latent = torch.randn(n, rank or dim, generator=generator, dtype=torch.float64)
    images = mean + latent @ mixing.T
    # into [0, 1]: clamped, or (keeping the covariance's rank) rescaled as a whole
    images = images.clamp(0.0, 1.0) if rank is None else (images - images.min()) / (images.max() - images.min())
    return images.reshape(n, *shape)


def reference_gaussian(images, scheduler, diagonal=False):
    """N(a mu, a^2 Sigma + s^2 I) from torch's own mean and maximum-likelihood covariance."""
    flat = images.reshape(images.shape[0], -1).double()
    a, s = (float(v[0]) for v in scheduler.marginal_mean_std(torch.tensor([scheduler.t_star], dtype=torch.float64)))
    cov = torch.cov(flat.T, correction=0)
    if diagonal:
        cov = torch.diag(torch.diagonal(cov))
    return torch.distributions.MultivariateNormal(
        a * flat.mean(0), a * a * cov + s * s * torch.eye(flat.shape[1], dtype=torch.float64)
    )


def noisy(images, scheduler, seed=1):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return scheduler.add_noise(images, noise, torch.full((images.shape[0],), scheduler.t_star, dtype=torch.float64))


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
@pytest.mark.parametrize("sde_type", ["ve", "vp"])
def test_log_prob_is_the_moment_matched_gaussian(covariance, sde_type):
    scheduler = DiNofScheduler(sde_type=sde_type, sigma_max=10.0, flow_start=0.3)
    low, high = scheduler.data_range
    images = low + (high - low) * correlated_images()
    prior = GaussianPriorModel.fit(images, scheduler, covariance=covariance, batch_size=64, dtype=torch.float64)
    assert not prior.is_low_rank and prior.config.flow_start == 0.3 and prior.config.num_images == 400
    assert tuple(prior.config.data_range) == (low, high)
    reference = reference_gaussian(images, scheduler, diagonal=covariance == "diagonal")
    x = noisy(images[:32], scheduler)
    torch.testing.assert_close(prior.log_prob(x), reference.log_prob(x.reshape(32, -1)), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(prior.covariance_matrix(), reference.covariance_matrix, rtol=1e-10, atol=1e-12)
    # forward's latents whiten x: standard normal coordinates that decode maps back to x
    latents = prior(x).latents
    torch.testing.assert_close(prior.decode(latents), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(prior.encode(x), latents)
    # bits per dimension, as FlowPriorModel's (8-bit data: + 8 - log2(high - low))
    bpd = -reference.log_prob(x.reshape(32, -1)) / (16 * torch.log(torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(prior.bits_per_dim(x), bpd)
    torch.testing.assert_close(prior.bits_per_dim(x, num_bits=8), bpd + 8 - (1.0 if sde_type == "vp" else 0.0))


def test_low_rank_branch():
    scheduler = DiNofScheduler(sde_type="ve", sigma_max=10.0, flow_start=0.4)
    # data of covariance rank 3: rank 3 + isotropic is then the exact covariance of x(t*)
    images = correlated_images(rank=3)
    low_rank = GaussianPriorModel.fit(images, scheduler, max_full_dim=8, rank=3, dtype=torch.float64)
    assert low_rank.is_low_rank and low_rank.eigenvectors.shape == (16, 3)
    x = noisy(images[:32], scheduler)
    reference = reference_gaussian(images, scheduler)
    torch.testing.assert_close(low_rank.log_prob(x), reference.log_prob(x.reshape(32, -1)), rtol=1e-9, atol=1e-8)

    # a full spectrum: the top eigenpairs of the full fit, the mean of the others for the complement
    images = correlated_images()
    full = GaussianPriorModel.fit(images, scheduler, dtype=torch.float64)
    low_rank = GaussianPriorModel.fit(images, scheduler, max_full_dim=8, rank=4, dtype=torch.float64)
    torch.testing.assert_close(low_rank.eigenvalues, full.eigenvalues[:4], rtol=1e-6, atol=0)
    torch.testing.assert_close(low_rank.residual_variance, full.eigenvalues[4:].mean(), rtol=1e-6, atol=0)
    projector = low_rank.eigenvectors @ low_rank.eigenvectors.T
    torch.testing.assert_close(projector, full.eigenvectors[:, :4] @ full.eigenvectors[:, :4].T, rtol=0, atol=1e-5)
    mvn = torch.distributions.MultivariateNormal(low_rank.mean, low_rank.covariance_matrix())
    x = noisy(images[:32], scheduler)
    torch.testing.assert_close(low_rank.log_prob(x), mvn.log_prob(x.reshape(32, -1)), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(low_rank.decode(low_rank.encode(x)), x, rtol=0, atol=1e-12)
    # streamed from a DataLoader (re-iterable, tuples of tensors): the same fit
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=50)
    streamed = GaussianPriorModel.fit(loader, scheduler, max_full_dim=8, rank=4, dtype=torch.float64)
    torch.testing.assert_close(streamed.log_prob(x), low_rank.log_prob(x), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="one-shot iterator"):
        GaussianPriorModel.fit(iter(loader), scheduler, max_full_dim=8, rank=4, show_progress=False)


def test_sampling_moments_temperature_and_noise():
    scheduler = DiNofScheduler(sde_type="ve", sigma_max=10.0, flow_start=0.3)
    for covariance in ("full", "diagonal"):
        prior = GaussianPriorModel.fit(correlated_images(), scheduler, covariance=covariance, dtype=torch.float64)
        n = 20000
        x = prior.sample(n, generator=torch.Generator().manual_seed(0)).reshape(n, -1)
        cov = prior.covariance_matrix()
        std = torch.sqrt(torch.diagonal(cov))
        assert ((x.mean(0) - prior.mean).abs() / std).max() < 4.5 / n**0.5
        # per-entry standard error of a sample covariance: sqrt((C_ii C_jj + C_ij^2) / n)
        se = torch.sqrt((torch.outer(std**2, std**2) + cov**2) / n)
        assert ((torch.cov(x.T) - cov).abs() / se).max() < 5.0
        # `noise` maps deterministically; temperature scales the deviation from the mean
        noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        a, b = prior.sample(3, noise=noise), prior.sample(3, noise=noise.clone(), temperature=0.5)
        torch.testing.assert_close(b - prior.mean.reshape(SHAPE), 0.5 * (a - prior.mean.reshape(SHAPE)))
        # without `noise`, it is drawn with randn_tensor from the generator
        drawn = prior.sample(3, generator=torch.Generator().manual_seed(2))
        given = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        assert torch.equal(drawn, prior.sample(3, noise=given))


def test_save_load_round_trip(tmp_path):
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon", flow_start=0.4)
    images = 2 * correlated_images() - 1
    x = noisy(images[:8], scheduler).float()
    for name, kwargs in {
        "full": {},
        "diagonal": {"covariance": "diagonal"},
        "low": {"max_full_dim": 8, "rank": 4},
    }.items():
        prior = GaussianPriorModel.fit(images, scheduler, show_progress=False, **kwargs)
        prior.save_pretrained(tmp_path / name)
        loaded = GaussianPriorModel.from_pretrained(tmp_path / name)
        saved = json.loads(loaded.to_json_string())
        saved.pop("_name_or_path")
        assert saved == json.loads(prior.to_json_string())
        assert loaded.dtype == torch.float32 and loaded.is_low_rank == (name == "low")
        for key, value in prior.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        assert torch.equal(loaded.log_prob(x), prior.log_prob(x))


def test_bad_arguments_raise():
    scheduler = DiNofScheduler(sde_type="ve", sigma_max=10.0)
    with pytest.raises(ValueError, match="`covariance` must be one of"):
        GaussianPriorModel(covariance="low")
    with pytest.raises(ValueError, match="`flow_start`"):
        GaussianPriorModel(flow_start=0.0)
    with pytest.raises(ValueError, match="data range"):
        GaussianPriorModel.fit(2 * correlated_images() - 1, scheduler, show_progress=False)
    prior = GaussianPriorModel(sample_size=4, in_channels=1)
    with pytest.raises(ValueError, match=r"`sample` must be a tensor of shape \(batch, 1, 4, 4\)"):
        prior.log_prob(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="`noise` has batch size"):
        prior.sample(2, noise=torch.zeros(3, *SHAPE))
    with pytest.raises(ValueError, match="`temperature`"):
        prior.sample(2, temperature=0.0)


# ----------------------------------------------------------------------------------------------------------------------
# In the pipeline
# ----------------------------------------------------------------------------------------------------------------------


def gaussian_pipeline(flow_start=0.6, prior_flow_start=None, **scheduler_kwargs):
    scheduler = DiNofScheduler(sigma_max=10.0, num_train_timesteps=50, flow_start=flow_start, **scheduler_kwargs)
    fit_scheduler = DiNofScheduler.from_config(scheduler.config, flow_start=prior_flow_start or flow_start)
    prior = GaussianPriorModel.fit(correlated_images(shape=(1, 8, 8)), fit_scheduler, show_progress=False)
    return scheduler, prior


def test_pipeline_samples_from_the_gaussian_prior(tmp_path, caplog):
    scheduler, prior = gaussian_pipeline(langevin_norm="sample")
    pipe = DiNofPipeline(unet=StandardNormalScoreModel(sample_size=8), scheduler=scheduler, flow_prior=prior)
    pipe.set_progress_bar_config(disable=True)

    def run(seed=0, **kwargs):
        return pipe(num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(seed), **kwargs)

    a, b, c = run(batch_size=2), run(batch_size=2), run(seed=1, batch_size=2)
    assert a.nfe == 8 and a.images.shape == (2, 1, 8, 8)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    # `latents` is the prior's input noise, exactly as for the flow, and handing over its sample is the same
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_star = prior.sample(2, noise=noise)
    from_latents = run(batch_size=2, latents=noise).images
    torch.testing.assert_close(run(batch_size=2, prior_sample=x_star).images, from_latents, rtol=1e-6, atol=1e-6)
    seed = torch.Generator().manual_seed(0)
    torch.randn(2, 1, 8, 8, generator=seed)  # what the default path draws first
    d = pipe(batch_size=2, prior_sample=x_star, generator=seed, num_inference_steps=4, output_type="pt")
    torch.testing.assert_close(d.images, a.images, rtol=1e-6, atol=1e-6)
    # save / load of the whole pipeline
    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "model_index.json") as file:
        assert json.load(file)["flow_prior"] == ["dinof_diffusers.models.gaussian_prior", "GaussianPriorModel"]
    loaded = DiNofPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.flow_prior, GaussianPriorModel)
    f = loaded(num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0), batch_size=2)
    torch.testing.assert_close(f.images, a.images, rtol=1e-6, atol=1e-6)
    assert "Expected types for flow_prior" not in caplog.text  # the widened type hint


def test_pipeline_refuses_a_prior_of_another_time_or_sde(tmp_path):
    unet = StandardNormalScoreModel(sample_size=8)
    scheduler, prior = gaussian_pipeline(flow_start=0.6, prior_flow_start=0.4)
    with pytest.raises(ValueError, match=r"`flow_start`=0.4, but the scheduler's `flow_start` is 0.6"):
        DiNofPipeline(unet=unet, scheduler=scheduler, flow_prior=prior)
    pipe = DiNofPipeline(unet=unet, scheduler=scheduler)
    with pytest.raises(ValueError, match="`flow_start`=0.4"):
        pipe.flow_prior = prior
    assert pipe.flow_prior is None
    pipe.flow_prior = GaussianPriorModel.fit(correlated_images(shape=(1, 8, 8)), scheduler, show_progress=False)
    # assigned to a pipeline built without a prior, it is still saved (diffusers alone would record None)
    pipe.save_pretrained(tmp_path)
    assert isinstance(DiNofPipeline.from_pretrained(tmp_path).flow_prior, GaussianPriorModel)
    with pytest.raises(ValueError, match="`flow_start`"):  # a scheduler of another t* is refused too
        pipe.scheduler = DiNofScheduler.from_config(scheduler.config, flow_start=0.4)
    # changed behind the pipeline's back: refused at call time, unless the prior is not used
    pipe.scheduler.register_to_config(flow_start=0.5)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="`flow_start`"):
        pipe(num_inference_steps=2, output_type="pt")
    assert pipe(num_inference_steps=2, output_type="pt", use_flow_prior=False).nfe == 4
    # same t*, another SDE or noise schedule
    with pytest.raises(ValueError, match="marginal"):
        DiNofPipeline(unet=unet, scheduler=DiNofScheduler(sigma_max=50.0), flow_prior=gaussian_pipeline()[1])
    vp = DiNofScheduler(sde_type="vp", prediction_type="epsilon")
    with pytest.raises(ValueError, match="data_range"):
        DiNofPipeline(unet=unet, scheduler=vp, flow_prior=gaussian_pipeline()[1])


def test_moments_are_shared_across_times():
    images = correlated_images()
    moments = estimate_image_moments(images, show_progress=False)
    scheduler = DiNofScheduler(sde_type="ve", sigma_max=10.0, flow_start=0.6)
    for flow_start in (0.2, 0.6):
        from_moments = GaussianPriorModel.from_moments(moments, scheduler, flow_start=flow_start)
        fitted = GaussianPriorModel.fit(
            images, DiNofScheduler.from_config(scheduler.config, flow_start=flow_start), show_progress=False
        )
        assert from_moments.config.flow_start == flow_start
        for key, value in fitted.state_dict().items():
            torch.testing.assert_close(from_moments.state_dict()[key], value)
