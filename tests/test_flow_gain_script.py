"""`train.py --train_component gaussian_prior`, the sample-quality measures and training_scripts/flow_gain.py, on the
shared tiny trained pipeline (8x8 digits) and the embedded digits; the study's stopping rule for flow training."""

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dinof_diffusers import DiNofPipeline, GaussianPriorModel
from dinof_diffusers.data import digits_images
from dinof_diffusers.evaluation.flow_gain import diffuse_images, images_to_tensor
from dinof_diffusers.evaluation.sample_quality import QualityReference, uint8_images_to_tensor
from dinof_diffusers.training import TrainingError, resolve_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script():
    return load_script(REPO_ROOT / "training_scripts" / "train.py")


@pytest.fixture(scope="module")
def gaussian_pipeline_dir(train_script, trained_tiny_pipeline_dir, tmp_path_factory):
    """train.py --train_component gaussian_prior at t* = 0.3 on the shared pipeline's frozen network (the digits)."""
    output_dir = tmp_path_factory.mktemp("gaussian_prior") / "pipeline"
    arguments = [
        "--train_component", "gaussian_prior",
        "--pretrained_model_name_or_path", str(trained_tiny_pipeline_dir),
        "--flow_start", "0.3",
        "--num_sample_images", "4",
        "--sample_num_inference_steps", "3",
        "--report_to", "none",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    train_script.main(train_script.parse_args(arguments))
    return output_dir


def test_train_py_gaussian_prior_saves_the_closed_form_prior_with_the_frozen_network(
    gaussian_pipeline_dir, trained_tiny_pipeline_dir
):
    pipeline = DiNofPipeline.from_pretrained(str(gaussian_pipeline_dir))
    original = DiNofPipeline.from_pretrained(str(trained_tiny_pipeline_dir))
    prior = pipeline.flow_prior
    assert isinstance(prior, GaussianPriorModel) and prior.config.covariance == "full"
    assert pipeline.scheduler.config.flow_start == prior.config.flow_start == 0.3
    assert prior.config.num_images == 1500  # train.py's digits: the train split (--digits_split train)
    for name, weight in original.unet.state_dict().items():  # the score network is copied unchanged
        assert torch.equal(weight, pipeline.unet.state_dict()[name]), name

    # exactly the Gaussian fitted to the same images in closed form
    digits = images_to_tensor(digits_images(8, split="train"), pipeline.scheduler.data_range)
    expected = GaussianPriorModel.fit(digits, pipeline.scheduler, show_progress=False)
    x = diffuse_images(digits[:50], pipeline.scheduler, num_draws=1)[0].float()
    torch.testing.assert_close(prior.log_prob(x), expected.log_prob(x), rtol=1e-5, atol=1e-3)

    card = (gaussian_pipeline_dir / "README.md").read_text()
    assert "Gaussian prior" in card and "fitted to 1500 images" in card
    assert (gaussian_pipeline_dir / "samples.png").is_file()
    generator = torch.Generator().manual_seed(0)
    images = pipeline(batch_size=2, num_inference_steps=3, generator=generator, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_train_py_gaussian_prior_diagonal_with_mirror_images(train_script, trained_tiny_pipeline_dir, tmp_path):
    arguments = [
        "--train_component", "gaussian_prior",
        "--gaussian_covariance", "diagonal",
        "--random_flip",
        "--pretrained_model_name_or_path", str(trained_tiny_pipeline_dir),
        "--num_sample_images", "2",
        "--sample_num_inference_steps", "2",
        "--report_to", "none",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    train_script.main(train_script.parse_args(arguments))
    prior = GaussianPriorModel.from_pretrained(str(tmp_path), subfolder="flow_prior")
    assert prior.config.covariance == "diagonal" and prior.config.num_images == 2 * 1500
    mean = prior.mean.reshape(8, 8)
    torch.testing.assert_close(mean, mean.flip(-1))  # the mirror images make it symmetric


@pytest.mark.parametrize(
    "flags,named",
    [
        (
            {"train_component": "gaussian_prior"},
            ["--train_component gaussian_prior", "--pretrained_model_name_or_path"],
        ),
        ({"gaussian_covariance": "diagonal"}, ["--gaussian_covariance", "joint"]),
        ({"gaussian_covariance": "spherical"}, ["--gaussian_covariance"]),
    ],
)
def test_gaussian_prior_flags_are_checked_before_anything_is_loaded(flags, named):
    import argparse

    with pytest.raises(TrainingError) as error:
        resolve_run_config(argparse.Namespace(**flags))
    for name in named:
        assert name in str(error.value)


def test_gaussian_prior_refuses_flow_sizes(trained_tiny_pipeline_dir):
    import argparse

    flags = {"train_component": "gaussian_prior", "pretrained_model_name_or_path": str(trained_tiny_pipeline_dir)}
    assert resolve_run_config(argparse.Namespace(**flags)).flow_prior == "gaussian"
    with pytest.raises(TrainingError, match="--flow_"):
        resolve_run_config(argparse.Namespace(**flags, flow_depth=2))


# ---------------------------------------------------------------------------------------------------------------------
# Sample quality
# ---------------------------------------------------------------------------------------------------------------------


def test_quality_reference_fd_nearest_neighbours_and_paired_differences():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 200, size=(300, 4, 4, 3), dtype=np.uint8)
    test = rng.integers(0, 200, size=(60, 4, 4, 3), dtype=np.uint8)
    reference = QualityReference(train, test, num_components=5)
    assert reference.train_features.shape == (300, 5)

    copies = reference.score(train, num_bootstrap=20)
    assert copies.fd.value == pytest.approx(0.0, abs=1e-9)  # the reference itself
    assert copies.nn_distance.value == 0.0 and copies.nn_ratio.value == 0.0  # every sample is a training image
    assert reference.score(test, num_bootstrap=0).nn_ratio.value == pytest.approx(1.0)  # the baseline itself

    # a brightness shift moves the mean only: FD = |projected shift|^2 exactly
    shifted = reference.score(train + np.uint8(10), num_bootstrap=20, seed=3)
    shift = torch.full((48,), 10 / 255.0, dtype=torch.float64) @ reference._pca_basis
    assert shifted.fd.value == pytest.approx(float(shift @ shift), rel=1e-6)
    assert shifted.fd.low < shifted.fd.value < shifted.fd.high and shifted.num_bootstrap == 20
    assert reference.score(train + np.uint8(10), num_bootstrap=20, seed=3) == shifted  # seeded

    same = reference.paired_fd_difference(test, test, num_bootstrap=10)
    assert same.value == 0.0 and same.se == 0.0
    with pytest.raises(ValueError, match="images"):
        reference.score(train[:, :2])
    assert uint8_images_to_tensor(train).shape == (300, 3, 4, 4)


# ---------------------------------------------------------------------------------------------------------------------
# training_scripts/flow_gain.py
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_gain_run(trained_tiny_pipeline_dir, gaussian_pipeline_dir, tmp_path_factory):
    """flow_gain.py on the shared pipeline (its flow at t* = 0.6) and the Gaussian pipeline of train.py (t* = 0.3) on
    the digits' fixed split (100 held-out digits), with a few samples a row; then once more (everything resumed)."""
    script = load_script(REPO_ROOT / "training_scripts" / "flow_gain.py")
    output_dir = tmp_path_factory.mktemp("flow_gain")
    arguments = [
        "--pipeline", str(trained_tiny_pipeline_dir),
        "--prior", f"fitted={gaussian_pipeline_dir}",
        "--output_dir", str(output_dir),
        "--max_test_images", "100",
        "--num_draws", "2",
        "--max_train_points", "200",
        "--samples", "8",
        "--sample_batch_size", "8",
        "--num_train_timesteps", "20",
        "--baseline_n", "20",
        "--sample_models", "flow", "gaussian_full", "baseline",
        "--quality_features", "pca",
        "--num_bootstrap", "10",
    ]  # fmt: skip
    results = script.main(arguments)
    manifests = {path: path.stat().st_mtime_ns for path in output_dir.glob("samples/*/generation.json")}
    again = script.main(arguments)
    return {"results": results, "again": again, "manifests": manifests, "output_dir": output_dir}


def test_flow_gain_script_likelihoods(flow_gain_run, trained_tiny_pipeline_dir):
    nll = flow_gain_run["results"]["nll"]
    assert set(nll) == {"0.3", "0.6"}
    assert set(nll["0.6"]["shares"]) == {"flow"} and set(nll["0.3"]["shares"]) == {"fitted"}
    for entry in nll.values():
        # the training set's mixture is closer to its noisy training images than its best Gaussian (a KL >= 0), and
        # the held-out estimate is the lower one
        assert entry["headroom_train"]["bits_per_dim"] > 0
        assert entry["headroom_train"]["bits_per_dim"] > entry["headroom_test"]["bits_per_dim"]
        assert entry["num_test_images"] == 100 and entry["num_train_images"] == 1500
    # the flow column is the flow's own density of the held-out points (the held-out draws use seed + 1)
    pipeline = DiNofPipeline.from_pretrained(str(trained_tiny_pipeline_dir))
    test = images_to_tensor(digits_images(8, split="test")[:100], pipeline.scheduler.data_range)
    points = diffuse_images(test, pipeline.scheduler, num_draws=2, seed=1)
    with torch.no_grad():
        expected = -pipeline.flow_prior.log_prob(points.reshape(-1, 1, 8, 8).float()).double().mean().item()
    assert nll["0.6"]["nll"]["test"]["flow"]["nats"] == pytest.approx(expected, rel=1e-5)
    gain = nll["0.6"]["differences"]["test"]["gaussian_full - flow"]
    assert gain["nats"] == pytest.approx(
        nll["0.6"]["nll"]["test"]["gaussian_full"]["nats"] - nll["0.6"]["nll"]["test"]["flow"]["nats"]
    )
    assert gain["bits_per_dim"] == pytest.approx(gain["nats"] / (64 * math.log(2)))


def test_flow_gain_script_samples_report_and_resume(flow_gain_run):
    output_dir, quality = flow_gain_run["output_dir"], flow_gain_run["results"]["quality"]
    expected = {"t0.3/gaussian_full", "t0.3/baseline", "t0.6/flow", "t0.6/gaussian_full", "t0.6/baseline"}
    assert set(quality) == expected | {"N20/baseline", "data/test", "data/train"}
    for name in expected:
        row = quality[name]
        steps = int(20 * row["t_star"])  # the N = 20 grid from t*, the baseline from T with as many steps
        assert row["steps"] == steps and row["nfe"] == 2 * steps and row["num_samples"] == 8, name
        assert math.isfinite(row["fd"]["value"]) and row["fd"]["low"] <= row["fd"]["value"] <= row["fd"]["high"]
    assert quality["N20/baseline"]["nfe"] == 40
    # the rows share their seeds sample by sample, so the difference to the full Gaussian is paired
    assert "fd_minus_gaussian_full" in quality["t0.6/flow"] and "fd_minus_gaussian_full" not in quality["N20/baseline"]
    assert quality["data/train"]["nn_ratio"]["value"] == 0.0
    report = (output_dir / "flow_gain.md").read_text()
    assert "| 0.3 |" in report and "| t0.6/flow |" in report and (output_dir / "flow_gain.png").is_file()
    saved = json.loads((output_dir / "flow_gain.json").read_text())
    assert saved["nll"].keys() == flow_gain_run["results"]["nll"].keys()

    # the second run found every part done: no dump was touched, the same numbers
    again = flow_gain_run["again"]
    assert {path: path.stat().st_mtime_ns for path in flow_gain_run["manifests"]} == flow_gain_run["manifests"]
    assert again["nll"] == flow_gain_run["results"]["nll"]
    assert again["quality"]["t0.6/flow"]["fd"] == quality["t0.6/flow"]["fd"]


def test_flow_gain_script_rejects_bad_arguments(capsys):
    script = load_script(REPO_ROOT / "training_scripts" / "flow_gain.py")
    for arguments, named in (
        (["--prior", "gaussian_full=x"], "gaussian_full"),
        (["--prior", "no_path"], "NAME=PIPELINE"),
        (["--samples", "1"], "--samples"),
        (["--t_star", "1.5"], "--t_star"),
        (["--dataset_name", "a", "--embedded_dataset", "digits"], "at most one"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args(["--pipeline", "p", "--output_dir", "o", *arguments])
        assert named in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The study's stopping rule for flow training
# ---------------------------------------------------------------------------------------------------------------------


def test_flow_training_stops_when_the_paired_held_out_nll_flattens_or_the_budget_ends():
    study = load_script(REPO_ROOT / "benchmarks" / "flow_gain_study.py")
    config = {"flatten_bits_per_dim": 0.001, "flow_budget_seconds": 100.0, "flow_max_chunks": 5}
    rng = np.random.default_rng(0)
    before = 1.0 + 0.1 * rng.standard_normal(400)
    assert study.chunk_verdict(None, before, 10.0, 1, config) == {"stop": None}
    improving = study.chunk_verdict(before, before - 0.01, 20.0, 2, config)
    assert improving["stop"] is None and improving["improvement"] == pytest.approx(0.01)
    assert study.chunk_verdict(before, before - 0.0005, 20.0, 2, config)["stop"] == "flattened"
    noisy = before - 0.002 + 0.1 * rng.standard_normal(400)  # a gain well inside two standard errors
    assert study.chunk_verdict(before, noisy, 20.0, 2, config)["stop"] == "flattened"
    assert study.chunk_verdict(before, before - 0.01, 100.0, 2, config)["stop"] == "budget"
    assert study.chunk_verdict(before, before - 0.01, 20.0, 5, config)["stop"] == "max_chunks"
    assert os.path.basename(study.FLOW_GAIN_SCRIPT) == "flow_gain.py"
