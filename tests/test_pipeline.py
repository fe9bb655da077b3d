"""DiNofPipeline: closed-form Gaussian targets, NFE and layout, determinism, save/load (local and Hub cache), outputs."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from analytic_models import AnalyticGaussianModel, StandardNormalScoreModel
from diffusers import UNet2DModel

from dinof_diffusers import DiNofPipeline, DiNofScheduler
from dinof_diffusers.models.flow_prior import FlowPriorModel
from dinof_diffusers.pipelines import DiNofPipelineOutput

# ----------------------------------------------------------------------------------------------------------------------
# Closed forms: data N(mu, s^2 I), exact scores, start from the exact marginal at t*.
# ----------------------------------------------------------------------------------------------------------------------

GAUSSIAN = {"ve": (0.5, 0.1), "vp": (0.1, 0.2), "subvp": (0.1, 0.2)}  # (mu, s), far inside the data range
ANALYTIC_CASES = [
    (sde, predictor, corrector, continuous, "score" if sde == "ve" else "epsilon")
    for sde in ("ve", "vp", "subvp")
    for predictor in ("reverse_diffusion", "euler_maruyama", "ancestral")
    for corrector in ("none", "langevin")
    for continuous in (True, False)
    if not (sde == "subvp" and (predictor == "ancestral" or not continuous))
]
# the other parameterisation for each SDE, and annealed Langevin
ANALYTIC_CASES += [
    ("ve", "reverse_diffusion", "langevin", True, "epsilon"),
    ("ve", "reverse_diffusion", "none", False, "epsilon"),
    ("vp", "reverse_diffusion", "langevin", True, "score"),
    ("subvp", "euler_maruyama", "none", True, "score"),
    ("ve", "reverse_diffusion", "ald", True, "score"),
    ("vp", "reverse_diffusion", "ald", False, "epsilon"),
]
STEPS, BATCH, SIZE = 200, 64, 16


@pytest.mark.parametrize("sde_type,predictor,corrector,continuous,prediction_type", ANALYTIC_CASES)
def test_samples_a_gaussian_with_exact_scores(sde_type, predictor, corrector, continuous, prediction_type):
    """Mean and variance of 64 x 256 generated pixels against N(mu, s^2).

    Tolerances: 4.5 standard errors of the estimates (n = 16384: mean s / 128, variance ratio sqrt(2 / n) = 1.1 %),
    plus the bias of the sampler itself at 200 steps from t* = 0.6, measured with n = 2^18: up to 4 % on the variance
    for predictor-only runs (the first-order discretisation error, halving from 100 to 200 steps) and ~2.6 % from
    the Langevin corrector at snr 0.16 (unadjusted Langevin's stationary variance is v / (1 - snr^2) here, at any
    number of steps). So |mean - mu| < 4.5 s / 128 + 0.01 s and |var / s^2 - 1| < 0.05 + 0.05.
    """
    mu, s = GAUSSIAN[sde_type]
    scheduler = DiNofScheduler(
        sde_type=sde_type,
        predictor=predictor,
        corrector=corrector,
        continuous=continuous,
        prediction_type=prediction_type,
    )
    model = AnalyticGaussianModel(
        sde_type=sde_type,
        prediction_type=prediction_type,
        continuous=continuous,
        data_mean=mu,
        data_std=s,
        sample_size=SIZE,
    )
    pipe = DiNofPipeline(unet=model, scheduler=scheduler, flow_prior=None)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(STEPS)
    mean, std = model.marginal(scheduler.model_timestep(scheduler.timesteps[0]))  # the exact marginal at t*
    start = mean + std * torch.randn(BATCH, 1, SIZE, SIZE, generator=generator, dtype=torch.float64)
    output = pipe(
        batch_size=BATCH, num_inference_steps=STEPS, prior_sample=start.float(), generator=generator, output_type="pt"
    )
    assert output.nfe == STEPS * (1 if corrector == "none" else 2) == model.calls
    low, high = scheduler.data_range
    x = (low + (high - low) * output.images).double()
    n = x.numel()
    assert abs(x.mean().item() - mu) < 4.5 * s / n**0.5 + 0.01 * s
    assert abs(x.var().item() / s**2 - 1) < 4.5 * (2 / n) ** 0.5 + 0.05


# ----------------------------------------------------------------------------------------------------------------------
# Tiny real components
# ----------------------------------------------------------------------------------------------------------------------


def tiny_unet(channels=1, time_embedding_type="fourier", seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        time_embedding_type=time_embedding_type,
    ).eval()


def tiny_flow(channels=1, seed=0):
    torch.manual_seed(seed)
    flow = FlowPriorModel(sample_size=8, in_channels=channels, num_levels=2, flow_depth=2, hidden_channels=8)
    flow.log_prob(torch.rand(16, channels, 8, 8))  # data-dependent ActNorm initialisation: a non-trivial flow
    return flow.eval()


def tiny_pipeline(channels=1, sde_type="ve", flow=True, **scheduler_kwargs):
    prediction_type = "score" if sde_type == "ve" else "epsilon"
    embedding = "fourier" if sde_type == "ve" else "positional"
    scheduler = DiNofScheduler(
        sde_type=sde_type, prediction_type=prediction_type, num_train_timesteps=50, **scheduler_kwargs
    )
    pipe = DiNofPipeline(
        unet=tiny_unet(channels, embedding), scheduler=scheduler, flow_prior=tiny_flow(channels) if flow else None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "pt")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Layout and NFE
# ----------------------------------------------------------------------------------------------------------------------


def cheap_pipeline(flow=True, **scheduler_kwargs):
    model = StandardNormalScoreModel(in_channels=1, sample_size=8)
    flow_prior = tiny_flow() if flow else None
    pipe = DiNofPipeline(unet=model, scheduler=DiNofScheduler(**scheduler_kwargs), flow_prior=flow_prior)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def test_published_layout_and_nfe():
    pipe, model = cheap_pipeline()
    out = run(pipe, num_inference_steps=None)
    assert pipe.num_timesteps == 600 and out.nfe == 1200 == model.calls
    ts = pipe.scheduler.timesteps
    assert ts[0].item() == pytest.approx(0.6) and ts[-1].item() == pytest.approx(1e-5)
    assert out.images.shape == (1, 1, 8, 8)

    pipe, model = cheap_pipeline(corrector="none")
    assert run(pipe, num_inference_steps=None).nfe == 600 == model.calls

    pipe, model = cheap_pipeline(flow=False, flow_start=1.0)
    out = run(pipe, num_inference_steps=None, use_flow_prior=False)
    assert pipe.num_timesteps == 1000 and out.nfe == 2000 == model.calls
    assert pipe.scheduler.timesteps[0].item() == 1.0

    pipe, model = cheap_pipeline(predictor="none", correct_steps=2)
    assert run(pipe, num_inference_steps=10).nfe == 20 == model.calls


# ----------------------------------------------------------------------------------------------------------------------
# Determinism, generators, outputs
# ----------------------------------------------------------------------------------------------------------------------


def test_seeded_runs_are_deterministic_and_seeds_differ():
    pipe = tiny_pipeline()
    a, b, c = run(pipe, seed=1), run(pipe, seed=1), run(pipe, seed=2)
    assert isinstance(a, DiNofPipelineOutput) and a.nfe == 8
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.min() >= 0 and a.images.max() <= 1


@pytest.mark.parametrize("use_flow_prior", [True, False])
def test_list_of_generators_equals_single_runs(use_flow_prior):
    pipe = tiny_pipeline(langevin_norm="sample")
    generators = [torch.Generator().manual_seed(10 + b) for b in range(3)]
    kwargs = dict(num_inference_steps=4, output_type="pt", use_flow_prior=use_flow_prior)
    batched = pipe(batch_size=3, generator=generators, **kwargs).images
    for b in range(3):
        single = pipe(batch_size=1, generator=torch.Generator().manual_seed(10 + b), **kwargs).images
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-5, atol=1e-6)


def test_latents_and_prior_sample_inputs():
    pipe = tiny_pipeline()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # `latents` is the flow's input noise: the same noise and seed give the same images
    a = run(pipe, batch_size=2, latents=noise).images
    b = run(pipe, batch_size=2, latents=noise.clone()).images
    assert torch.equal(a, b)
    # `prior_sample` is x(t*) itself: the flow's own sample of that noise gives the same result
    x_star = pipe.flow_prior.sample(2, noise=noise)
    seed = torch.Generator().manual_seed(0)
    torch.randn(2, 1, 8, 8, generator=seed)  # the default path would have drawn the flow noise first
    c = pipe(batch_size=2, prior_sample=x_star, generator=seed, num_inference_steps=4, output_type="pt").images
    d = run(pipe, batch_size=2).images  # latents drawn from the same generator
    torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-6)
    # temperature changes the flow sample
    e = run(pipe, batch_size=2, latents=noise, flow_temperature=0.5).images
    assert not torch.equal(a, e)


def test_output_types_agree():
    pipe = tiny_pipeline(channels=3)
    pt = run(pipe, batch_size=2, output_type="pt").images
    np_images = run(pipe, batch_size=2, output_type="np").images
    pil = run(pipe, batch_size=2, output_type="pil").images
    assert pt.shape == (2, 3, 8, 8) and np_images.shape == (2, 8, 8, 3) and len(pil) == 2
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(pil[1]), (np_images[1] * 255).round().astype(np.uint8))
    images, nfe = run(pipe, batch_size=2, return_dict=False)
    assert torch.equal(images, pt) and nfe == 8


@pytest.mark.parametrize("channels,sde_type", [(1, "ve"), (3, "ve"), (1, "vp"), (3, "subvp")])
def test_one_and_three_channel_unets(channels, sde_type):
    pipe = tiny_pipeline(channels=channels, sde_type=sde_type)
    images = run(pipe, batch_size=2, output_type="np").images
    assert images.shape == (2, 8, 8, channels) and np.isfinite(images).all()
    pil = run(pipe, batch_size=1, output_type="pil").images[0]
    assert pil.mode == ("L" if channels == 1 else "RGB")


def test_callback_can_modify_latents_and_interrupt():
    pipe = tiny_pipeline()
    seen = []

    def zero_latents_at_step_1(pipeline, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 1 else {}

    base = run(pipe).images
    changed = run(pipe, callback_on_step_end=zero_latents_at_step_1).images
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][2] == (1, 1, 8, 8)
    assert not torch.equal(base, changed)

    def constant_mean(pipeline, i, t, kwargs):
        return {"latents_mean": torch.full_like(kwargs["latents_mean"], 0.25)}

    out = run(pipe, callback_on_step_end=constant_mean, callback_on_step_end_tensor_inputs=["latents_mean"])
    assert torch.all(out.images == 0.25)  # VE: data range [0, 1], so 0.25 maps to itself

    def stop_after_two(pipeline, i, t, kwargs):
        if i == 1:
            pipeline._interrupt = True
        return {}

    out = run(pipe, callback_on_step_end=stop_after_two)
    assert out.nfe == 4 and pipe.interrupt


def test_baseline_without_flow_prior():
    pipe = tiny_pipeline(flow=False)
    out = run(pipe, batch_size=2, use_flow_prior=False)
    assert out.images.shape == (2, 1, 8, 8) and torch.isfinite(out.images).all()
    assert pipe.scheduler.timesteps[0].item() == 1.0
    with pytest.raises(ValueError, match="flow_prior"):
        run(pipe, use_flow_prior=True)


def test_half_precision_unet_keeps_the_flow_in_float32():
    pipe = tiny_pipeline(sde_type="vp")
    pipe.unet.to(torch.float16)
    pipe.flow_prior.to(torch.float16)
    try:
        out = run(pipe, batch_size=2)
    except RuntimeError as error:  # some CPU builds lack float16 kernels
        pytest.skip(f"float16 UNet on CPU: {error}")
    assert pipe.flow_prior.dtype == torch.float32
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"output_type": "latent"}, "output_type"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"flow_temperature": 0.0}, "flow_temperature"),
        ({"latents": torch.zeros(1, 3, 8, 8)}, "latents"),
        ({"prior_sample": torch.zeros(2, 1, 8, 8)}, "prior_sample"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_inputs_raise(kwargs, name):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=name):
        run(pipe, **kwargs)
    with pytest.raises(ValueError, match="generator"):
        pipe(batch_size=2, generator=[torch.Generator()], num_inference_steps=2)


# ----------------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    pipe = tiny_pipeline(channels=3, snr=0.17, langevin_norm="sample")
    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "model_index.json") as file:
        index = json.load(file)
    assert index["_class_name"] == "DiNofPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["flow_prior"] == ["dinof_diffusers.models.flow_prior", "FlowPriorModel"]
    assert index["scheduler"] == ["dinof_diffusers.schedulers.scheduling_dinof", "DiNofScheduler"]

    loaded = DiNofPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.flow_prior, FlowPriorModel) and isinstance(loaded.scheduler, DiNofScheduler)
    assert loaded.scheduler.config.snr == 0.17 and loaded.scheduler.config.langevin_norm == "sample"
    assert torch.equal(run(pipe, batch_size=2).images, run(loaded, batch_size=2).images)


def test_save_load_without_flow_prior(tmp_path):
    pipe = tiny_pipeline(flow=False)
    pipe.save_pretrained(tmp_path)
    loaded = DiNofPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.flow_prior is None
    a = run(pipe, use_flow_prior=False).images
    assert torch.equal(a, run(loaded, use_flow_prior=False).images)


def test_load_hub_id_offline_from_cache(tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1, no network."""
    import huggingface_hub.constants

    pipe = tiny_pipeline()
    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--dinof-test--tiny-pipeline"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cwd = os.getcwd()
    monkeypatch.chdir(tmp_path)  # "dinof-test/tiny-pipeline" must not resolve as a local folder
    try:
        loaded = DiNofPipeline.from_pretrained("dinof-test/tiny-pipeline", cache_dir=str(tmp_path / "cache"))
    finally:
        os.chdir(cwd)
    loaded.set_progress_bar_config(disable=True)
    local = DiNofPipeline.from_pretrained(saved)
    local.set_progress_bar_config(disable=True)
    # The Hub id resolves to the very files of the folder: bit-identical to loading the folder. Against the in-memory
    # original only to float rounding: loaded weights sit at other memory alignments, so CPU kernels may round
    # differently (seen with diffusers 0.42 / safetensors).
    assert torch.equal(run(local).images, run(loaded).images)
    torch.testing.assert_close(run(pipe).images, run(loaded).images, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="No such folder"):
        DiNofPipeline.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(Exception):  # noqa: B017 (not in the cache, offline: huggingface_hub's own error)
        DiNofPipeline.from_pretrained("dinof-test/missing", cache_dir=str(tmp_path / "cache"))
