"""Tests of the evaluation package: the offline digits feature extractor, resumable sample dumps, torch-fidelity metrics
and the `training_scripts/evaluate.py` command line. Everything runs offline on the CPU; caches live under tmp."""

import filecmp
import importlib.util
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dinof_diffusers.data import digits_images, load_digits_dataset
from dinof_diffusers.evaluation import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    FeatureExtractorDigits,
    compute_metrics,
    digits_classifier_info,
    digits_reference_folder,
    generate_samples,
    load_digits_classifier,
    train_digits_classifier,
)
from dinof_diffusers.evaluation.digits_classifier import default_classifier_path, evaluate_digits_classifier

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Points DINOF_CACHE_DIR at a temporary folder: the classifier trains there once for this module."""
    path = tmp_path_factory.mktemp("dinof_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOF_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def digits_dir(cache_dir):
    return digits_reference_folder(16)


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.RandomState(0)
    for index in range(200):
        Image.fromarray(rng.randint(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{index:04d}.png")
    return folder


# ------------------------------------------------------------------------------------------------------------------
# The classifier and the feature extractor
# ------------------------------------------------------------------------------------------------------------------


def test_classifier_held_out_accuracy_and_cache(cache_dir):
    model = load_digits_classifier()
    path = default_classifier_path()
    assert path.parent == cache_dir and path.exists()
    info = digits_classifier_info()
    assert info["held_out_accuracy"] >= 0.97, info
    for resolution in (8, 16, 32):
        assert evaluate_digits_classifier(model, resolution=resolution) >= 0.97
    # The second load reads the cache instead of training again.
    mtime = path.stat().st_mtime_ns
    again = load_digits_classifier()
    assert path.stat().st_mtime_ns == mtime
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_classifier_training_is_deterministic():
    first, _ = train_digits_classifier(num_epochs=1)
    second, _ = train_digits_classifier(num_epochs=1)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_feature_extractor_interface():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[DIGITS_FEATURE_EXTRACTOR_NAME] is FeatureExtractorDigits
    extractor = FeatureExtractorDigits(DIGITS_FEATURE_EXTRACTOR_NAME, ["128", "logits_unbiased", "logits"])
    grey = torch.from_numpy(digits_images(16)[:8]).unsqueeze(1)
    features, logits_unbiased, logits = extractor(grey)
    assert features.shape == (8, 128) and logits_unbiased.shape == (8, 10) and logits.shape == (8, 10)
    assert torch.allclose(logits, logits_unbiased + extractor.classifier.fc2.bias, atol=1e-5)
    # Grey RGB gives the grey features; other resolutions are resized; the logits classify the digits.
    rgb_features = extractor(grey.repeat(1, 3, 1, 1))[0]
    assert torch.allclose(rgb_features, features, atol=1e-5)
    for resolution in (8, 32):
        images = torch.from_numpy(digits_images(resolution)[:8]).unsqueeze(1).repeat(1, 3, 1, 1)
        assert extractor(images)[2].shape == (8, 10)
    from dinof_diffusers.data import digits_labels

    assert (logits.argmax(1).numpy() == digits_labels()[:8]).mean() >= 0.75
    with pytest.raises(Exception, match="uint8"):
        extractor(grey.float())


# ------------------------------------------------------------------------------------------------------------------
# Metrics through torch-fidelity
# ------------------------------------------------------------------------------------------------------------------


def test_digits_against_themselves_and_against_noise(digits_dir, noise_dir):
    same = compute_metrics(digits_dir, "digits")
    assert all(math.isfinite(value) for value in same.values()), same
    assert abs(same["frechet_inception_distance"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    # The classifier-confidence score of the real digits: confident and balanced, close to its maximum of 10.
    assert same["classifier_confidence_score_mean"] == same["inception_score_mean"] > 8.0
    assert abs(same["kernel_inception_distance_mean"]) < 0.05

    noise = compute_metrics(noise_dir, "digits")
    assert all(math.isfinite(value) for value in noise.values()), noise
    assert noise["frechet_inception_distance"] > 10.0
    assert noise["kernel_inception_distance_mean"] > 0.5
    assert noise["precision"] < 0.1
    assert noise["classifier_confidence_score_mean"] < 3.0


def test_small_sample_counts_and_dataset_references(tmp_path, digits_dir):
    few = tmp_path / "few"
    few.mkdir()
    for index, image in enumerate(digits_images(16)[:5]):
        Image.fromarray(image).save(few / f"{index:06d}.png")
    result = compute_metrics(few, "digits", kid_subset_size=1000, prc_neighborhood=3)
    assert all(math.isfinite(value) for value in result.values()), result

    # A datasets.Dataset and a save_to_disk folder as references: the same images, so FID ~ 0.
    dataset = load_digits_dataset(16)
    same = compute_metrics(digits_dir, dataset, feature_extractor=DIGITS_FEATURE_EXTRACTOR_NAME, metrics=["fid"])
    assert same["frechet_inception_distance"] < 1e-3
    dataset.select(range(300)).save_to_disk(str(tmp_path / "saved"))
    result = compute_metrics(
        digits_dir, str(tmp_path / "saved"), feature_extractor=DIGITS_FEATURE_EXTRACTOR_NAME, metrics=["fid", "kid"]
    )
    assert math.isfinite(result["frechet_inception_distance"]) and result["frechet_inception_distance"] < 5.0

    with pytest.raises(ValueError, match="reference"):
        compute_metrics(digits_dir, None, metrics=["fid"])
    with pytest.raises(ValueError, match="metrics"):
        compute_metrics(digits_dir, "digits", metrics=["ppl"])
    (few / ".tmp-abc.png").write_bytes(b"")
    with pytest.raises(ValueError, match="interrupted"):
        compute_metrics(few, "digits")


# ------------------------------------------------------------------------------------------------------------------
# Resumable sample dumps
# ------------------------------------------------------------------------------------------------------------------


class FakePipeline:
    """Stands in for DiNofPipeline: noisy copies of random digits, drawn from the generator only."""

    def __init__(self):
        self.images = torch.from_numpy(digits_images(16)).float().div(255).unsqueeze(1)
        self.calls = 0

    def __call__(self, batch_size, generator=None, output_type="pt", num_inference_steps=3, use_flow_prior=True):
        self.calls += 1
        index = torch.randint(0, len(self.images), (batch_size,), generator=generator)
        noise = 0.05 * torch.randn(batch_size, 1, 16, 16, generator=generator)
        return SimpleNamespace(images=(self.images[index] + noise).clamp(0, 1), nfe=2 * num_inference_steps)


def test_generate_samples_resumes_byte_identically(tmp_path):
    full = generate_samples(FakePipeline(), tmp_path / "full", 37, batch_size=8, seed=5, num_inference_steps=4)
    assert full["num_generated"] == 37 and full["nfe"] == 8 and full["seconds_per_image"] > 0
    assert len(full["files"]) == 37 and all(os.path.exists(path) for path in full["files"])

    resumed_dir = tmp_path / "resumed"
    generate_samples(FakePipeline(), resumed_dir, 37, batch_size=8, seed=5, num_inference_steps=4)
    for name in ("000000.png", "000019.png", "000036.png"):
        (resumed_dir / name).unlink()
    (resumed_dir / ".tmp-leftover.png").write_bytes(b"half a file")  # a killed run's temporary file
    pipeline = FakePipeline()
    resumed = generate_samples(pipeline, resumed_dir, 37, batch_size=8, seed=5, num_inference_steps=4)
    assert pipeline.calls == 3 and resumed["num_generated"] == 8 + 8 + 5
    assert sorted(os.listdir(resumed_dir)) == sorted(os.listdir(tmp_path / "full"))
    for a, b in zip(full["files"], resumed["files"]):
        assert filecmp.cmp(a, b, shallow=False), (a, b)
    # A complete dump is not generated again.
    pipeline = FakePipeline()
    assert (
        generate_samples(pipeline, resumed_dir, 37, batch_size=8, seed=5, num_inference_steps=4)["num_generated"] == 0
    )
    assert pipeline.calls == 0

    # Other arguments in the same folder: refused, or replaced with overwrite=True.
    with pytest.raises(ValueError, match="batch_size"):
        generate_samples(FakePipeline(), resumed_dir, 37, batch_size=4, seed=5, num_inference_steps=4)
    other = generate_samples(FakePipeline(), resumed_dir, 10, batch_size=4, seed=5, overwrite=True)
    assert other["num_generated"] == 10 and len(list(resumed_dir.glob("*.png"))) == 10
    with pytest.raises(ValueError, match="num_samples"):
        generate_samples(FakePipeline(), tmp_path / "bad", 0)


# ------------------------------------------------------------------------------------------------------------------
# The command line, end to end on a tiny DiNofPipeline
# ------------------------------------------------------------------------------------------------------------------


def _load_evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO_ROOT / "training_scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_validates_arguments(tmp_path, capsys):
    evaluate = _load_evaluate_script()
    base = ["--pipeline", "org/model", "--output_dir", str(tmp_path)]
    cases = [
        (["--num_samples", "0"], "--num_samples"),
        (["--batch_size", "-1"], "--batch_size"),
        (["--metrics", "fid,bogus", "--reference", "digits"], "--metrics"),
        (["--metrics", "fid"], "--reference"),
        (["--sampler", "baseline", "--flow_temperature", "0.7", "--metrics", "isc"], "--flow_temperature"),
        (["--snr", "0", "--reference", "digits"], "--snr"),
        (["--reference", "./does/not/exist"], "--reference"),
    ]
    for extra, flag in cases:
        with pytest.raises(SystemExit):
            evaluate.parse_args(base + extra)
        assert flag in capsys.readouterr().err
    args = evaluate.parse_args(base + ["--reference", "digits", "--metrics", "fid,isc"])
    assert args.feature_extractor == DIGITS_FEATURE_EXTRACTOR_NAME and args.metrics == ["fid", "isc"]


def test_cli_end_to_end_and_resume(tmp_path, trained_tiny_pipeline_dir):
    evaluate = _load_evaluate_script()

    def run(output_dir):
        argv = [
            "--pipeline", str(trained_tiny_pipeline_dir), "--output_dir", str(output_dir), "--num_samples", "12",
            "--batch_size", "4", "--seed", "1", "--reference", "digits", "--num_inference_steps", "3",
            "--snr", "0.1", "--device", "cpu", "--no_progress",
        ]  # fmt: skip
        return evaluate.main(argv)

    report = run(tmp_path / "full")
    with open(tmp_path / "full" / "metrics.json") as file:
        written = json.load(file)
    assert written["metrics"] == report["metrics"]
    assert set(report["metrics"]) >= {
        "frechet_inception_distance",
        "classifier_confidence_score_mean",
        "kernel_inception_distance_mean",
        "precision",
        "recall",
    }
    assert all(math.isfinite(value) for value in report["metrics"].values())
    # 3 reverse steps, each a corrector and a predictor evaluation.
    assert report["nfe"] == 6 and report["seconds_per_image"] > 0
    assert report["sampler"] == {
        "name": "dinof",
        "use_flow_prior": True,
        "num_inference_steps": 3,
        "flow_temperature": 1.0,
    }
    assert report["scheduler"]["config"]["snr"] == 0.1
    assert report["model"]["flow_prior"]["num_levels"] == 2
    assert report["digits_classifier"]["held_out_accuracy"] >= 0.97

    # Interrupted: a partial dump (files of two batches gone), then the same command again.
    partial = tmp_path / "partial"
    run(partial)
    for name in ("000001.png", "000002.png", "000011.png"):
        (partial / "samples" / name).unlink()
    resumed = run(partial)
    full_samples = sorted((tmp_path / "full" / "samples").glob("*.png"))
    assert [path.name for path in full_samples] == sorted(path.name for path in (partial / "samples").glob("*.png"))
    for path in full_samples:
        assert filecmp.cmp(path, partial / "samples" / path.name, shallow=False), path.name
    assert resumed["metrics"] == report["metrics"]

    # The baseline sampler: the full PC sampler from the SDE prior, no flow.
    baseline = evaluate.main(
        ["--pipeline", str(trained_tiny_pipeline_dir), "--output_dir", str(tmp_path / "baseline"), "--num_samples", "4",
         "--batch_size", "4", "--sampler", "baseline", "--num_inference_steps", "2", "--corrector", "none",
         "--metrics", "isc", "--feature_extractor", "dinof-digits", "--device", "cpu", "--no_progress"]
    )  # fmt: skip
    assert baseline["nfe"] == 2 and baseline["sampler"]["use_flow_prior"] is False
    assert math.isfinite(baseline["metrics"]["classifier_confidence_score_mean"])
