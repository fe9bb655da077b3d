#!/usr/bin/env python
# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Where does the flow prior pay? The headroom of x(t*) over its best Gaussian, and how much of it a prior captures.

No prior of x(t*) can gain more over the moment-matched Gaussian than the KL divergence of x(t*) from it, the
*headroom* (and the reverse SDE cannot amplify a prior's error). For a saved pipeline and a data set with its
training and held-out images kept apart, this script measures at the pipeline's t* (or at every `--t_star`):

- the negative log-likelihood (bits/dim, and nats per image) of held-out x(t*) = a x0 + s n (`--num_draws` noise
  draws per image) under the pipeline's prior and every `--prior`, the diagonal and the full moment-matched
  Gaussian (closed form) and the exact marginal of the training images (a Gaussian mixture);
- the headroom both ways: full Gaussian - mixture on noisy training images (an upper estimate) and on held-out
  images (a lower one), and each prior's share = held-out (full Gaussian - prior) / upper headroom; every
  difference paired over the same points, with its standard error (dinof_diffusers.evaluation.flow_gain);
- with `--samples N`: sample quality of every prior, of both Gaussians and of the baseline PC sampler from T at the
  same NFE (int(N t*) steps on the `--num_train_timesteps` grid; the same start noise and generator for every row),
  and of the baseline with all `--baseline_n` steps: the Fréchet distance in a fixed feature space and the
  nearest-neighbour distance to the training images against the held-out images', with bootstrap intervals
  (dinof_diffusers.evaluation.sample_quality).

It writes `flow_gain.json`, `flow_gain.md` (tables) and `flow_gain.png` (headroom and gains against t*, quality
against NFE) in `--output_dir`. Every part is recorded in the JSON as it finishes, with the settings it was made
with: a rerun skips the parts that are done (sample dumps resume batch by batch) and redoes those whose settings
changed.

    # the embedded digits (the fixed 1,500 / 297 split) for a pipeline trained on them
    python training_scripts/flow_gain.py --pipeline outputs/demo/pipeline --output_dir outputs/flow_gain
    # a flow-free pipeline: the Gaussians and the headroom at several t*, and samples from the Gaussian priors
    python training_scripts/flow_gain.py --pipeline my-score-model --t_star 0.2 0.4 0.6 --samples 500 \\
        --dataset_name cifar10 --image_column img --output_dir outputs/flow_gain
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dinof_diffusers import DiNofPipeline, DiNofScheduler, GaussianPriorModel
from dinof_diffusers.data import digits_images, sample_patches
from dinof_diffusers.evaluation import generate_samples
from dinof_diffusers.evaluation.flow_gain import (
    BUILTIN_MODELS,
    GAUSSIAN_DIAGONAL,
    GAUSSIAN_FULL,
    MIXTURE,
    flow_gain,
    images_to_tensor,
)
from dinof_diffusers.evaluation.sample_quality import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_PCA_COMPONENTS,
    PCA_FEATURES,
    QualityReference,
    format_interval,
)
from dinof_diffusers.file_utils import write_json_atomically, write_text_atomically
from dinof_diffusers.image_utils import save_figure_atomically
from dinof_diffusers.models.gaussian_prior import estimate_image_moments
from dinof_diffusers.validation import check_int, check_number, check_positive_int

EMBEDDED = ("digits", "patches")
BASELINE = "baseline"
GAUSSIANS = {GAUSSIAN_FULL: "full", GAUSSIAN_DIAGONAL: "diagonal"}
RESULTS_NAME = "flow_gain.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pipeline", required=True, help="Folder or Hub id of a saved DiNofPipeline (prior optional)."
    )
    parser.add_argument("--revision", default=None, help="Hub revision of --pipeline.")
    parser.add_argument("--cache_dir", default=None, help="Where Hub models and data sets are cached.")
    parser.add_argument("--output_dir", required=True, help="flow_gain.json, flow_gain.md, flow_gain.png, samples/.")
    data = parser.add_argument_group("data (default: the embedded digits, their fixed 1,500 / 297 split)")
    data.add_argument("--dataset_name", default=None, help="A Hub data set, or a local folder load_dataset reads.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="An imagefolder; its train/ and test/ are the splits.")
    data.add_argument(
        "--embedded_dataset", default=None, choices=EMBEDDED, help="digits, or the 16x16 sample patches."
    )
    data.add_argument("--image_column", default="image")
    data.add_argument("--train_split", default="train")
    data.add_argument("--test_split", default="test")
    data.add_argument(
        "--test_fraction",
        type=float,
        default=0.1,
        help="Without a --test_split in the data: hold out this seeded fraction of the training split instead.",
    )
    data.add_argument("--max_test_images", type=int, default=None, help="At most this many held-out images.")
    nll = parser.add_argument_group("likelihoods")
    nll.add_argument("--t_star", type=float, nargs="+", default=None, help="Times t* / T (default: the priors').")
    nll.add_argument(
        "--prior",
        action="append",
        default=[],
        metavar="NAME=PIPELINE",
        help="Another prior to compare (repeatable): the flow_prior of a saved pipeline with the same SDE, at its t*.",
    )
    nll.add_argument("--num_draws", type=int, default=4, help="Noise draws per image.")
    nll.add_argument(
        "--max_train_points", type=int, default=2000, help="Noisy training images for the upper estimate."
    )
    nll.add_argument("--seed", type=int, default=0, help="Seed of the noise draws and of the samples.")
    nll.add_argument("--skip_nll", action="store_true", help="Sample quality only.")
    quality = parser.add_argument_group("sample quality")
    quality.add_argument("--samples", type=int, default=0, help="Samples per row; 0: no sampling.")
    quality.add_argument("--sample_batch_size", type=int, default=250)
    quality.add_argument(
        "--num_train_timesteps", type=int, default=None, help="N of the sampling grid (default: the pipeline's)."
    )
    quality.add_argument(
        "--sample_models", nargs="+", default=None, help="Rows to sample (prior names, gaussian_*, baseline); all."
    )
    quality.add_argument(
        "--baseline_n", type=int, nargs="*", default=[], help="Also the baseline with all N steps of an N grid."
    )
    quality.add_argument(
        "--quality_features",
        default=None,
        help="pca, or a torch-fidelity feature extractor (default: dinof-digits for the digits, else pca).",
    )
    quality.add_argument("--pca_components", type=int, default=DEFAULT_PCA_COMPONENTS)
    quality.add_argument("--num_bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
    args = parser.parse_args(argv)
    try:
        if sum(x is not None for x in (args.dataset_name, args.train_data_dir, args.embedded_dataset)) > 1:
            raise ValueError("Give at most one of --dataset_name, --train_data_dir and --embedded_dataset.")
        if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
            raise ValueError(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
        check_number(args.test_fraction, "--test_fraction", 0.0, 1.0, exclusive_minimum=True, exclusive_maximum=True)
        for t in args.t_star or ():
            check_number(t, "--t_star", 0.0, 1.0, exclusive_minimum=True)
        for flag in ("num_draws", "sample_batch_size", "pca_components"):
            check_positive_int(getattr(args, flag), f"--{flag}")
        check_int(args.max_train_points, "--max_train_points", minimum=2)
        for flag in ("samples", "seed", "num_bootstrap"):
            check_int(getattr(args, flag), f"--{flag}", minimum=0)
        check_int(args.max_test_images, "--max_test_images", minimum=2, allow_none=True)
        check_int(args.num_train_timesteps, "--num_train_timesteps", minimum=2, allow_none=True)
        for n in args.baseline_n:
            check_int(n, "--baseline_n", minimum=2)
        if args.samples == 1:
            raise ValueError("--samples must be 0 (no sampling) or >= 2.")
        args.prior = [_prior_argument(value) for value in args.prior]
    except ValueError as error:
        parser.error(str(error))
    return args


def _prior_argument(value: str):
    name, separator, path = value.partition("=")
    if not separator or not name or not path:
        raise ValueError(f"--prior must be NAME=PIPELINE, got {value!r}.")
    if name in (*BUILTIN_MODELS, BASELINE):
        raise ValueError(f"--prior {value!r}: {name!r} is a built-in row; choose another name.")
    return name, path


# ---------------------------------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------------------------------


def _to_uint8(images, resolution: int, channels: int) -> np.ndarray:
    """PIL images or uint8 arrays -> uint8 (N, H, W) (one channel) or (N, H, W, 3) at `resolution`: resized (bilinear,
    the shorter side) and centre-cropped, as train.py's transforms without augmentation."""
    from torchvision import transforms

    resize = transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
        ]
    )
    mode = "L" if channels == 1 else "RGB"
    out = []
    for image in images:
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        out.append(np.asarray(resize(image.convert(mode))))
    return np.stack(out)


def load_image_splits(args, resolution: int, channels: int):
    """(train, test, description): uint8 images at the pipeline's size and channels, disjoint splits."""
    if args.dataset_name is None and args.train_data_dir is None:
        name = args.embedded_dataset or "digits"
        if name == "digits":
            train, test = (digits_images(resolution, split=split) for split in ("train", "test"))
            description = "the embedded digits (fixed split: 1,500 train / 297 test)"
        else:
            train, test = (sample_patches(split, size=resolution) for split in ("train", "test"))
            description = "the sample-image patches (train: left three quarters, test: right quarter)"
        return _to_uint8(train, resolution, channels), _to_uint8(test, resolution, channels), description

    from datasets import load_dataset

    if args.dataset_name is not None:
        splits = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
        description = args.dataset_name
    else:
        splits = load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir)
        description = f"the images in {args.train_data_dir}"
    if args.train_split not in splits:
        raise ValueError(f"The data set has no split {args.train_split!r} (--train_split): {list(splits)}.")
    train = splits[args.train_split]
    if args.image_column not in train.column_names:
        raise ValueError(f"--image_column {args.image_column!r} is not a column of the data: {train.column_names}.")
    if args.test_split in splits:
        test = splits[args.test_split]
        description += f" (splits {args.train_split} / {args.test_split})"
    else:
        held_out = train.train_test_split(test_size=args.test_fraction, seed=0)
        train, test = held_out["train"], held_out["test"]
        description += (
            f" ({args.test_fraction:g} of {args.train_split} held out, seed 0: no {args.test_split!r} split)"
        )
    return (
        _to_uint8(train[args.image_column], resolution, channels),
        _to_uint8(test[args.image_column], resolution, channels),
        description,
    )


def fingerprint(*values) -> str:
    """A short hash of arrays, tensors, state dicts and JSON-able values."""
    digest = hashlib.sha256()
    for value in values:
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            for key, tensor in sorted(value.items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, np.ndarray):
            digest.update(np.ascontiguousarray(value).tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def as_json(value):
    """`value` as it reads back from JSON (tuples become lists), so that recorded settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def scheduler_settings(scheduler) -> dict:
    """The SDE of a scheduler: its configuration without the sampler's t* and grid."""
    skip = {"flow_start", "num_train_timesteps"}
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_") and k not in skip}


def load_priors(args, pipeline):
    """[(name, t*, prior, fingerprint)]: the pipeline's own prior ("flow", or "prior" if not a flow) and --prior's."""
    priors = []
    if pipeline.flow_prior is not None:
        name = "prior" if isinstance(pipeline.flow_prior, GaussianPriorModel) else "flow"
        priors.append((name, pipeline.scheduler.t_star, pipeline.flow_prior))
    for name, path in args.prior:
        other = DiNofPipeline.from_pretrained(path, cache_dir=args.cache_dir)
        if other.flow_prior is None:
            raise ValueError(f"--prior {name}={path}: that pipeline has no flow_prior.")
        if scheduler_settings(other.scheduler) != scheduler_settings(pipeline.scheduler):
            raise ValueError(f"--prior {name}={path}: its scheduler's SDE differs from --pipeline's.")
        priors.append((name, other.scheduler.t_star, other.flow_prior))
    for name, t, prior in priors:
        prior.eval().requires_grad_(False)
        if sum(other == name and abs(other_t - t) < 1e-9 for other, other_t, _ in priors) > 1:
            raise ValueError(f"--prior: two priors named {name!r} at t* = {t:g}; one name per t*.")
    return [(name, t, prior, fingerprint(prior.state_dict())) for name, t, prior in priors]


class RowSampler:
    """A pipeline for `generate_samples` whose extra keywords (`row`, `weights`) only name the dump's identity."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __getattr__(self, name):  # scheduler, set_progress_bar_config
        return getattr(self.pipeline, name)

    def __call__(self, row=None, weights=None, **kwargs):
        return self.pipeline(**kwargs)


def samples_folder(row_name: str) -> str:
    """The dump of a row, relative to --output_dir."""
    return os.path.join("samples", row_name.replace("/", "-"))


def read_uint8_images(files):
    return np.stack([np.asarray(Image.open(path)) for path in files])


# ---------------------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------------------


def t_key(t: float) -> str:
    return f"{t:g}"


def run_nll(results, context, t, save):
    args, priors = context["args"], [p for p in context["priors"] if abs(p[1] - t) < 1e-9]
    key = {
        "data": context["data_fingerprint"],
        "sde": scheduler_settings(context["pipeline"].scheduler),
        "priors": {name: weights for name, _, _, weights in priors},
        "num_draws": args.num_draws,
        "seed": args.seed,
        "max_train_points": args.max_train_points,
    }
    key = as_json(key)
    entry = results["nll"].get(t_key(t))
    if entry is not None and entry["key"] == key:
        return
    scheduler = DiNofScheduler.from_config(context["pipeline"].scheduler.config, flow_start=t)
    start = time.perf_counter()
    result = flow_gain(
        context["train"],
        context["test"],
        scheduler,
        priors={name: prior for name, _, prior, _ in priors},
        num_draws=args.num_draws,
        seed=args.seed,
        max_train_points=args.max_train_points,
        moments=context["moments"],
    )
    results["nll"][t_key(t)] = {"key": key, "seconds": time.perf_counter() - start, **result.to_dict()}
    save()


def sample_rows(args, priors, t_stars):
    """[(row, model, t or None, grid N or None)] in sampling order."""
    rows = []
    for t in t_stars:
        names = [name for name, prior_t, _, _ in priors if abs(prior_t - t) < 1e-9] + [*GAUSSIANS, BASELINE]
        rows += [(f"t{t_key(t)}/{name}", name, t, None) for name in names]
    rows += [(f"N{n}/{BASELINE}", BASELINE, None, n) for n in args.baseline_n]
    if args.sample_models is not None:
        rows = [row for row in rows if row[1] in args.sample_models]
    return rows


def run_samples(results, context, row, save):
    args, pipeline = context["args"], context["pipeline"]
    row_name, model, t, grid_n = row
    base = dict(pipeline.scheduler.config)
    grid_n = grid_n or args.num_train_timesteps or base["num_train_timesteps"]
    scheduler = DiNofScheduler.from_config(base, flow_start=t or base["flow_start"], num_train_timesteps=grid_n)
    steps = grid_n if t is None else scheduler.num_flow_steps
    prior, weights = None, None
    if model in GAUSSIANS:
        prior = GaussianPriorModel.from_moments(context["moments"], scheduler, covariance=GAUSSIANS[model])
        weights = fingerprint(prior.state_dict())
    elif model != BASELINE:
        prior, weights = next(
            (p, w) for name, prior_t, p, w in context["priors"] if name == model and abs(prior_t - t) < 1e-9
        )
    key = {
        "data": context["data_fingerprint"],
        "unet": context["unet_fingerprint"],
        "prior": weights,
        "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        "steps": steps,
        "samples": args.samples,
        "batch_size": args.sample_batch_size,
        "seed": args.seed,
        "features": context["reference"].features,
        "num_bootstrap": args.num_bootstrap,
    }
    key = as_json(key)
    entry = results["quality"].get(row_name)
    if entry is not None and entry["key"] == key:
        return
    sampler = DiNofPipeline(unet=pipeline.unet, scheduler=scheduler, flow_prior=prior)
    dump = generate_samples(
        RowSampler(sampler),
        Path(args.output_dir) / samples_folder(row_name),
        num_samples=args.samples,
        batch_size=args.sample_batch_size,
        seed=args.seed,
        overwrite=True,
        num_inference_steps=steps,
        use_flow_prior=prior is not None,
        row=row_name,
        weights=weights,
    )
    quality = context["reference"].score(read_uint8_images(dump["files"]), args.num_bootstrap, seed=args.seed)
    results["quality"][row_name] = {
        "key": key,
        "model": model,
        "t_star": t,
        "n": grid_n,
        "steps": steps,
        "nfe": dump["nfe"],
        "seconds_per_image": dump["seconds_per_image"],
        **quality.to_dict(),
    }
    save()


def paired_differences(results, context):
    """FD(row) - FD(full Gaussian) at each t*, paired sample by sample (same seeds)."""
    args, rows = context["args"], results["quality"]
    for row_name, entry in rows.items():
        reference_row = f"t{t_key(entry['t_star'])}/{GAUSSIAN_FULL}" if entry.get("t_star") is not None else None
        if reference_row is None or reference_row == row_name or reference_row not in rows:
            continue
        other = rows[reference_row]
        if other["key"]["samples"] != entry["key"]["samples"] or other["key"]["seed"] != entry["key"]["seed"]:
            continue
        folders = [Path(args.output_dir) / samples_folder(name) for name in (row_name, reference_row)]
        images = [read_uint8_images(sorted(folder.glob("*.png"))) for folder in folders]
        difference = context["reference"].paired_fd_difference(*images, args.num_bootstrap, seed=args.seed)
        entry["fd_minus_gaussian_full"] = asdict(difference)


def data_rows(results, context):
    """The real images scored like samples: held-out images, and as many training images as samples (the FD's floor
    at that count; their nearest neighbour is themselves)."""
    args, reference = context["args"], context["reference"]
    count = args.samples or len(context["test_uint8"])
    order = np.random.default_rng(args.seed).permutation(len(context["train_uint8"]))[:count]
    for name, images in (("data/test", context["test_uint8"]), ("data/train", context["train_uint8"][np.sort(order)])):
        quality = reference.score(images, args.num_bootstrap, seed=args.seed)
        results["quality"][name] = {"model": name, "t_star": None, "n": None, "nfe": 0, **quality.to_dict()}


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _estimate(estimate, digits=4):
    if not estimate:
        return "-"
    return f"{estimate['bits_per_dim']:.{digits}f} ± {estimate['bits_per_dim_se']:.{digits}f}"


def markdown_report(results) -> str:
    meta = results["meta"]
    lines = [
        f"# Flow gain: {meta['pipeline']}",
        "",
        f"Data: {meta['data']} ({meta['num_train']} training, {meta['num_test']} held-out images, "
        f"{meta['image_shape']}). SDE: {meta['sde']}. Command: `{meta['command']}`",
    ]
    nll = results["nll"]
    if nll:
        priors = sorted({name for entry in nll.values() for name in entry["shares"]})
        lines += [
            "",
            "## Likelihoods of x(t*) (bits/dim, ± standard error over images)",
            "",
            "headroom = full Gaussian - exact mixture of the training images: upper estimate on noisy training "
            "images, lower on held-out ones; gain = held-out full Gaussian - prior (positive: the prior fits better); "
            "share = gain / upper headroom; nats per image = bits/dim x D ln 2.",
            "",
            "| t* | held-out NLL: mixture | full Gaussian | diagonal | headroom (train, upper) | headroom (held-out, "
            "lower) | diagonal - full | " + " | ".join(f"{p}: gain | {p}: share" for p in priors) + " |",
            "|---:|" + "---:|" * (6 + 2 * len(priors)),
        ]
        for key in sorted(nll, key=float):
            entry = nll[key]
            test, diffs = entry["nll"]["test"], entry["differences"]["test"]
            cells = [
                key,
                _estimate(test.get(MIXTURE)),
                _estimate(test.get(GAUSSIAN_FULL)),
                _estimate(test.get(GAUSSIAN_DIAGONAL)),
                _estimate(entry["headroom_train"]),
                _estimate(entry["headroom_test"]),
                _estimate(diffs.get(f"{GAUSSIAN_DIAGONAL} - {GAUSSIAN_FULL}")),
            ]
            for prior in priors:
                gain, share = diffs.get(f"{GAUSSIAN_FULL} - {prior}"), entry["shares"].get(prior)
                gain_text = f"{_estimate(gain)} ({gain['nats']:.2f} nats)" if gain else "-"
                cells += [gain_text, f"{share['share']:.2f} ± {share['se']:.2f}" if share else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    quality = results["quality"]
    if quality:
        features = next(iter(quality.values()))["features"]
        lines += [
            "",
            f"## Sample quality ({features} features; ± 1.96 bootstrap standard deviations over the samples)",
            "",
            "FD = Fréchet distance to the training images; Δ FD = FD - FD of the full Gaussian at the same t*, paired "
            "sample by sample (same seeds); NN ratio = mean distance of a sample to its nearest training image / the "
            "held-out images' (well below 1: memorisation). data/train: as many training images as samples (the "
            "FD's floor at this count).",
            "",
            "| row | steps | NFE | FD | Δ FD vs full Gaussian | NN ratio | samples | s/img |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, entry in quality.items():
            seconds = entry.get("seconds_per_image")
            lines.append(
                f"| {name} | {entry.get('steps', '-')} | {entry['nfe'] or 0:.0f} | {format_interval(entry['fd'])} | "
                f"{format_interval(entry.get('fd_minus_gaussian_full'))} | {format_interval(entry['nn_ratio'], 3)} | "
                f"{entry['num_samples']} | {'-' if seconds is None else f'{seconds:.3f}'} |"
            )
    return "\n".join(lines) + "\n"


def plot_flow_gain(panels, path) -> bool:
    """One row per data set (title -> results): bits/dim against t* (the headroom's two estimates, every prior's gain
    over the full Gaussian, the full covariance's over the diagonal), and FD against NFE for every row. Returns False
    (and draws nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib).", file=sys.stderr)
        return False
    figure, axes = plt.subplots(len(panels), 2, figsize=(13, 4.4 * len(panels)), squeeze=False)
    for (title, results), (left, right) in zip(panels.items(), axes):
        nll = results["nll"]
        times = sorted(nll, key=float)
        series = {"headroom (train, upper)": "headroom_train", "headroom (held-out, lower)": "headroom_test"}
        curves = {label: [nll[k][field] for k in times] for label, field in series.items()}
        curves["full - diagonal Gaussian"] = [
            nll[k]["differences"]["test"].get(f"{GAUSSIAN_DIAGONAL} - {GAUSSIAN_FULL}") for k in times
        ]
        for prior in sorted({name for k in times for name in nll[k]["shares"]}):
            curves[f"{prior}: gain over full Gaussian"] = [
                nll[k]["differences"]["test"].get(f"{GAUSSIAN_FULL} - {prior}") for k in times
            ]
        for label, estimates in curves.items():
            points = [(float(k), e) for k, e in zip(times, estimates) if e]
            if points:
                xs, es = zip(*points)
                left.errorbar(
                    xs,
                    [e["bits_per_dim"] for e in es],
                    yerr=[e["bits_per_dim_se"] for e in es],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        left.axhline(0.0, color="grey", linewidth=0.8)
        left.set_yscale("symlog", linthresh=0.01)
        left.set_xlabel("t* / T")
        left.set_ylabel("bits/dim (held-out unless noted)")
        left.set_title(f"{title}: headroom and gains")
        if left.get_legend_handles_labels()[0]:
            left.legend(fontsize=7)
        else:
            left.text(0.5, 0.5, "no likelihoods (--skip_nll)", ha="center", transform=left.transAxes)
        by_model = {}
        for entry in results["quality"].values():
            if entry.get("nfe"):
                by_model.setdefault(entry["model"], []).append(entry)  # the baseline: at every NFE it ran
        for model, entries in sorted(by_model.items()):
            entries = sorted(entries, key=lambda e: e["nfe"])
            right.errorbar(
                [e["nfe"] for e in entries],
                [e["fd"]["value"] for e in entries],
                yerr=[1.96 * e["fd"]["se"] if math.isfinite(e["fd"]["se"]) else 0.0 for e in entries],
                marker="o",
                capsize=3,
                linestyle="-" if len(entries) > 1 else "none",
                label=model,
            )
        for name, style in (("data/train", ":"), ("data/test", "--")):
            if name in results["quality"]:
                right.axhline(results["quality"][name]["fd"]["value"], linestyle=style, color="grey", label=name)
        right.set_xscale("log")
        right.set_xlabel("NFE per sample")
        right.set_ylabel("FD (± 1.96 bootstrap sd)")
        right.set_title(f"{title}: quality against NFE")
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize=7)
    figure.tight_layout()
    save_figure_atomically(figure, path)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline = DiNofPipeline.from_pretrained(args.pipeline, revision=args.revision, cache_dir=args.cache_dir)
    pipeline.set_progress_bar_config(disable=True)
    scheduler = pipeline.scheduler
    grids = [args.num_train_timesteps or scheduler.config.num_train_timesteps, *args.baseline_n]
    if not scheduler.config.continuous and any(n != scheduler.config.num_train_timesteps for n in grids):
        raise SystemExit(
            "error: a discrete-time model samples on its own N = "
            f"{scheduler.config.num_train_timesteps} only (--num_train_timesteps, --baseline_n)."
        )
    priors = load_priors(args, pipeline)
    t_stars = sorted(set(args.t_star or []) | {t for _, t, _, _ in priors} or {scheduler.t_star})
    channels, size = pipeline.unet.config.in_channels, pipeline.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    train_uint8, test_uint8, description = load_image_splits(args, size, channels)
    if args.max_test_images is not None:
        test_uint8 = test_uint8[: args.max_test_images]
    train = images_to_tensor(train_uint8, scheduler.data_range)
    context = {
        "args": args,
        "pipeline": pipeline,
        "priors": priors,
        "train_uint8": train_uint8,
        "test_uint8": test_uint8,
        "train": train,
        "test": images_to_tensor(test_uint8, scheduler.data_range),
        "data_fingerprint": fingerprint(train_uint8, test_uint8),
        "unet_fingerprint": fingerprint(pipeline.unet.state_dict()),
        "moments": estimate_image_moments(train, covariance="full"),
    }
    results_path = output_dir / RESULTS_NAME
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("nll", {})
    results.setdefault("quality", {})
    results["meta"] = {
        "pipeline": args.pipeline,
        "data": description,
        "num_train": len(train_uint8),
        "num_test": len(test_uint8),
        "image_shape": [channels, size, size],
        "sde": scheduler_settings(scheduler),
        "priors": {name: t for name, t, _, _ in priors},
        "command": " ".join(["python training_scripts/flow_gain.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch_threads": torch.get_num_threads(),
    }

    def save():
        write_json_atomically(results, results_path)

    parts = [] if args.skip_nll else [("nll", t) for t in t_stars]
    if args.samples:
        context["reference"] = QualityReference(
            train_uint8, test_uint8, features=quality_features(args), num_components=args.pca_components
        )
        parts += [("samples", row) for row in sample_rows(args, priors, t_stars)]
    start = time.perf_counter()
    for kind, part in tqdm(parts, desc="flow gain", unit="part"):
        tqdm.write(f"[flow_gain] {kind} {part[0] if kind == 'samples' else f't* = {part}'}")
        run_nll(results, context, part, save) if kind == "nll" else run_samples(results, context, part, save)
    if args.samples:
        data_rows(results, context)
        paired_differences(results, context)
    results["meta"]["seconds_this_run"] = time.perf_counter() - start
    save()
    write_text_atomically(markdown_report(results), output_dir / "flow_gain.md")
    plot_flow_gain({Path(args.pipeline).name or args.pipeline: results}, output_dir / "flow_gain.png")
    print(markdown_report(results))
    return results


def quality_features(args) -> str:
    if args.quality_features is not None:
        return args.quality_features
    is_digits = args.dataset_name is None and args.train_data_dir is None and args.embedded_dataset in (None, "digits")
    return "dinof-digits" if is_digits else PCA_FEATURES


if __name__ == "__main__":
    main()
