#!/usr/bin/env python
"""Evaluate a DiNof pipeline: generate samples (resumably) and compute FID / IS / KID / precision-recall.

Samples go to `<output_dir>/samples/` (an interrupted run resumes where it stopped, byte-identically); the metrics,
NFE, seconds per image and the sampler and model configuration go to `<output_dir>/metrics.json`.

Offline, on the embedded digits (the digit classifier is trained once and cached; see
`dinof_diffusers.evaluation.digits_classifier`):

    python training_scripts/evaluate.py --pipeline outputs/demo/pipeline --output_dir outputs/demo/eval \
        --num_samples 1000 --reference digits

The paper's metrics (torch-fidelity's Inception-v3, downloaded by torch-fidelity on first use):

    python training_scripts/evaluate.py --pipeline <dir or hub id> --output_dir eval --num_samples 50000 \
        --reference cifar10-train --feature_extractor inception-v3-compat

With `--feature_extractor dinof-digits`, "inception_score" is the classifier-confidence score: the Inception score
computed with the digit classifier's logits. With the published `langevin_norm="batch"`, a sample depends on the
other samples of its batch, so `--batch_size` is part of the experiment.
"""

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from dinof_diffusers.config_utils import public_config
from dinof_diffusers.evaluation import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    SUPPORTED_METRICS,
    compute_metrics,
    configure_scheduler,
    default_feature_extractor,
    digits_classifier_info,
    generate_samples,
)
from dinof_diffusers.evaluation.digits_classifier import default_cache_dir, default_classifier_path
from dinof_diffusers.evaluation.metrics import INCEPTION_FEATURE_EXTRACTOR_NAME
from dinof_diffusers.file_utils import write_json_atomically
from dinof_diffusers.hub_utils import is_local_path
from dinof_diffusers.pipelines.dinof import DiNofPipeline
from dinof_diffusers.schedulers.scheduling_dinof import CORRECTORS, LANGEVIN_NORMS, PREDICTORS  # checked up front
from dinof_diffusers.validation import check_int, check_number, check_positive_int

FEATURE_EXTRACTORS = ("auto", INCEPTION_FEATURE_EXTRACTOR_NAME, DIGITS_FEATURE_EXTRACTOR_NAME)
SAMPLERS = ("dinof", "baseline")
# Sampler options that are scheduler configuration keys rather than pipeline call arguments.
SCHEDULER_FLAGS = ("snr", "langevin_norm", "corrector", "predictor", "correct_steps")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="Folder or Hub id of a saved DiNofPipeline.")
    parser.add_argument("--output_dir", required=True, help="Where `samples/` and `metrics.json` are written.")
    parser.add_argument("--num_samples", type=int, default=1000, help="Number of generated images.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per pipeline call.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample dump (batch b uses (seed, b)).")
    parser.add_argument(
        "--reference",
        default=None,
        help='Real images: "digits" (embedded), a torch-fidelity input name (cifar10-train), an image folder, a '
        'folder saved by datasets, or a datasets name, optionally "name:split". Required for fid, kid and prc.',
    )
    parser.add_argument("--reference_split", default=None, help="Split of a datasets reference (default train).")
    parser.add_argument("--reference_config", default=None, help="Configuration of a datasets reference.")
    parser.add_argument("--reference_image_column", default=None, help="Image column of a datasets reference.")
    parser.add_argument("--reference_max_samples", type=int, default=None, help="Use the first N reference images.")
    parser.add_argument(
        "--reference_resolution",
        type=int,
        default=None,
        help="Side length of written references (digits, datasets); default: the samples' side length.",
    )
    parser.add_argument(
        "--feature_extractor",
        default="auto",
        choices=FEATURE_EXTRACTORS,
        help="auto: dinof-digits for --reference digits, inception-v3-compat otherwise.",
    )
    parser.add_argument(
        "--metrics",
        default=",".join(SUPPORTED_METRICS),
        help=f"Comma-separated subset of {','.join(SUPPORTED_METRICS)}; 'none' only generates.",
    )
    parser.add_argument(
        "--feature_extractor_weights_path",
        default=None,
        help="Local weights of the feature extractor (torch-fidelity's Inception .pth, or a digits classifier file); "
        "default: torch-fidelity's download for Inception, the cached classifier for dinof-digits.",
    )
    parser.add_argument("--kid_subset_size", type=int, default=1000, help="Reduced to the sample counts if larger.")
    parser.add_argument(
        "--sampler",
        default="dinof",
        choices=SAMPLERS,
        help="dinof: flow prior to x(t*), then the PC steps from t*; baseline: the full PC sampler from the SDE prior.",
    )
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the scheduler's own.")
    parser.add_argument("--flow_temperature", type=float, default=None, help="Flow prior temperature (default 1).")
    parser.add_argument("--snr", type=float, default=None, help="Corrector signal-to-noise ratio (scheduler config).")
    parser.add_argument("--langevin_norm", default=None, choices=LANGEVIN_NORMS, help="Scheduler config override.")
    parser.add_argument("--corrector", default=None, choices=CORRECTORS, help="Scheduler config override.")
    parser.add_argument("--predictor", default=None, choices=PREDICTORS, help="Scheduler config override.")
    parser.add_argument("--correct_steps", type=int, default=None, help="Corrector steps per reverse step.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache_dir", default=None, help="Cache of references and the digit classifier.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a sample dump in output_dir made with other arguments."
    )
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    validate_args(args, parser)
    return args


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks every flag before anything is loaded or generated; `parser.error` names the offending flag."""
    try:
        check_positive_int(args.num_samples, "--num_samples")
        check_positive_int(args.batch_size, "--batch_size")
        for flag in ("num_inference_steps", "reference_max_samples", "reference_resolution", "kid_subset_size"):
            check_positive_int(getattr(args, flag), f"--{flag}", allow_none=True)
        check_int(args.seed, "--seed", minimum=0)
        check_int(args.correct_steps, "--correct_steps", minimum=0, allow_none=True)
        for flag in ("snr", "flow_temperature"):
            check_number(getattr(args, flag), f"--{flag}", minimum=0.0, exclusive_minimum=True, allow_none=True)
    except ValueError as error:
        parser.error(str(error))
    if args.flow_temperature is not None and args.sampler == "baseline":
        parser.error("--flow_temperature has no effect with --sampler baseline (no flow prior).")

    names = [name.strip().lower() for name in args.metrics.split(",") if name.strip()]
    if names == ["none"]:
        names = []
    else:
        unknown = [name for name in names if name not in SUPPORTED_METRICS]
        if unknown or not names:
            parser.error(
                f"--metrics must be 'none' or a comma-separated subset of {SUPPORTED_METRICS}, got {args.metrics!r}."
            )
    args.metrics = list(dict.fromkeys(names))
    binary = [name for name in args.metrics if name != "isc"]
    if binary and args.reference is None:
        parser.error(f"--reference is required for the metrics {binary}.")
    if args.reference is not None and is_local_path(args.reference) and not os.path.exists(args.reference):
        parser.error(f"--reference {args.reference!r} looks like a path but does not exist.")
    if is_local_path(args.pipeline) and not os.path.isdir(args.pipeline):
        parser.error(f"--pipeline {args.pipeline!r} looks like a path but is not a folder.")
    if args.feature_extractor == "auto":
        args.feature_extractor = default_feature_extractor(args.reference)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} exists and is not a folder.")
    if args.feature_extractor_weights_path is not None and not os.path.isfile(args.feature_extractor_weights_path):
        parser.error(f"--feature_extractor_weights_path {args.feature_extractor_weights_path!r} is not a file.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but CUDA is not available.")


def sampler_call_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The pipeline call arguments of the chosen sampler."""
    kwargs: Dict[str, Any] = {"use_flow_prior": args.sampler == "dinof"}
    if args.num_inference_steps is not None:
        kwargs["num_inference_steps"] = args.num_inference_steps
    if args.sampler == "dinof":
        kwargs["flow_temperature"] = 1.0 if args.flow_temperature is None else args.flow_temperature
    return kwargs


def _component_config(component) -> Optional[Dict[str, Any]]:
    config = getattr(component, "config", None)
    return None if config is None else public_config(config)


def evaluate(args: argparse.Namespace, pipeline) -> Dict[str, Any]:
    """Configures the sampler of `pipeline`, generates the samples, computes the metrics and writes `metrics.json`.

    Args:
        args: the validated arguments of `parse_args`.
        pipeline: a loaded `DiNofPipeline` (or an object with the same call signature, `.scheduler` and `.to`).

    Returns:
        The report written to `metrics.json`.
    """
    if args.sampler == "dinof" and getattr(pipeline, "flow_prior", True) is None:
        raise ValueError(
            "--sampler dinof needs a pipeline with a flow prior; this one has none (use --sampler baseline)."
        )
    if getattr(pipeline, "scheduler", None) is not None:
        configure_scheduler(pipeline, **{flag: getattr(args, flag) for flag in SCHEDULER_FLAGS})
    if hasattr(pipeline, "to"):
        pipeline = pipeline.to(args.device) or pipeline

    sampler_kwargs = sampler_call_kwargs(args)
    samples_dir = os.path.join(args.output_dir, "samples")
    generation = generate_samples(
        pipeline,
        samples_dir,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
        **sampler_kwargs,
    )

    metrics: Dict[str, float] = {}
    metrics_seconds = None
    if args.metrics:
        start = time.perf_counter()
        metrics = compute_metrics(
            samples_dir,
            reference=args.reference,
            feature_extractor=args.feature_extractor,
            metrics=args.metrics,
            batch_size=max(args.batch_size, 64),
            cuda=args.device.startswith("cuda"),
            reference_resolution=args.reference_resolution,
            cache_dir=args.cache_dir,
            kid_subset_size=args.kid_subset_size,
            verbose=not args.no_progress,
            **(
                {"feature_extractor_weights_path": args.feature_extractor_weights_path}
                if args.feature_extractor_weights_path is not None
                else {}
            ),
            reference_kwargs={
                "split": args.reference_split,
                "config_name": args.reference_config,
                "image_column": args.reference_image_column,
                "max_samples": args.reference_max_samples,
            },
        )
        metrics_seconds = time.perf_counter() - start

    import diffusers
    import torch_fidelity

    report: Dict[str, Any] = {
        "metrics": metrics,
        "nfe": generation["nfe"],
        "seconds_per_image": generation["seconds_per_image"],
        "metrics_seconds": metrics_seconds,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "samples_dir": samples_dir,
        "reference": args.reference,
        "feature_extractor": args.feature_extractor if args.metrics else None,
        "sampler": {"name": args.sampler, **sampler_kwargs},
        "scheduler": {
            "class": type(getattr(pipeline, "scheduler", None)).__name__,
            "config": _component_config(getattr(pipeline, "scheduler", None)),
        },
        "model": {
            "pipeline": args.pipeline,
            "class": type(pipeline).__name__,
            "unet": _component_config(getattr(pipeline, "unet", None)),
            "flow_prior": _component_config(getattr(pipeline, "flow_prior", None)),
        },
        "device": args.device,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "torch_fidelity": torch_fidelity.__version__,
        },
        "argv": getattr(args, "argv", None),
    }
    if args.metrics and args.feature_extractor == DIGITS_FEATURE_EXTRACTOR_NAME:
        cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
        classifier_path = args.feature_extractor_weights_path or default_classifier_path(cache_dir)
        report["digits_classifier"] = digits_classifier_info(classifier_path)
    write_json_atomically(report, os.path.join(args.output_dir, "metrics.json"))
    return report


def format_table(report: Dict[str, Any]) -> str:
    """The report's headline numbers as a two-column text table."""
    rows = [("sampler", report["sampler"]["name"]), ("samples", str(report["num_samples"]))]
    nfe = report["nfe"]
    rows.append(("NFE per image", "n/a" if nfe is None else f"{nfe:g}"))
    rows.append(("seconds per image", f"{report['seconds_per_image']:.4g}"))
    for key, value in report["metrics"].items():
        rows.append((key, f"{value:.6g}"))
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    lines = [rule] + [f"{name:<{width}} | {value:>{value_width}}" for name, value in rows] + [rule]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    pipeline = DiNofPipeline.from_pretrained(args.pipeline)
    report = evaluate(args, pipeline)
    print(format_table(report))
    print(f"Wrote {os.path.join(args.output_dir, 'metrics.json')}")
    return report


if __name__ == "__main__":
    main()
