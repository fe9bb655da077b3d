"""app.py, the Gradio page: its functions on a tiny random pipeline, the served page through gradio_client, a real
headless Chromium loading it. Servers bind to 127.0.0.1 on a free port and are closed at the end of the module."""

import importlib.util
import re
import runpy
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from trained_pipeline import digits_tensor, untrained_tiny_pipeline

pytest.importorskip("gradio", reason="the app extra (gradio) is not installed: it needs Python >= 3.10")

from dinof_diffusers import DiNofPipeline, GaussianPriorModel  # noqa: E402
from dinof_diffusers.training.model_card import create_model_card  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 10  # N: DiNof runs round(0.6 N) = 6 steps, the baseline 10; one corrector step each, so NFE 12 and 20
FEW_STEPS = 5  # N for the tests that do not look at the trajectory: 3 DiNof steps (NFE 6), 5 baseline steps (NFE 10)
CONTROLS = ("Number of images", "Seed", "Sampler", "Number of steps N", "Flow temperature", "langevin_norm")


def load_app():
    spec = importlib.util.spec_from_file_location("dinof_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def pipeline():
    return untrained_tiny_pipeline()


@pytest.fixture(scope="module")
def demo(app, pipeline):
    return app.DiNofDemo(pipeline, data=digits_tensor()[:200], data_name="digits", name="tiny")


def pipeline_images(pipeline, seed, num_steps, batch_size, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    output = pipeline(batch_size, num_steps, generator=generator, output_type="pt", **kwargs)
    return output.images, output.nfe


# ----------------------------------------------------------------------------------------------------------------------
# The functions, called directly
# ----------------------------------------------------------------------------------------------------------------------


def test_dinof_sample_is_the_pipelines_own_and_measures_the_baseline(app, demo, pipeline):
    calls = []
    result = demo.sample(3, seed=5, sampler="DiNof PC", num_steps=NUM_STEPS, progress=lambda *a: calls.append(a))

    # the images are exactly what the pipeline gives for this seed at round(N t*) steps
    images, nfe = pipeline_images(pipeline, 5, 6, 3)
    assert torch.equal(result.images, images)
    dinof, baseline = result.runs
    assert (dinof.name, dinof.num_steps, dinof.nfe) == ("DiNof PC", 6, nfe) and nfe == 12
    _, baseline_nfe = pipeline_images(pipeline, 5, NUM_STEPS, 3, use_flow_prior=False)
    assert (
        (baseline.name, baseline.num_steps, baseline.nfe)
        == ("baseline PC", NUM_STEPS, baseline_nfe)
        == (
            "baseline PC",
            NUM_STEPS,
            20,
        )
    )
    assert dinof.seconds > 0 and baseline.seconds > 0
    # progress after every step of each run
    expected = [(k, 6, "DiNof PC") for k in range(1, 7)] + [(k, NUM_STEPS, "baseline PC") for k in range(1, 11)]
    assert calls == expected

    # the trajectory: x(t*) from the flow (this batch's, the histogram's sample), states at decreasing t to eps, output
    frames = result.frames
    flow_start = pipeline.flow_prior.sample(3, noise=_first_noise(5, (3, 1, 8, 8)), temperature=1.0)
    assert torch.allclose(result.x_t_star, flow_start.detach(), atol=1e-6)
    assert torch.equal(frames[0].image, result.x_t_star[0]) and frames[0].t == pytest.approx(0.6)
    times = [frame.t for frame in frames[:-1]]
    assert times == sorted(times, reverse=True) and len(times) == app.NUM_TRAJECTORY_FRAMES
    assert times[-1] == pytest.approx(pipeline.scheduler.sampling_eps, rel=1e-4)
    for frame in frames[:-1]:  # sigma(t) of the VE SDE: sigma_min (sigma_max / sigma_min)^t
        assert frame.sigma == pytest.approx(0.01 * (10.0 / 0.01) ** frame.t, rel=1e-5)
    assert frames[-1].t is None and torch.allclose(frames[-1].image, result.images[0])  # VE data range is [0, 1]
    assert result.warnings == []


def _first_noise(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_baseline_sample_starts_at_T_and_runs_once(app, demo, pipeline):
    result = demo.sample(2, seed=1, sampler="baseline PC", num_steps=NUM_STEPS, flow_temperature=0.5)
    images, _ = pipeline_images(pipeline, 1, NUM_STEPS, 2, use_flow_prior=False)
    assert torch.equal(result.images, images)
    assert [run.name for run in result.runs] == ["baseline PC"]
    assert result.frames[0].t == 1.0 and result.frames[0].sigma == pytest.approx(10.0, rel=1e-6)
    # the histogram's side: the baseline's own state at its grid point nearest t*
    assert result.x_t_star.shape == (2, 1, 8, 8) and "baseline" in result.x_t_star_label
    assert any("temperature has no effect" in warning for warning in result.warnings)


def test_gaussian_prior_is_the_data_moment_match_and_samples_as_a_pipeline_component(demo, pipeline):
    """With the data known, the page also offers the moment-matched Gaussian of x(t*); sampling with it is exactly
    `DiNofPipeline(flow_prior=GaussianPriorModel)` for the same seed."""
    assert list(demo.priors) == ["flow", "gaussian"] and isinstance(demo.priors["gaussian"], GaussianPriorModel)
    result = demo.sample(64, seed=2, sampler="DiNof PC", num_steps=FEW_STEPS, prior="gaussian")
    gaussian_pipeline = DiNofPipeline(
        unet=pipeline.unet, scheduler=pipeline.scheduler, flow_prior=demo.priors["gaussian"]
    )
    images, _ = pipeline_images(gaussian_pipeline, 2, 3, 64)
    assert torch.equal(result.images, images)
    assert result.runs[0].start == "gaussian prior at t* = 0.6" and result.x_t_star_label.startswith("gaussian")
    # its x(t*) has the data's x(t*) per-pixel mean and variance (64 samples: within a few standard errors)
    data = demo.data_x_t_star.flatten(1)
    sample = result.x_t_star.flatten(1)
    mean_error = (sample.mean(0) - data.mean(0)) / (data.std(0) / 8)
    assert mean_error.abs().mean() < 1.2 and (sample.var(0).mean() / data.var(0).mean() - 1).abs() < 0.1


def test_seed_and_langevin_norm_reach_the_sampler(demo):
    def sample(batch_size, seed=0, langevin_norm="batch"):
        return demo.sample(batch_size, seed, "DiNof PC", FEW_STEPS, 1.0, langevin_norm).images

    assert torch.equal(sample(2), sample(2)) and not torch.equal(sample(2), sample(2, seed=1))
    # per-sample and batch-mean norms agree for a batch of one, and differ for a batch of several
    assert torch.equal(sample(1, langevin_norm="batch"), sample(1, langevin_norm="sample"))
    assert not torch.allclose(sample(4, langevin_norm="batch"), sample(4, langevin_norm="sample"))


@pytest.mark.parametrize(
    "setting, match",
    [
        ({"num_images": 0}, r"`num_images` must be an integer >= 1, got 0"),
        ({"num_images": 65}, r"`num_images` must be a finite number in \[1, 64\], got 65"),
        ({"num_images": 2.0}, "`num_images` must be an integer"),
        ({"seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"seed": None}, "`seed` must be an integer"),
        ({"sampler": "DiNof DDIM"}, r"`sampler` must be one of \['DiNof PC', 'DiNof ODE Heun', "),
        ({"num_steps": 0}, r"`num_steps` must be an integer >= 1"),
        ({"num_steps": 1001}, r"`num_steps` must be a finite number in \[1, 1000\]"),
        ({"flow_temperature": 0.0}, r"`flow_temperature` must be a finite number in \(0.0, 2.0\]"),
        ({"flow_temperature": float("nan")}, "`flow_temperature` must be a finite number"),
        ({"langevin_norm": "global"}, r"`langevin_norm` must be one of \['batch', 'sample'\]"),
        ({"prior": "laplace"}, r"`prior` must be one of \['flow', 'gaussian'\]"),
    ],
)
def test_bad_settings_are_named_before_any_work(demo, setting, match):
    settings = {"num_images": 2, "seed": 0, "sampler": "DiNof PC", "num_steps": NUM_STEPS, **setting}
    calls = []
    with pytest.raises(ValueError, match=match):
        demo.sample(**settings, progress=lambda *a: calls.append(a))
    assert calls == []


@pytest.mark.parametrize("sampler, ode_solver, nfe", [("DiNof ODE Heun", "heun", 5), ("DiNof ODE Euler", "euler", 3)])
def test_ode_samplers_are_the_pipelines_own(demo, pipeline, sampler, ode_solver, nfe):
    result = demo.sample(2, seed=4, sampler=sampler, num_steps=FEW_STEPS)
    images, pipeline_nfe = pipeline_images(pipeline, 4, 3, 2, sampler="ode", ode_solver=ode_solver)
    assert torch.equal(result.images, images) and result.runs[0].nfe == pipeline_nfe == nfe  # heun: 2 n - 1
    assert result.runs[1].name == sampler.replace("DiNof", "baseline") and result.runs[1].num_steps == FEW_STEPS
    times = [frame.t for frame in result.frames[:-1]]  # the ODE's callback times: t* down to eps
    assert times[0] == pytest.approx(0.6) and times == sorted(times, reverse=True)
    assert times[-1] == pytest.approx(pipeline.scheduler.sampling_eps, rel=1e-4)


def test_discrete_models_are_offered_no_ode(app, pipeline):
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, continuous=False)
    demo = app.DiNofDemo(DiNofPipeline(unet=pipeline.unet, scheduler=scheduler, flow_prior=pipeline.flow_prior))
    assert list(demo.samplers) == ["DiNof PC", "baseline PC"]


def test_pictures_and_cost_table(app, demo):
    result = demo.sample(4, 0, "DiNof PC", FEW_STEPS)
    grid, table, trajectory, histogram = app.pictures(demo, result)
    # 2x2 grid of 8x8 images, upscaled x16 (640 px for two columns), 2 px padding
    assert grid.size == (2 * (8 * 16 + 2) + 2,) * 2
    assert np.asarray(grid).std() > 0
    assert "| **DiNof PC** (shown) |" in table and "| 3 | 6 |" in table and "| 5 | 10 |" in table
    assert "| ratio, shown / baseline | | | 0.60 |" in table
    for picture in (trajectory, histogram):
        assert isinstance(picture, Image.Image) and np.asarray(picture).std() > 0


def test_a_pipeline_without_flow_offers_the_baseline_only(app, pipeline):
    flow_free = DiNofPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
    demo = app.DiNofDemo(flow_free)
    assert [name for name in demo.samplers if "DiNof" in name] == [] and "baseline PC" in demo.samplers
    assert demo.priors == {} and demo.data_x_t_star is None
    with pytest.raises(ValueError, match="`sampler` must be one of \\['baseline PC', "):
        demo.sample(1, 0, "DiNof PC", FEW_STEPS)
    assert "none (baseline sampler only)" in demo.describe()


def test_load_demo_reads_the_data_set_from_the_model_card(app, pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "pipeline")
    assert app.load_demo(str(tmp_path / "pipeline"), device="cpu").data_x_t_star is None  # no card: data unknown
    card = create_model_card(
        "x", "the scikit-learn handwritten digits (embedded, 1797 images)", {"score_time_range": "[eps, T]"}, "joint"
    )
    card.save(tmp_path / "pipeline" / "README.md")
    assert app.read_model_card(str(tmp_path / "pipeline")) == (
        "the scikit-learn handwritten digits (embedded, 1797 images)",
        True,
    )
    demo = app.load_demo(str(tmp_path / "pipeline"), device="cpu")
    # the data's x(t*): all 1,797 digits at 8x8 in [0, 1], plus noise of std sigma(t*)
    assert demo.data_x_t_star.shape == (1000, 1, 8, 8) and demo.data_name.startswith("scikit-learn digits")
    noise_std = (demo.data_x_t_star - digits_tensor(split="all")[:1000]).std().item()
    assert noise_std == pytest.approx(demo.sigma(0.6), rel=0.02)

    with pytest.raises(FileNotFoundError, match="holds no model_index.json"):
        app.load_demo(str(tmp_path), device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        app.load_demo(str(tmp_path / "missing"), device="cpu")


def test_requirements_txt_is_setup_py_install_and_app_requirements(monkeypatch):
    """The Space installs requirements.txt (before its copy of the repository exists): it must stay equal to setup.py's
    install_requires plus the app extra."""
    captured = {}
    monkeypatch.chdir(ROOT)  # setup.py reads README.md
    with mock.patch("setuptools.setup", lambda **kwargs: captured.update(kwargs)):
        runpy.run_path(str(ROOT / "setup.py"))
    expected = captured["install_requires"] + captured["extras_require"]["app"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert requirements == expected
    assert set(captured["extras_require"]["app"]) <= set(captured["extras_require"]["test"])


# ----------------------------------------------------------------------------------------------------------------------
# The served page
# ----------------------------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(app, demo):
    blocks = app.build_app(demo, settings={"num_images": 4, "num_steps": FEW_STEPS})  # opens with a first sample
    app.launch(blocks, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield blocks.local_url
    finally:
        blocks.close()


def test_served_app_samples_through_gradio_client(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False, download_files=True)
    grid, table, trajectory, histogram = client.predict(
        2, 3, "DiNof PC", FEW_STEPS, 1.0, "batch", "flow", api_name="/sample"
    )
    for path in (grid, trajectory, histogram):
        with Image.open(path) as picture:
            assert picture.format == "PNG" and np.asarray(picture).std() > 0
    assert "| 3 | 6 |" in table and "| 5 | 10 |" in table

    with pytest.raises(AppError, match=r"`seed` must be an integer >= 0, got -1"):
        client.predict(2, -1, "DiNof PC", FEW_STEPS, 1.0, "batch", "flow", api_name="/sample")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url, tmp_path, *flags):
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",  # lets the page's JavaScript render the app before the DOM is read
        *flags,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: `make test-browser` installs it (apt)")
def test_browser_renders_the_page(served, tmp_path):
    shell = urllib.request.urlopen(served, timeout=30).read().decode()
    dom = chromium(served, tmp_path, "--dump-dom").stdout
    # the HTML shell has no rendered heading or controls; the page's JavaScript draws them
    assert "<h1" not in shell
    assert re.search(r"<h1[^>]*>\s*DiNof: diffusion from a normalizing-flow prior", dom)
    labels = {label.strip() for label in re.findall(r'data-testid="block-info"[^>]*>([^<]+)<', dom)}
    assert set(CONTROLS) <= labels
    assert re.search(r"<button[^>]*>\s*Sample\s*</button>", re.sub("<!--.*?-->", "", dom))
    assert re.search(r'<div id="samples".*?<img', dom, flags=re.S)  # the page opens with a first sample

    screenshot = tmp_path / "page.png"
    chromium(served, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,1400", "--hide-scrollbars")
    with Image.open(screenshot) as picture:
        assert picture.format == "PNG" and picture.size == (1280, 1400)
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
