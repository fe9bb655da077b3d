"""Tests of the evaluation package: the offline digits feature extractor, resumable sample dumps, torch-fidelity metrics
and the `training_scripts/evaluate.py` command line. Everything runs offline on the CPU; caches live under tmp."""

import dataclasses
import filecmp
import importlib.util
import json
import logging
import math
import os
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dinof_diffusers.data import digits_images, load_digits_dataset
from dinof_diffusers.evaluation import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    DINOV2_FEATURE_EXTRACTOR_NAME,
    EvaluationError,
    FeatureExtractorDigits,
    compute_metrics,
    digits_classifier_info,
    digits_reference_folder,
    dump_files,
    generate_samples,
    load_digits_classifier,
    train_digits_classifier,
    weights_fingerprint,
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


def test_digits_references_of_the_fixed_split(cache_dir):
    from dinof_diffusers.evaluation import default_feature_extractor, resolve_reference

    folder = resolve_reference("digits:test", resolution=16)
    assert folder == digits_reference_folder(16, split="test") != digits_reference_folder(16)
    files = sorted(folder.glob("*.png"))
    assert len(files) == 297 and default_feature_extractor("digits:test") == DIGITS_FEATURE_EXTRACTOR_NAME
    assert np.array_equal(np.asarray(Image.open(files[5])), digits_images(16, split="test")[5])
    with pytest.raises(ValueError, match="split"):
        resolve_reference("digits:validation", resolution=16)


def test_likelihood_images_are_read_as_references_are_found(tmp_path, cache_dir):
    from datasets import Dataset, DatasetDict
    from trained_pipeline import digits_tensor

    from dinof_diffusers.evaluation import likelihood_images

    # digits:test is the held-out split at the pipeline's size, values k / 255
    assert torch.equal(likelihood_images("digits:test", 8, 1, max_samples=7), digits_tensor(split="test")[:7])
    # a folder of RGB images of another size, for a greyscale pipeline: converted and fitted
    folder = tmp_path / "folder"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for index in range(3):
        Image.fromarray(rng.randint(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    images = likelihood_images(str(folder), 8, 1)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    # a datasets folder with splits: the test split by default (held-out images)
    splits = {name: [Image.fromarray(np.full((8, 8), value, dtype=np.uint8)) for value in values]
              for name, values in (("train", (10, 20)), ("test", (200,)))}  # fmt: skip
    DatasetDict({name: Dataset.from_dict({"image": images}) for name, images in splits.items()}).save_to_disk(
        tmp_path / "dataset"
    )
    images = likelihood_images(str(tmp_path / "dataset"), 8, 3)
    assert images.shape == (1, 3, 8, 8) and torch.allclose(images, torch.full_like(images, 200 / 255))
    with pytest.raises(ValueError, match="torch-fidelity input"):
        likelihood_images("cifar10-train", 32, 3)


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


class NaNPipeline(FakePipeline):
    """A FakePipeline whose output holds a NaN from its `nan_call`-th call on (as a diverged network's would)."""

    def __init__(self, nan_call):
        super().__init__()
        self.nan_call = nan_call

    def __call__(self, batch_size, **kwargs):
        output = super().__call__(batch_size, **kwargs)
        if self.calls >= self.nan_call:
            output.images[0, 0, 3, 3] = float("nan")
        return output


def test_resume_remakes_truncated_and_unreadable_pngs(tmp_path):
    generate_samples(FakePipeline(), tmp_path, 12, batch_size=4, seed=3, show_progress=False)
    original = {name: (tmp_path / name).read_bytes() for name in ("000001.png", "000009.png")}
    (tmp_path / "000001.png").write_bytes(original["000001.png"][:40])  # cut by a kill or a full disk
    (tmp_path / "000009.png").write_bytes(b"not a PNG")
    pipeline = FakePipeline()
    resumed = generate_samples(pipeline, tmp_path, 12, batch_size=4, seed=3, show_progress=False)
    assert pipeline.calls == 2 and resumed["num_generated"] == 8  # batches 0 and 2, nothing else
    for name, content in original.items():
        assert (tmp_path / name).read_bytes() == content, name


def test_non_finite_samples_are_refused_before_any_png_of_their_batch(tmp_path):
    pattern = r"Batch 1 \(images 000004.png to 000007.png, seed \d+\): .*non-finite .* in 1 of its 4 images"
    with pytest.raises(EvaluationError, match=pattern):
        generate_samples(NaNPipeline(nan_call=2), tmp_path, 12, batch_size=4, seed=3, show_progress=False)
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [f"{index:06d}.png" for index in range(4)]
    assert set(json.loads((tmp_path / "generation.json").read_text())["batches"]) == {"0"}


def test_a_dump_belongs_to_the_weights_that_made_it(tmp_path, caplog):
    from trained_pipeline import untrained_tiny_pipeline

    from dinof_diffusers import DiNofPipeline

    first, second = untrained_tiny_pipeline(seed=0), untrained_tiny_pipeline(seed=1)
    fingerprint = weights_fingerprint(first)
    assert set(fingerprint) == {"unet", "flow_prior"}
    assert fingerprint == weights_fingerprint(untrained_tiny_pipeline(seed=0))
    kwargs = dict(num_samples=4, batch_size=2, seed=0, num_inference_steps=2, show_progress=False)
    assert generate_samples(first, tmp_path, **kwargs)["weights_fingerprint"] == fingerprint

    with pytest.raises(EvaluationError, match=r"made by other weights \(differing: flow_prior, unet\)"):
        generate_samples(second, tmp_path, **kwargs)
    same_flow = DiNofPipeline(unet=second.unet, scheduler=first.scheduler, flow_prior=first.flow_prior)
    with pytest.raises(EvaluationError, match=r"made by other weights \(differing: unet\)"):
        generate_samples(same_flow, tmp_path, **kwargs)
    replaced = generate_samples(second, tmp_path, overwrite=True, **kwargs)
    assert replaced["num_generated"] == 4 and replaced["weights_fingerprint"] == weights_fingerprint(second)

    # A dump of the previous version (no fingerprint recorded), same arguments: resumed, with a warning.
    manifest_path = tmp_path / "generation.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["identity"]["weights_fingerprint"]
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert generate_samples(second, tmp_path, **kwargs)["num_generated"] == 0
    assert "did not record the weights" in caplog.text
    assert json.loads(manifest_path.read_text())["identity"]["weights_fingerprint"] == weights_fingerprint(second)


def test_only_the_dumps_files_are_scored(tmp_path):
    dump = generate_samples(FakePipeline(), tmp_path, 30, batch_size=10, seed=1, show_progress=False)
    strays = [tmp_path / "999999.png", tmp_path / "stray.png"]
    rng = np.random.RandomState(0)
    for path in strays:
        Image.fromarray(rng.randint(0, 256, (16, 16), dtype=np.uint8)).save(path)
    assert dump_files(tmp_path) == [Path(path) for path in dump["files"]]
    kwargs = dict(feature_extractor=DIGITS_FEATURE_EXTRACTOR_NAME, metrics=["isc"])
    from_folder = compute_metrics(tmp_path, **kwargs)
    assert from_folder == compute_metrics(dump["files"], **kwargs)
    assert from_folder != compute_metrics(dump["files"] + strays, **kwargs)
    (tmp_path / "000003.png").unlink()
    with pytest.raises(EvaluationError, match="unfinished"):
        compute_metrics(tmp_path, **kwargs)


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
        (["--prior", "sde", "--flow_temperature", "0.7", "--metrics", "isc"], "--flow_temperature"),
        (["--snr", "0", "--reference", "digits"], "--snr"),
        # the prior and the sampler: flags the choice would ignore are refused
        (["--metrics", "isc", "--ode_solver", "euler"], "--ode_solver: only with --sampler ode"),
        (["--metrics", "isc", "--timestep_spacing", "karras"], "--timestep_spacing: only with --sampler ode"),
        (["--metrics", "isc", "--sampler", "ode", "--ode_solver", "rk45", "--num_inference_steps", "9"], "rk45"),
        (["--metrics", "isc", "--sampler", "ode", "--rtol", "1e-3"], "--rtol: rk45's tolerances"),
        (["--metrics", "isc", "--sampler", "ode", "--corrector", "none"], "--corrector: options of the PC sampler"),
        (["--metrics", "isc", "--sampler", "ode", "--ode_solver", "rk45", "--atol", "0"], "--atol must be"),
        (["--metrics", "isc", "--sampler", "sde"], "--sampler: must be one of"),
        (["--metrics", "isc", "--sampler", "baseline", "--prior", "flow"], "contradicts --prior flow"),
        # the likelihood's flags
        (["--metrics", "isc", "--num_bits", "5"], "--num_bits: only with --likelihood"),
        (["--metrics", "isc", "--no_dequantize"], "--no_dequantize: only with --likelihood"),
        (["--metrics", "none", "--likelihood", "--likelihood_batch_size", "0"], "--likelihood_batch_size"),
        (["--metrics", "none", "--likelihood", "--trace_estimator", "exact"], "--trace_estimator"),
        (["--reference", "cifar10-train", "--likelihood"], "--likelihood needs --likelihood_data"),
        (["--metrics", "none", "--likelihood", "--likelihood_data", "./no/such/folder"], "--likelihood_data"),
        (["--reference", "./does/not/exist"], "--reference"),
        (["--metrics", "isc", "--feature_extractor", "bogus"], "--feature_extractor"),
        (["--metrics", "isc", "--feature_extractor_weights_path", "./no/such/file"], "--feature_extractor_weights_path"),
        (
            ["--metrics", "isc", "--feature_extractor", "dinof-digits", "dinov2-hf-vit-l-14",
             "--feature_extractor_weights_path", str(tmp_path)],
            "NAME=PATH",
        ),
    ]  # fmt: skip
    for extra, flag in cases:
        with pytest.raises(SystemExit):
            evaluate.parse_args(base + extra)
        assert flag in capsys.readouterr().err
    args = evaluate.parse_args(base + ["--reference", "digits", "--metrics", "fid,isc"])
    assert args.feature_extractor == [DIGITS_FEATURE_EXTRACTOR_NAME] and args.metrics == ["fid", "isc"]
    (tmp_path / "classifier.pt").write_bytes(b"")
    args = evaluate.parse_args(
        base + ["--metrics", "isc", "--feature_extractor", "dinof-digits", "dinov2-hf-vit-l-14",
                "--feature_extractor_weights_path", "dinov2-hf-vit-l-14=facebook/dinov2-small",
                f"dinof-digits={tmp_path / 'classifier.pt'}"]
    )  # fmt: skip
    assert args.feature_extractor_weights == {
        "dinov2-hf-vit-l-14": "facebook/dinov2-small",
        "dinof-digits": str(tmp_path / "classifier.pt"),
    }
    # The sampler's defaults; the deprecated names still work and say what they mean.
    args = evaluate.parse_args(base + ["--metrics", "none", "--sampler", "ode"])
    assert (args.prior, args.ode_solver, args.timestep_spacing, args.rtol, args.atol) == (
        None,
        "heun",
        "uniform",
        1e-5,
        1e-5,
    )
    for old, prior in (("dinof", "flow"), ("baseline", "sde")):
        with pytest.warns(
            FutureWarning, match=f"--sampler {old} is deprecated: it means --prior {prior} --sampler pc"
        ):
            args = evaluate.parse_args(base + ["--metrics", "none", "--sampler", old])
        assert (args.prior, args.sampler) == (prior, "pc")
    args = evaluate.parse_args(base + ["--metrics", "none", "--likelihood"])
    assert (args.likelihood_data, args.likelihood_batch_size, args.trace_estimator, args.num_bits) == (
        "digits:test", 64, "rademacher", 8,
    )  # fmt: skip
    # The device: --device in a plain run, accelerate's under a multi-process launch (--device is then an error).
    launched = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    assert evaluate.resolve_device(args, launched) == torch.device("cpu")
    args.device = "cpu"
    assert evaluate.resolve_device(args, SimpleNamespace(num_processes=1, device=None)) == torch.device("cpu")
    with pytest.raises(EvaluationError, match="--device cpu is for plain one-process runs"):
        evaluate.resolve_device(args, launched)


def test_cli_end_to_end_and_resume(tmp_path, trained_tiny_pipeline_dir, tiny_dinov2_dir):
    evaluate = _load_evaluate_script()
    reference = tmp_path / "reference"  # 100 real digits: DINOv2 resizes every image to 224 x 224
    reference.mkdir()
    for index, image in enumerate(digits_images(8)[:100]):
        Image.fromarray(image).save(reference / f"{index:03d}.png")

    def run(output_dir, *extra):
        argv = [
            "--pipeline", str(trained_tiny_pipeline_dir), "--output_dir", str(output_dir), "--num_samples", "12",
            "--batch_size", "4", "--seed", "1", "--reference", str(reference), "--num_inference_steps", "3",
            "--snr", "0.1", "--device", "cpu", "--no_progress", *extra,
        ]  # fmt: skip
        return evaluate.main(argv)

    # FID with the digit classifier and FD-DINOv2 (a tiny random DINOv2, offline) from the same samples.
    report = run(
        tmp_path / "full",
        "--feature_extractor", DIGITS_FEATURE_EXTRACTOR_NAME, DINOV2_FEATURE_EXTRACTOR_NAME,
        "--feature_extractor_weights_path", f"{DINOV2_FEATURE_EXTRACTOR_NAME}={tiny_dinov2_dir}",
    )  # fmt: skip
    with open(tmp_path / "full" / "metrics.json") as file:
        written = json.load(file)
    assert written["metrics"] == report["metrics"]
    assert report["feature_extractors"] == [DIGITS_FEATURE_EXTRACTOR_NAME, DINOV2_FEATURE_EXTRACTOR_NAME]
    digits, dinov2 = report["metrics"][DIGITS_FEATURE_EXTRACTOR_NAME], report["metrics"][DINOV2_FEATURE_EXTRACTOR_NAME]
    expected = {"frechet_inception_distance", "kernel_inception_distance_mean", "precision", "recall"}
    assert set(digits) >= expected | {"classifier_confidence_score_mean"} and set(dinov2) >= expected
    assert all(math.isfinite(value) for values in (digits, dinov2) for value in values.values())
    assert digits["frechet_inception_distance"] != dinov2["frechet_inception_distance"]
    # 3 reverse steps, each a corrector and a predictor evaluation.
    assert report["nfe"] == 6 and report["seconds_per_image"] > 0
    throughput = report["throughput"]
    assert report["num_processes"] == 1 and throughput["num_images"] == 12
    assert throughput["nfe_per_second"] == pytest.approx(6 * throughput["images_per_second"])
    assert report["sampler"] == {
        "prior": "flow",
        "sampler": "pc",
        "use_flow_prior": True,
        "num_inference_steps": 3,
        "flow_temperature": 1.0,
    }
    assert report["scheduler"]["config"]["snr"] == 0.1
    assert report["model"]["flow_prior"]["num_levels"] == 2
    assert set(report["model"]["weights_fingerprint"]) == {"unet", "flow_prior"}
    assert report["digits_classifier"]["held_out_accuracy"] >= 0.97

    # Interrupted: a partial dump (files of two batches gone), then the same command again.
    partial = tmp_path / "partial"
    run(partial, "--metrics", "none")
    for name in ("000001.png", "000002.png", "000011.png"):
        (partial / "samples" / name).unlink()
    resumed = run(partial, "--feature_extractor", DIGITS_FEATURE_EXTRACTOR_NAME)
    full_samples = sorted((tmp_path / "full" / "samples").glob("*.png"))
    assert [path.name for path in full_samples] == sorted(path.name for path in (partial / "samples").glob("*.png"))
    for path in full_samples:
        assert filecmp.cmp(path, partial / "samples" / path.name, shallow=False), path.name
    assert resumed["metrics"] == {DIGITS_FEATURE_EXTRACTOR_NAME: digits}
    assert resumed["throughput"]["num_images"] == 8

    # The baseline sampler: the full PC sampler from the SDE prior, no flow (in the deprecated spelling, whose dump
    # is the one --prior sde makes: same manifest).
    baseline_args = [
        "--pipeline", str(trained_tiny_pipeline_dir), "--output_dir", str(tmp_path / "baseline"), "--num_samples", "4",
        "--batch_size", "4", "--num_inference_steps", "2", "--corrector", "none", "--metrics", "isc",
        "--feature_extractor", "dinof-digits", "--device", "cpu", "--no_progress",
    ]  # fmt: skip
    with pytest.warns(FutureWarning, match="--prior sde --sampler pc"):
        baseline = evaluate.main(baseline_args + ["--sampler", "baseline"])
    assert baseline["nfe"] == 2 and baseline["sampler"]["use_flow_prior"] is False
    assert baseline["sampler"]["prior"] == "sde" and baseline["sampler"]["sampler"] == "pc"
    manifest = json.loads((tmp_path / "baseline" / "samples" / "generation.json").read_text())
    assert manifest["identity"]["sampler_kwargs"] == {"use_flow_prior": False, "num_inference_steps": 2}  # as before
    assert math.isfinite(baseline["metrics"][DIGITS_FEATURE_EXTRACTOR_NAME]["classifier_confidence_score_mean"])
    again = evaluate.main(baseline_args + ["--prior", "sde"])
    assert again["throughput"] is None and again["metrics"] == baseline["metrics"]  # nothing generated again

    # The probability-flow ODE (heun, 3 steps: NFE 5) into the same folder: a PC dump is not an ODE dump.
    ode_args = [
        "--pipeline", str(trained_tiny_pipeline_dir), "--output_dir", str(tmp_path / "baseline"), "--num_samples", "4",
        "--batch_size", "4", "--metrics", "none", "--device", "cpu", "--no_progress", "--sampler", "ode",
        "--ode_solver", "heun", "--num_inference_steps", "3", "--timestep_spacing", "karras",
    ]  # fmt: skip
    with pytest.raises(EvaluationError, match="other arguments .differing: sampler_kwargs"):
        evaluate.main(ode_args)
    ode = evaluate.main(ode_args + ["--output_dir", str(tmp_path / "ode")])
    assert ode["nfe"] == 5 and ode["sampler"] == {
        "prior": "flow", "sampler": "ode", "use_flow_prior": True, "num_inference_steps": 3, "flow_temperature": 1.0,
        "ode_solver": "heun", "timestep_spacing": "karras",
    }  # fmt: skip
    identity = json.loads((tmp_path / "ode" / "samples" / "generation.json").read_text())["identity"]
    assert identity["sampler_kwargs"] == {key: value for key, value in ode["sampler"].items() if key != "prior"}


def test_cli_refuses_a_prior_or_sampler_the_pipeline_cannot_run_before_any_work(tmp_path, capsys):
    from test_pipeline import tiny_pipeline

    evaluate = _load_evaluate_script()
    flowless, discrete = tiny_pipeline(flow=False), tiny_pipeline(continuous=False)
    cases = [
        (flowless, ["--prior", "flow"], "--prior flow needs a pipeline with a flow prior"),
        (flowless, ["--flow_temperature", "0.5"], "--flow_temperature has no effect: this pipeline has no flow prior"),
        (discrete, ["--sampler", "ode"], "--sampler ode: .*continuous-time model"),
        (discrete, ["--likelihood"], "--likelihood needs a continuous-time model"),
    ]
    base = ["--pipeline", str(tmp_path), "--output_dir", str(tmp_path / "eval"), "--metrics", "none", "--no_progress"]
    for pipeline, flags, message in cases:
        with pytest.raises(EvaluationError, match=message):
            evaluate.evaluate(evaluate.parse_args(base + flags), pipeline)
    assert not (tmp_path / "eval").exists()
    # from the command line: a usage error (exit status 2), as for the flags argparse checks itself
    flowless.save_pretrained(tmp_path / "flowless")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(base[2:] + ["--pipeline", str(tmp_path / "flowless"), "--prior", "flow"])
    assert exit_info.value.code == 2 and "error: --prior flow needs" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_cli_likelihood_is_evaluate_likelihood_resumable_and_refuses_other_records(
    tmp_path, trained_tiny_pipeline_dir, monkeypatch
):
    from trained_pipeline import digits_tensor

    from dinof_diffusers import DiNofPipeline
    from dinof_diffusers.evaluation import batch_seed, evaluate_likelihood

    evaluate = _load_evaluate_script()
    argv = [
        "--pipeline", str(trained_tiny_pipeline_dir), "--output_dir", str(tmp_path), "--metrics", "none",
        "--likelihood", "--likelihood_max_samples", "5", "--likelihood_batch_size", "2", "--seed", "3",
        "--rtol", "1e-2", "--atol", "1e-2", "--device", "cpu", "--no_progress",
    ]  # fmt: skip
    report = evaluate.main(argv)
    assert not (tmp_path / "samples").exists()  # --metrics none --likelihood: the likelihood alone
    likelihood = json.loads((tmp_path / "metrics.json").read_text())["likelihood"]
    assert likelihood == json.loads(json.dumps(report["likelihood"]))
    assert likelihood["data"] == "digits:test" and likelihood["num_images"] == 5 and likelihood["batch_size"] == 2

    # the first 5 of the 297 held-out digits through evaluate_likelihood directly, same seed and batches
    pipeline = DiNofPipeline.from_pretrained(trained_tiny_pipeline_dir)
    direct = evaluate_likelihood(
        pipeline, digits_tensor(split="test")[:5], batch_size=2, seed=3, rtol=1e-2, atol=1e-2, show_progress=False
    )
    for prior in ("flow", "sde"):
        assert likelihood["priors"][prior] == dataclasses.asdict(direct.priors[prior])
        assert math.isfinite(likelihood["priors"][prior]["bits_per_dim"]) and likelihood["nfe"][prior] > 0
    assert likelihood["difference"] == dataclasses.asdict(direct.difference)
    assert likelihood["settings"] == {
        "num_bits": 8, "dequantize": True, "trace_estimator": "rademacher", "rtol": 1e-2, "atol": 1e-2,
    }  # fmt: skip

    # Interrupted after its first round: only the other batches are computed again, with the same result.
    records_path = tmp_path / "likelihood.json"
    records = json.loads(records_path.read_text())
    assert sorted(records["batches"]) == ["0", "1", "2"]
    records["batches"] = {"1": records["batches"]["1"]}
    records_path.write_text(json.dumps(records))
    computed, log_likelihood = [], DiNofPipeline.log_likelihood

    def counted(self, images, **kwargs):
        computed.append(kwargs["generator"].initial_seed())
        return log_likelihood(self, images, **kwargs)

    monkeypatch.setattr(DiNofPipeline, "log_likelihood", counted)
    resumed = evaluate.main(argv)
    assert computed == [batch_seed(3, index) for index in (0, 0, 2, 2)]  # batches 0 and 2, both priors
    resumed["likelihood"].pop("seconds_per_image"), report["likelihood"].pop("seconds_per_image")
    assert resumed["likelihood"] == report["likelihood"]
    assert sorted(json.loads(records_path.read_text())["batches"]) == ["0", "1", "2"]
    # records of other settings are refused, not mixed
    with pytest.raises(EvaluationError, match="likelihood records .*other arguments .differing: batch_size"):
        evaluate.main(argv + ["--likelihood_batch_size", "3"])


class RefusingPipeline:
    """Fails the test if a sample is drawn."""

    scheduler = None

    def __call__(self, *args, **kwargs):
        raise AssertionError("a sample was generated before the metrics' inputs were fetched")


def _offline(*args, **kwargs):
    raise urllib.error.URLError("network unreachable (offline test)")


@pytest.mark.parametrize("missing", ["inception_weights", "cifar10", "dinov2_offline"])
def test_a_reference_or_extractor_that_cannot_be_fetched_fails_before_any_sample(tmp_path, monkeypatch, missing):
    evaluate = _load_evaluate_script()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch-fidelity's downloads: nothing cached
    if missing == "inception_weights":
        import torch_fidelity.feature_extractor_inceptionv3 as inception

        monkeypatch.setattr(inception, "load_state_dict_from_url", _offline)
        flags, named = ["--reference", "cifar10-train", "--feature_extractor", "inception-v3-compat"], "inception"
    elif missing == "cifar10":
        import torchvision.datasets.cifar as cifar

        monkeypatch.setattr(cifar, "download_and_extract_archive", _offline)
        flags, named = ["--reference", "cifar10-train", "--feature_extractor", "dinof-digits"], "cifar10-train"
    else:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        flags, named = ["--metrics", "isc", "--feature_extractor", "dinov2-hf-vit-s-14"], "dinov2-hf-vit-s-14"
    base = ["--pipeline", str(tmp_path), "--output_dir", str(tmp_path / "eval"), "--device", "cpu", "--no_progress"]
    args = evaluate.parse_args(base + flags)
    with pytest.raises(EvaluationError, match=f"(?s)'{named}.*(Offline|network access)"):
        evaluate.evaluate(args, RefusingPipeline())
    assert not (tmp_path / "eval" / "samples").exists()


# ------------------------------------------------------------------------------------------------------------------
# Several processes (accelerate launch, gloo on the CPU)
# ------------------------------------------------------------------------------------------------------------------

# Runs evaluate.py's main() and logs, per process, the batches it drew (their generators' seeds) and every scoring.
LOGGING_LAUNCHER = """
import importlib.util, json, os, sys
from dinof_diffusers.evaluation.distributed import process_state
from dinof_diffusers.pipelines.dinof import DiNofPipeline

spec = importlib.util.spec_from_file_location("evaluate_script", sys.argv[1])
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)
log_path = os.path.join(sys.argv[2], f"rank{process_state().process_index}.jsonl")

def log(**event):
    with open(log_path, "a") as file:
        file.write(json.dumps(event) + "\\n")

sample, score, likelihood = DiNofPipeline.__call__, evaluate.compute_metrics, DiNofPipeline.log_likelihood

def logged_sample(self, *args, **kwargs):
    log(event="batch", seed=kwargs["generator"].initial_seed(), size=kwargs["batch_size"])
    return sample(self, *args, **kwargs)

def logged_score(*args, **kwargs):
    log(event="score")
    return score(*args, **kwargs)

def logged_likelihood(self, images, **kwargs):
    log(event="likelihood", seed=kwargs["generator"].initial_seed(), flow=kwargs["use_flow_prior"])
    return likelihood(self, images, **kwargs)

DiNofPipeline.__call__, evaluate.compute_metrics = logged_sample, logged_score
DiNofPipeline.log_likelihood = logged_likelihood
evaluate.main(sys.argv[3:])
"""


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_two_processes(tmp_path, argv):
    """evaluate.py under `accelerate launch` with two gloo CPU processes (one thread each) through the logging
    launcher; returns the finished process and each rank's logged events."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "launcher.py").write_text(LOGGING_LAUNCHER)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(_free_port()), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(tmp_path / "launcher.py"), str(REPO_ROOT / "training_scripts" / "evaluate.py"),
        str(tmp_path / "logs"), *argv,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TQDM_MININTERVAL": "1000",  # the bar is drawn when it opens and when it closes
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    logs = [
        [json.loads(line) for line in (tmp_path / "logs" / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    return result, logs


def test_two_processes_finish_a_killed_dump_identically_each_doing_its_share_score_once_and_share_the_likelihood(
    tmp_path, trained_tiny_pipeline_dir, monkeypatch
):
    from dinof_diffusers import DiNofPipeline
    from dinof_diffusers.evaluation import batch_seed

    evaluate = _load_evaluate_script()
    common = [
        "--pipeline", str(trained_tiny_pipeline_dir), "--num_samples", "14", "--batch_size", "2", "--seed", "4",
        "--num_inference_steps", "2", "--metrics", "isc", "--feature_extractor", DIGITS_FEATURE_EXTRACTOR_NAME,
        "--likelihood", "--likelihood_max_samples", "6", "--likelihood_batch_size", "2", "--rtol", "1e-3",
        "--atol", "1e-3",
    ]  # fmt: skip
    one = evaluate.main(common + ["--output_dir", str(tmp_path / "one"), "--device", "cpu", "--no_progress"])

    # One process killed in its fourth batch, and what a kill can leave besides: a half-written temporary file, a
    # truncated PNG of a finished batch; and a stray image that is not part of the dump.
    sample, calls = DiNofPipeline.__call__, []

    def killed_in_fourth_batch(self, *args, **kwargs):
        calls.append(kwargs["batch_size"])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return sample(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DiNofPipeline, "__call__", killed_in_fourth_batch)
        with pytest.raises(KeyboardInterrupt):
            evaluate.main(common + ["--output_dir", str(tmp_path / "two"), "--device", "cpu", "--no_progress"])
    samples = tmp_path / "two" / "samples"
    (samples / ".tmp-000007.png-x1").write_bytes(b"half a PNG")
    (samples / "000002.png").write_bytes((samples / "000002.png").read_bytes()[:30])
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(samples / "stray.png")

    # ... finished by two processes.
    result, logs = _launch_two_processes(tmp_path, [*common, "--output_dir", str(tmp_path / "two")])

    # The dump is the one-process dump, byte for byte; the stray image is neither removed nor scored.
    names = sorted(path.name for path in (tmp_path / "one" / "samples").glob("*.png"))
    assert sorted(path.name for path in samples.glob("*.png")) == sorted(names + ["stray.png"])
    for name in names:
        assert filecmp.cmp(tmp_path / "one" / "samples" / name, samples / name, shallow=False), name
    assert not list(samples.glob(".tmp-*"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["metrics"] == one["metrics"]

    # Batch 1 (truncated PNG) and batches 3 to 6 remained, dealt out round-robin: [1, 3], [4, 5], [6].
    seeds = [[event["seed"] for event in log if event["event"] == "batch"] for log in logs]
    assert seeds == [[batch_seed(4, index) for index in (1, 4, 6)], [batch_seed(4, index) for index in (3, 5)]]
    batches = json.loads((samples / "generation.json").read_text())["batches"]
    assert {index: batches[str(index)]["process_index"] for index in (1, 3, 4, 5, 6)} == {1: 0, 3: 1, 4: 0, 5: 1, 6: 0}
    # Scored once, by the main process; one progress bar, counting both processes' images.
    assert [event["event"] for event in logs[0] if event["event"] == "score"] == ["score"]
    assert not [event for event in logs[1] if event["event"] == "score"]
    assert result.stderr.count("Generating:") == 2 and result.stderr.count("14/14") == 1
    assert two["num_processes"] == 2 and two["throughput"]["num_images"] == 10
    assert two["throughput"]["nfe_per_second"] == pytest.approx(two["nfe"] * two["throughput"]["images_per_second"])

    # The likelihood (6 test digits, 3 batches): [0, 1], [2] dealt out round-robin, each batch under both priors with
    # its own seed; the 1-process value; the records written by the main process; one bar.
    seeds = [[event["seed"] for event in log if event["event"] == "likelihood"] for log in logs]
    assert seeds == [[batch_seed(4, 0)] * 2 + [batch_seed(4, 2)] * 2, [batch_seed(4, 1)] * 2]
    estimates = {**one["likelihood"]["priors"], "difference": one["likelihood"]["difference"]}
    shared = {**two["likelihood"]["priors"], "difference": two["likelihood"]["difference"]}
    for name, estimate in estimates.items():
        for field in ("bits_per_dim", "bits_per_dim_se", "nats", "nats_se"):
            assert shared[name][field] == pytest.approx(estimate[field], rel=1e-6), (name, field)
    assert two["likelihood"]["num_images"] == 6 and two["likelihood"]["nfe"] == one["likelihood"]["nfe"]
    assert (one["likelihood"]["num_processes"], two["likelihood"]["num_processes"]) == (1, 2)
    assert sorted(json.loads((tmp_path / "two" / "likelihood.json").read_text())["batches"]) == ["0", "1", "2"]
    assert result.stderr.count("bits/dim:   0%") == 1
