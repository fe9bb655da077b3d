#!/usr/bin/env python
r"""Evaluate a DiNof pipeline: generate samples (resumably, on one process or many) and compute FID / IS / KID /
precision-recall with one or several feature extractors; with --likelihood, the bits/dim of held-out images under
the flow prior and the SDE prior.

Samples go to `<output_dir>/samples/` (an interrupted run resumes where it stopped, byte-identically, on any number
of processes); the metrics of every feature extractor, NFE, seconds per image, the throughput, the prior, sampler
and model configuration and the weights' fingerprint go to `<output_dir>/metrics.json`.

The prior and the sampler are two choices: --prior flow (the flow prior's sample at t*: DiNof; the default for a
pipeline with a flow) or sde (the SDE prior at T: the baseline), and --sampler pc (predictor-corrector, default) or
ode (the probability-flow ODE: --ode_solver heun|euler|rk45, --timestep_spacing uniform|karras, --rtol, --atol). The
old --sampler dinof / baseline still work (deprecated: --prior flow / sde --sampler pc).

Offline, on the embedded digits (the digit classifier is trained once and cached; see
`dinof_diffusers.evaluation.digits_classifier`):

    python training_scripts/evaluate.py --pipeline outputs/demo/pipeline --output_dir outputs/demo/eval \
        --num_samples 1000 --reference digits
    # the probability-flow ODE from the flow prior, 20 Heun steps on the Karras grid (39 network evaluations)
    python training_scripts/evaluate.py --pipeline outputs/demo/pipeline --output_dir outputs/demo/eval-heun \
        --num_samples 1000 --reference digits:test --sampler ode --ode_solver heun --num_inference_steps 20 \
        --timestep_spacing karras
    # bits/dim of the 297 held-out test digits, flow prior and SDE prior side by side (no samples)
    python training_scripts/evaluate.py --pipeline outputs/demo/pipeline --output_dir outputs/demo/eval \
        --metrics none --likelihood

The paper's metrics (torch-fidelity's Inception-v3, downloaded by torch-fidelity on first use) and FD-DINOv2 from the
same samples, on 8 GPUs (each process makes whole batches; the dump is the same as on one process):

    accelerate launch --multi_gpu --num_processes 8 training_scripts/evaluate.py --pipeline <dir or hub id> \
        --output_dir eval --num_samples 50000 --reference cifar10-train \
        --feature_extractor inception-v3-compat dinov2-hf-vit-l-14
    # CIFAR-10's test bits/dim (a `datasets` name with its split), sharded by batch across the 8 processes
    accelerate launch --multi_gpu --num_processes 8 training_scripts/evaluate.py --pipeline <dir or hub id> \
        --output_dir eval --metrics none --likelihood --likelihood_data cifar10:test --likelihood_batch_size 100

--likelihood writes, under "likelihood" in metrics.json, the mean bits/dim of the images with its standard error
for each prior and their paired difference (flow - sde), from the probability-flow ODE (rk45 at --rtol / --atol)
with Hutchinson's trace estimator and uniform dequantization. Batch b of the images has its own seeds, so the value
does not depend on the number of processes; finished batches are recorded in `<output_dir>/likelihood.json`, from
which an interrupted run resumes. With --metrics none it runs alone (no samples are generated).

Under `accelerate launch`, each process uses the device accelerate gives it (`--device` is for plain runs). The
reference and the feature extractors' weights are fetched (or found in their caches) before the first sample
is generated, so a missing download fails at once. With `--feature_extractor dinof-digits`, "inception_score" is the
classifier-confidence score: the Inception score computed with the digit classifier's logits. With the published
`langevin_norm="batch"`, a sample depends on the other samples of its batch, so `--batch_size` is part of the
experiment (the number of processes is not).
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
    EvaluationError,
    compute_metrics,
    configure_scheduler,
    default_feature_extractor,
    digits_classifier_info,
    generate_samples,
    is_digits_reference,
    prepare_metrics,
    registered_feature_extractors,
    run_on_main_process,
    weights_fingerprint,
)
from dinof_diffusers.evaluation.digits_classifier import default_cache_dir, default_classifier_path
from dinof_diffusers.evaluation.distributed import process_state
from dinof_diffusers.evaluation.likelihood import LIKELIHOOD_RECORDS_NAME, likelihood_images, resumable_likelihood
from dinof_diffusers.evaluation.sampler_flags import (
    add_sampler_arguments,
    check_pipeline_sampler,
    check_sampler_arguments,
    sampler_keywords,
    sampler_record,
)
from dinof_diffusers.file_utils import write_json_atomically
from dinof_diffusers.hub_utils import is_local_path
from dinof_diffusers.pipelines.dinof import DiNofPipeline
from dinof_diffusers.schedulers.scheduling_dinof import CORRECTORS, LANGEVIN_NORMS, PREDICTORS  # checked up front
from dinof_diffusers.validation import check_int, check_number, check_positive_int

# Sampler options that are scheduler configuration keys rather than pipeline call arguments (the PC sampler's).
SCHEDULER_FLAGS = ("snr", "langevin_norm", "corrector", "predictor", "correct_steps")
TRACE_ESTIMATORS = ("rademacher", "gaussian")  # the pipeline's "exact" is for analytic test models
LIKELIHOOD_FLAGS = (
    "likelihood_data",
    "likelihood_max_samples",
    "likelihood_batch_size",
    "trace_estimator",
    "num_bits",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="Folder or Hub id of a saved DiNofPipeline.")
    parser.add_argument("--output_dir", required=True, help="Where `samples/` and `metrics.json` are written.")
    parser.add_argument("--num_samples", type=int, default=1000, help="Number of generated images.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per pipeline call (on every process).")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the samples and of the likelihood (batch b: (seed, b))."
    )
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
        nargs="+",
        default=["auto"],
        metavar="NAME",
        help="One or several torch-fidelity feature extractors, each scored on the same samples: "
        "inception-v3-compat (FID), dinov2-hf-vit-l-14 (FD-DINOv2), dinof-digits (offline), ... "
        "auto: dinof-digits for --reference digits, inception-v3-compat otherwise.",
    )
    parser.add_argument(
        "--metrics",
        default=",".join(SUPPORTED_METRICS),
        help=f"Comma-separated subset of {','.join(SUPPORTED_METRICS)}; 'none' only generates (with --likelihood: "
        "generates nothing, only the likelihood is computed).",
    )
    parser.add_argument(
        "--feature_extractor_weights_path",
        nargs="+",
        default=None,
        metavar="[NAME=]PATH",
        help="Local weights of a feature extractor: torch-fidelity's Inception .pth, a digits classifier file, a "
        "DINOv2 folder or Hub id; NAME= says which extractor when there are several. Default: torch-fidelity's "
        "download for Inception, the cached classifier for dinof-digits, the Hub (cached) for DINOv2.",
    )
    parser.add_argument("--kid_subset_size", type=int, default=1000, help="Reduced to the sample counts if larger.")
    add_sampler_arguments(parser, accept_deprecated=True)
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="PC steps or heun / euler ODE steps from the prior's time. Default: the scheduler's (int(N * flow_start) "
        "from t*, N from T).",
    )
    parser.add_argument("--snr", type=float, default=None, help="Corrector signal-to-noise ratio (scheduler config).")
    parser.add_argument("--langevin_norm", default=None, choices=LANGEVIN_NORMS, help="Scheduler config override.")
    parser.add_argument("--corrector", default=None, choices=CORRECTORS, help="Scheduler config override.")
    parser.add_argument("--predictor", default=None, choices=PREDICTORS, help="Scheduler config override.")
    parser.add_argument("--correct_steps", type=int, default=None, help="Corrector steps per reverse step.")
    parser.add_argument("--device", default=None, help="Plain runs only (default cuda if available); see above.")
    parser.add_argument("--cache_dir", default=None, help="Cache of references and the digit classifier.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a sample dump in output_dir made with other arguments or other weights.",
    )
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    likelihood = parser.add_argument_group("likelihood (bits/dim of held-out images)")
    likelihood.add_argument("--likelihood", action="store_true", help="Compute bits/dim, flow and SDE prior.")
    likelihood.add_argument(
        "--likelihood_data",
        default=None,
        help="The images: digits:test (the 297 held-out digits, the default with a digits --reference or none), a "
        "folder of images, a folder saved by datasets, or a datasets name as 'name:split' (default split test).",
    )
    likelihood.add_argument("--likelihood_max_samples", type=int, default=None, help="Only the first N images.")
    likelihood.add_argument("--likelihood_batch_size", type=int, default=None, help="Images per ODE solve (64).")
    likelihood.add_argument(
        "--trace_estimator", default=None, choices=TRACE_ESTIMATORS, help="Hutchinson probes (default rademacher)."
    )
    likelihood.add_argument("--num_bits", type=int, default=None, help="Bit depth of the data (default 8).")
    likelihood.add_argument(
        "--no_dequantize", action="store_true", help="No uniform dequantization noise (the data as given)."
    )
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
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
        check_number(args.snr, "--snr", minimum=0.0, exclusive_minimum=True, allow_none=True)
        check_sampler_arguments(args, uses_tolerances=args.likelihood)
        _validate_likelihood(args)
    except ValueError as error:
        parser.error(str(error))
    pc_flags = [f"--{flag}" for flag in SCHEDULER_FLAGS if getattr(args, flag) is not None]
    if pc_flags and args.sampler == "ode":
        parser.error(f"{' and '.join(pc_flags)}: options of the PC sampler, not of --sampler ode.")

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
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} exists and is not a folder.")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but CUDA is not available.")
    _validate_feature_extractors(args, parser)


def _validate_likelihood(args: argparse.Namespace) -> None:
    """The likelihood flags: only with --likelihood; their defaults; the data (digits:test with the digits)."""
    given = [f"--{flag}" for flag in LIKELIHOOD_FLAGS if getattr(args, flag) is not None]
    given += ["--no_dequantize"] if args.no_dequantize else []
    if not args.likelihood:
        if given:
            raise ValueError(f"{' and '.join(given)}: only with --likelihood.")
        return
    for flag in ("likelihood_max_samples", "likelihood_batch_size", "num_bits"):
        check_positive_int(getattr(args, flag), f"--{flag}", allow_none=True)
    args.likelihood_batch_size = args.likelihood_batch_size or 64
    args.trace_estimator = args.trace_estimator or "rademacher"
    args.num_bits = args.num_bits or 8
    if args.likelihood_data is None:
        if args.reference is not None and not is_digits_reference(args.reference):
            raise ValueError(
                "--likelihood needs --likelihood_data (the held-out images) when --reference is not the digits; "
                "e.g. a datasets name as 'name:test' or a folder of images."
            )
        args.likelihood_data = "digits:test"
    if is_local_path(args.likelihood_data) and not os.path.exists(args.likelihood_data):
        raise ValueError(f"--likelihood_data {args.likelihood_data!r} looks like a path but does not exist.")


def _validate_feature_extractors(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`args.feature_extractor` becomes a list of registered names, `args.feature_extractor_weights` a dict."""
    known = registered_feature_extractors()
    names = list(dict.fromkeys(args.feature_extractor))
    if names == ["auto"]:
        names = [default_feature_extractor(args.reference)]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--feature_extractor must be 'auto' or names among {known}, got {unknown}.")
    args.feature_extractor = names
    args.feature_extractor_weights = {}
    for entry in args.feature_extractor_weights_path or []:
        name, separator, path = entry.partition("=")
        if not (separator and name in known):
            if len(names) > 1:
                parser.error(
                    f"--feature_extractor_weights_path {entry!r}: with several feature extractors, say which one it "
                    f"is for as NAME=PATH (NAME among {names})."
                )
            name, path = names[0], entry
        if name not in names:
            parser.error(f"--feature_extractor_weights_path {entry!r}: {name!r} is not among --feature_extractor.")
        if is_local_path(path) and not os.path.exists(path):
            parser.error(f"--feature_extractor_weights_path {path!r} looks like a path but does not exist.")
        args.feature_extractor_weights[name] = path


def configure_sampler(args: argparse.Namespace, pipeline) -> Dict[str, Any]:
    """Checks the prior and sampler against `pipeline`, sets the PC sampler's scheduler options on it and returns its
    pipeline call arguments.

    All of the sampler's flags are read here (and in `sampler_flags`), so that a new sampler or prior is one change.

    Raises:
        EvaluationError: `--prior flow` without a flow prior, `--sampler ode` for a discrete-time model, `--likelihood`
            for a discrete-time model.
    """
    check_pipeline_sampler(args, pipeline)
    scheduler = getattr(pipeline, "scheduler", None)
    if args.likelihood and scheduler is not None and not scheduler.config.continuous:
        raise EvaluationError(
            "--likelihood needs a continuous-time model (the probability-flow ODE); this pipeline's scheduler is "
            "discrete (SMLD / DDPM)."
        )
    if scheduler is not None:
        configure_scheduler(pipeline, **{flag: getattr(args, flag) for flag in SCHEDULER_FLAGS})
    return sampler_keywords(args)


def resolve_device(args: argparse.Namespace, state) -> torch.device:
    """`--device` in a plain run (default: accelerate's choice, cuda when available); accelerate's device, one per
    process, under `accelerate launch` with several processes."""
    if state.num_processes > 1:
        if args.device is not None:
            raise EvaluationError(
                f"--device {args.device} is for plain one-process runs: under `accelerate launch` with "
                f"{state.num_processes} processes each uses the device accelerate gives it (choose with accelerate's "
                "--cpu, --gpu_ids or its config)."
            )
        return state.device
    return torch.device(args.device) if args.device is not None else state.device


def _component_config(component) -> Optional[Dict[str, Any]]:
    config = getattr(component, "config", None)
    return None if config is None else public_config(config)


def _sample_size(pipeline) -> Optional[int]:
    size = getattr(getattr(getattr(pipeline, "unet", None), "config", None), "sample_size", None)
    return max(size) if isinstance(size, (list, tuple)) else size


def metric_options(args: argparse.Namespace, pipeline, device: torch.device) -> Dict[str, Any]:
    """The keywords that `prepare_metrics` and `compute_metrics` share."""
    return {
        "reference": args.reference,
        "feature_extractor": args.feature_extractor,
        "metrics": args.metrics,
        "batch_size": max(args.batch_size, 64),
        "cuda": device.type == "cuda",
        "reference_resolution": args.reference_resolution or _sample_size(pipeline),
        "cache_dir": args.cache_dir,
        "verbose": not args.no_progress,
        "feature_extractor_weights": args.feature_extractor_weights,
        "reference_kwargs": {
            "split": args.reference_split,
            "config_name": args.reference_config,
            "image_column": args.reference_image_column,
            "max_samples": args.reference_max_samples,
        },
    }


def evaluate(args: argparse.Namespace, pipeline, state=None) -> Optional[Dict[str, Any]]:
    """Configures the sampler of `pipeline`, fetches what the metrics need, generates the samples and computes the
    likelihood (this process's share of each), and on the main process computes the metrics and writes
    `metrics.json`.

    Args:
        args: the validated arguments of `parse_args`.
        pipeline: a loaded `DiNofPipeline` (or an object with the same call signature, `.scheduler` and `.to`).
        state: an accelerate `PartialState`; default the current one (one process when not launched).

    Returns:
        The report written to `metrics.json` on the main process; `None` on the other processes.

    Raises:
        EvaluationError: a dump or likelihood records of other weights or arguments in `output_dir`, a reference or
            extractor that cannot be fetched, non-finite samples, `--device` under a multi-process launch, a prior or
            sampler the pipeline cannot run.
    """
    state = process_state(state)
    device = resolve_device(args, state)
    sampler_kwargs = configure_sampler(args, pipeline)
    if hasattr(pipeline, "to"):
        pipeline = pipeline.to(device) or pipeline
    options = metric_options(args, pipeline, device)
    if args.metrics:  # before the first sample: a missing download must not wait for hours of sampling
        run_on_main_process(lambda: prepare_metrics(**options), state)
    images = None
    if args.likelihood:  # read before the first sample too
        channels = pipeline.unet.config.in_channels
        images = likelihood_images(
            args.likelihood_data, _sample_size(pipeline), channels, args.likelihood_max_samples, args.cache_dir, state
        )

    generation = None
    if args.metrics or not args.likelihood:
        generation = generate_samples(
            pipeline,
            os.path.join(args.output_dir, "samples"),
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            seed=args.seed,
            overwrite=args.overwrite,
            show_progress=not args.no_progress,
            state=state,
            **sampler_kwargs,
        )
    likelihood = None
    if images is not None:
        settings = {"batch_size": args.likelihood_batch_size, "seed": args.seed, "num_bits": args.num_bits}
        settings.update(rtol=args.rtol, atol=args.atol, dequantize=not args.no_dequantize)
        settings["trace_estimator"] = args.trace_estimator
        records = os.path.join(args.output_dir, LIKELIHOOD_RECORDS_NAME)
        likelihood = resumable_likelihood(
            pipeline, images, records, args.likelihood_data, args.overwrite, not args.no_progress, state, **settings
        )
    state.wait_for_everyone()
    if not state.is_main_process:
        return None  # scoring runs once, on the main process

    metrics: Dict[str, Dict[str, float]] = {}
    metrics_seconds = None
    if args.metrics:
        start = time.perf_counter()
        metrics = compute_metrics(generation["files"], kid_subset_size=args.kid_subset_size, **options)
        metrics_seconds = time.perf_counter() - start
    report = build_report(args, pipeline, generation, sampler_kwargs, metrics, metrics_seconds, device)
    if likelihood is not None:
        report["likelihood"] = {
            "data": args.likelihood_data,
            "records": os.path.join(args.output_dir, LIKELIHOOD_RECORDS_NAME),
            "num_processes": state.num_processes,
            **likelihood.to_dict(),
        }
    write_json_atomically(report, os.path.join(args.output_dir, "metrics.json"))
    return report


def build_report(args, pipeline, generation, sampler_kwargs, metrics, metrics_seconds, device) -> Dict[str, Any]:
    """What `metrics.json` holds (without the likelihood); the sampling entries only when samples were generated."""
    import diffusers
    import torch_fidelity

    report: Dict[str, Any] = {
        "scheduler": {
            "class": type(getattr(pipeline, "scheduler", None)).__name__,
            "config": _component_config(getattr(pipeline, "scheduler", None)),
        },
        "model": {
            "pipeline": args.pipeline,
            "class": type(pipeline).__name__,
            "weights_fingerprint": weights_fingerprint(pipeline)
            if generation is None
            else generation["weights_fingerprint"],
            "unet": _component_config(getattr(pipeline, "unet", None)),
            "flow_prior": _component_config(getattr(pipeline, "flow_prior", None)),
        },
        "device": str(device),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "torch_fidelity": torch_fidelity.__version__,
        },
        "argv": getattr(args, "argv", None),
    }
    if generation is not None:
        report.update(
            {
                "metrics": metrics,
                "feature_extractors": args.feature_extractor if args.metrics else [],
                "nfe": generation["nfe"],
                "seconds_per_image": generation["seconds_per_image"],
                "throughput": generation["throughput"],
                "num_processes": generation["num_processes"],
                "metrics_seconds": metrics_seconds,
                "num_samples": args.num_samples,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "samples_dir": generation["output_dir"],
                "reference": args.reference,
                "sampler": sampler_record(args, sampler_kwargs),
            }
        )
    if args.metrics and DIGITS_FEATURE_EXTRACTOR_NAME in args.feature_extractor:
        cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
        classifier_path = args.feature_extractor_weights.get(DIGITS_FEATURE_EXTRACTOR_NAME)
        report["digits_classifier"] = digits_classifier_info(classifier_path or default_classifier_path(cache_dir))
    return report


def format_table(report: Dict[str, Any]) -> str:
    """The report's headline numbers as a two-column text table."""
    rows = []
    if "sampler" in report:
        sampler = report["sampler"]
        solver = f" {sampler['ode_solver']}" if "ode_solver" in sampler else ""
        rows.append(("prior, sampler", f"{sampler['prior']}, {sampler['sampler']}{solver}"))
        rows.append(("samples", str(report["num_samples"])))
        nfe = report["nfe"]
        rows.append(("NFE per image", "n/a" if nfe is None else f"{nfe:g}"))
        rows.append(("seconds per image", f"{report['seconds_per_image']:.4g}"))
        throughput = report["throughput"]
        if throughput is not None:
            processes = report["num_processes"]
            rows.append((f"images / s ({processes} processes)", f"{throughput['images_per_second']:.4g}"))
        for extractor, values in report["metrics"].items():
            for key, value in values.items():
                rows.append((f"{key} [{extractor}]", f"{value:.6g}"))
    likelihood = report.get("likelihood")
    if likelihood is not None:
        estimates = {**likelihood["priors"], "flow - sde": likelihood["difference"]}
        for name, estimate in estimates.items():
            if estimate is not None:
                value = f"{estimate['bits_per_dim']:.4f} ± {estimate['bits_per_dim_se']:.4f}"
                rows.append((f"bits/dim [{name}] ({likelihood['num_images']} images)", value))
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    lines = [rule] + [f"{name:<{width}} | {value:>{value_width}}" for name, value in rows] + [rule]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    args = parse_args(argv)
    state = process_state()
    with state.main_process_first():  # a Hub download once, not once per process
        pipeline = DiNofPipeline.from_pretrained(args.pipeline)
    try:  # the flags that only the pipeline can check are usage errors too, before any work
        configure_sampler(args, pipeline)
    except EvaluationError as error:
        build_parser().error(str(error))
    report = evaluate(args, pipeline, state)
    if report is not None:
        print(format_table(report))
        print(f"Wrote {os.path.join(args.output_dir, 'metrics.json')}")
    return report


if __name__ == "__main__":
    try:
        main()
    except EvaluationError as error:
        if process_state().is_main_process:
            print(f"evaluate.py: error: {error}", file=sys.stderr)
        sys.exit(1)
