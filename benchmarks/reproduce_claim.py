#!/usr/bin/env python
# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Reproduce DiNof's claim on the embedded digits: the flow prior buys the first 40% of the reverse SDE.

The claim (Zand et al., TMLR 2024): a normalizing flow that samples x(t*), t* = 0.6 T, lets the predictor-corrector
sampler skip the first 40% of the reverse SDE, i.e. 60% of the network evaluations, without losing sample quality.
This script tests it end to end on the scikit-learn digits (16x16, one channel, no download), with the two choices
named as everywhere in this package: the *prior* that starts the reverse process and the *sampler* that runs it.

1. Train a VE and a VP model with `training_scripts/train.py` under `accelerate launch` (joint training of score
   network and flow prior from scratch, the tiny preset; VP uses the tiny UNet with DDPM's positional time embedding,
   an epsilon predictor) on the 1,500 "train" digits of the fixed split, or reuse trained ones (`--reuse_dir`). The
   score network is trained on the whole time range (`--score_time_range full`; the published recipe stops at t*),
   so that the baseline, which starts at T, is valid on the same weights.
2. On the same trained weights and the same seeds (every dump draws batch b with the seed `batch_seed(seed, b)`, so
   DiNof and the Gaussian control even share their start noise), sample with the priors
   - `sde` (the baseline): the SDE prior at T;
   - `flow` (DiNof): the flow sample of x(t*) (NFE excludes the one flow pass);
   - `gaussian` (the control): a plain Gaussian at t* instead of the flow, passed through the pipeline's
     `prior_sample`: the moment-matched diagonal approximation of the marginal p_{t*}, per pixel mean
     mean_coeff(t*) * mu and variance mean_coeff(t*)^2 * var + std(t*)^2, mu and var those of the training digits
     (in the model's data range). Whatever DiNof gains over it is the flow's doing;
   and the samplers
   - `pc`: reverse diffusion + one Langevin step per step, on Song et al.'s grid of N noise scales: N steps (2N NFE)
     from T, int(0.6 N) steps (1.2 N NFE) from t*, for N = 1000, 500, 200, 100 (the control at the largest N only);
   - `heun`: the probability-flow ODE with Heun's method on EDM's noise-level grid (rho = 7), n = 50, 25, 10, 5 steps
     (NFE 2n - 1: 99, 49, 19, 9), from T and from t*;
   - `rk45`: the probability-flow ODE with adaptive Dormand-Prince at rtol = atol = 1e-5 (as published; NFE as
     measured, the batch shares its steps), from T and from t*.
3. Score every dump with `compute_metrics` against the 297 held-out "test" digits with the offline "dinof-digits"
   extractor: FID and KID on the digit classifier's features, and the classifier-confidence score (the Inception
   score with the digit classifier; 1 to 10). The "data" rows score as many real "train" digits the same way (the
   floor of each metric at this sample count), for several random draws: their spread, and that of the rows repeated
   with other sampling seeds (`--repeat_seeds`: the PC rows at the smallest N), is the noise of every number.
4. Bits per dimension of the first 100 of the 297 test digits (8-bit, dequantized, Hutchinson traces, rk45 at 1e-5;
   `--likelihood_images 297` for all of them, ~3x the time) under each model
   with the flow prior at t* (DiNof) and with the SDE prior at T (baseline): means, standard errors over images and
   the paired difference (`dinof_diffusers.evaluation.evaluate_likelihood`).
5. Write `results.md` (the quality table: model, prior, sampler, N, steps, NFE, FID, KID, confidence, s/img; the
   spread; the bits/dim table; how far DiNof's and the control's samples lie apart, sample by sample),
   `results.json`, `quality_vs_nfe.png` (quality against NFE, PC and ODE on one plot) and one sample grid per row in
   `grids/`, under `--output_dir`; every file is written atomically. Sample dumps and likelihoods are resumable: an
   interrupted run continues where it stopped.

    python benchmarks/reproduce_claim.py                      # the full run (make reproduce), ~55 min on 2 cores
    python benchmarks/reproduce_claim.py --reuse_dir outputs/reproduce/models
    python benchmarks/reproduce_claim.py --quick --output_dir /tmp/reproduce   # a minute; what the tests run

Budget of the full run on 2 CPU cores, measured on a quiet machine (29 November 2026): 54.3 min in all. The tiny
UNet costs ~0.71 ms per image per network evaluation inside the pipeline at 16x16 in a batch of 200 (2 threads). One
sample of every row of one model takes ~8,800 evaluations (PC: baseline 3,700, DiNof 2,220, control 1,200; heun
2 x 176; rk45 ~1,170 from T and ~160 from t* for VE, ~360 and ~290 for VP; the repeated seeds 320): 39.7 min for
both models at the default 200 samples a row. A joint training step at batch 64 takes ~0.25 s: 12.2 min for
2 x 1500 steps. The likelihoods of one batch of 100 test digits per model (rk45 with a backward pass per evaluation,
~150 to ~360 evaluations) took 2.1 min; the metrics and the plot the rest. The script measures a forward first and
prints its own estimate; an interrupted run loses at most one dump.

Threads: without `--threads` the script uses one thread or torch's default, whichever runs a UNet forward faster at
that moment (checked at the start and before every dump). On a 2-core machine that other processes also use, torch's
2 intra-op threads were measured 20 to 35 times slower than one thread; on a quiet one they are ~1.5x faster.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, Path(__file__).resolve().parent):  # run as a script from a checkout; the report module
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from reproduce_report import Row, make_row, write_report  # noqa: E402

from dinof_diffusers.data import DIGITS_NUM_TEST, digits_images  # noqa: E402
from dinof_diffusers.evaluation import compute_metrics, evaluate_likelihood, generate_samples  # noqa: E402
from dinof_diffusers.file_utils import write_json_atomically  # noqa: E402
from dinof_diffusers.image_utils import image_grid, save_image_atomically  # noqa: E402
from dinof_diffusers.pipelines.dinof import DiNofPipeline  # noqa: E402
from dinof_diffusers.schedulers import DiNofScheduler  # noqa: E402
from dinof_diffusers.schedulers.scheduling_dinof import num_flow_steps  # noqa: E402
from dinof_diffusers.training.presets import get_preset  # noqa: E402
from dinof_diffusers.validation import check_int, check_number, check_positive_int  # noqa: E402

TRAIN_SCRIPT = REPO_ROOT / "training_scripts" / "train.py"
MODELS = ("ve", "vp")
# Heun's grid: EDM's rho = 7 spacing in the noise level; uniform t is a poor grid for a few steps
HEUN_SPACING = "karras"
# rk45's NFE is known only afterwards; these (measured on the trained tiny models at 1e-5) only feed the estimate
RK45_NFE_GUESS = {"sde": 1000, "flow": 150}
RESOLUTION = 16
CHANNELS = 1
METRICS = ("fid", "kid", "isc")
REFERENCE = "digits:test"  # the 297 held-out digits; the models learn the 1,500 "train" digits
TRAIN_SPLIT = "train"

FULL = {
    "max_train_steps": 1500,
    "train_batch_size": 64,
    "num_samples": 200,
    "batch_size": 200,
    "steps": [1000, 500, 200, 100],
    "heun_steps": [50, 25, 10, 5],
    "rk45_tolerance": 1e-5,
    "repeat_seeds": [1],
    "floor_draws": 10,
    # one batch per model: each evaluation of the likelihood's ODE carries a backward pass (all 297: ~3x the time)
    "likelihood_images": 100,
    "likelihood_tolerance": 1e-5,
}
# VP's discrete betas need beta_max / N < 1, so the quick grid stays above N = 20.
QUICK = {
    "max_train_steps": 3,
    "train_batch_size": 16,
    "num_samples": 12,
    "batch_size": 12,
    "steps": [30],
    "heun_steps": [3],
    "rk45_tolerance": 1e-2,
    "repeat_seeds": [1],
    "floor_draws": 2,
    "likelihood_images": 4,
    "likelihood_tolerance": 1e-2,
}


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def vp_unet_config() -> Dict:
    """The tiny preset's UNet with DDPM's sinusoidal time embedding (sin first, shift 1): an epsilon predictor."""
    config = get_preset("tiny").get_unet_config()
    config.update(time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def training_arguments(model: str, args, model_dir: Path, unet_config_path: Path) -> List[str]:
    """train.py's arguments for one model: joint training on the digits, the tiny preset's settings for both SDEs."""
    preset = get_preset("tiny")
    flow = preset.flow_config
    arguments = [
        "--unet_config", "tiny" if model == "ve" else str(unet_config_path),
        "--sde", model,
        "--continuous",
        "--num_channels", str(CHANNELS),
        "--resolution", str(RESOLUTION),
        "--digits_split", TRAIN_SPLIT,
        "--train_component", "joint",
        # the score network learns every t in [eps, T], not only t <= t* as published, so that the baseline sampler
        # (from T) runs on the same weights as DiNof: the comparison is then between samplers, not networks
        "--score_time_range", "full",
        "--max_train_steps", str(args.max_train_steps),
        "--train_batch_size", str(args.train_batch_size),
        # the tiny preset's optimisation settings, given explicitly: the VP UNet's JSON config would otherwise take
        # the defaults of the published DDPM++ preset
        "--learning_rate", str(preset.learning_rate),
        "--lr_warmup_steps", str(min(preset.lr_warmup_steps, max(1, args.max_train_steps // 10))),
        "--ema_decay", str(preset.ema_decay),
        "--loss_reduction", preset.loss_reduction,
        "--flow_num_levels", str(flow["num_levels"]),
        "--flow_depth", str(flow["flow_depth"]),
        "--flow_hidden_channels", str(flow["hidden_channels"]),
        "--checkpointing_steps", str(args.max_train_steps),
        "--save_images_steps", str(args.max_train_steps),
        "--num_sample_images", "16",
        "--report_to", "none",
        "--seed", str(args.train_seed),
        "--output_dir", str(model_dir),
    ]  # fmt: skip
    if args.quick:
        arguments += ["--sample_num_inference_steps", "3", "--num_sample_images", "4"]
    return arguments


def choose_threads(candidates: List[int], repeats: int = 5) -> Dict[int, float]:
    """Times the tiny UNet's forward (batch 64, 16x16x1) with each number of threads, interleaved; medians in seconds.

    On a machine where other processes hold cores, several intra-op threads can be many times slower than one (each
    parallel region waits for a descheduled thread); on a quiet one they are faster. Measuring is the only safe way.
    """
    from diffusers import UNet2DModel

    config = get_preset("tiny").get_unet_config()
    config.update(sample_size=RESOLUTION, in_channels=CHANNELS, out_channels=CHANNELS)
    unet = UNet2DModel(**config).eval()
    x, t = torch.randn(64, CHANNELS, RESOLUTION, RESOLUTION), torch.full((64,), 0.5)
    times = {threads: [] for threads in candidates}
    previous = torch.get_num_threads()
    try:
        with torch.no_grad():
            for round_index in range(repeats + 1):
                for threads in candidates if round_index % 2 else reversed(candidates):
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    unet(x, t)
                    if round_index > 0:  # the first round warms up
                        times[threads].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {threads: float(np.median(values)) for threads, values in times.items()}


def subprocess_environment(args) -> Dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def accelerate_train_command() -> List[str]:
    """`accelerate launch ... train.py`: one process, on the CPU unless there is a GPU, no mixed precision, no dynamo
    (add train.py's arguments)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    if not torch.cuda.is_available():
        command.append("--cpu")
    return command + ["--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT)]


def reused_model_dir(model: str, reuse_dir: str) -> Path:
    """The trained pipeline of `model` in `--reuse_dir` (DIR/model or DIR/models/model)."""
    for candidate in (Path(reuse_dir) / model, Path(reuse_dir) / "models" / model):
        if (candidate / "model_index.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"--reuse_dir {reuse_dir}: no trained pipeline (model_index.json) in {model}/ or models/{model}/."
    )


def train_models(args, output_dir: Path) -> Dict[str, Path]:
    """The folders of the trained pipelines: `--reuse_dir`'s, up-to-date ones of an earlier run, or new ones.

    New ones are trained one after the other (each run uses every core), or both at once with `--quick`, where
    starting the processes is most of the time.
    """
    if args.reuse_dir is not None:
        dirs = {model: reused_model_dir(model, args.reuse_dir) for model in args.models}
        for model, path in dirs.items():
            tqdm.write(f"[{model}] reusing the trained pipeline in {path}")
        return dirs

    models_dir = output_dir / "models"
    unet_config_path = models_dir / "tiny-vp-unet.json"
    dirs, todo = {}, {}
    for model in args.models:
        model_dir = dirs[model] = models_dir / model
        if model == "vp":
            write_json_atomically(vp_unet_config(), unet_config_path)
        arguments = training_arguments(model, args, model_dir, unet_config_path)
        marker = models_dir / f"{model}.training.json"
        if (model_dir / "model_index.json").is_file() and marker.is_file():
            if json.loads(marker.read_text()).get("arguments") == arguments:
                tqdm.write(f"[{model}] already trained with these arguments: {model_dir}")
                continue
        todo[model] = (arguments, marker)

    command = accelerate_train_command()
    env = subprocess_environment(args)
    if args.quick and len(todo) > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # side by side: one core each
    batches = [list(todo)] if args.quick else [[model] for model in todo]
    for batch in batches:
        start = time.perf_counter()
        processes = {}
        for model in batch:
            arguments, _ = todo[model]
            tqdm.write(f"[{model}] training: accelerate launch train.py {' '.join(arguments)}")
            processes[model] = subprocess.Popen(command + arguments, env=env)
        failed = [model for model, process in processes.items() if process.wait() != 0]
        if failed:
            raise RuntimeError(f"Training of {failed} failed (see train.py's output above).")
        seconds = time.perf_counter() - start
        for model in batch:
            arguments, marker = todo[model]
            write_json_atomically({"arguments": arguments, "seconds": seconds}, marker)
            tqdm.write(f"[{model}] trained in {seconds:.0f} s")
    return dirs


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def weights_fingerprint(model_dir: Path) -> str:
    """A hash of the saved weights of a pipeline, recorded with every dump: retrained weights invalidate old dumps."""
    digest = hashlib.sha256()
    files = [path for folder in ("unet", "flow_prior") for path in sorted((Path(model_dir) / folder).iterdir())]
    for path in (path for path in files if path.suffix in (".safetensors", ".bin")):
        digest.update(path.relative_to(model_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def data_statistics(low: float, high: float) -> (torch.Tensor, torch.Tensor):
    """Per-pixel mean and variance (1, 1, H, W) of the training digits in the data range [low, high]."""
    images = torch.from_numpy(digits_images(RESOLUTION, split=TRAIN_SPLIT)).double() / 255.0 * (high - low) + low
    return images.mean(0)[None, None], images.var(0, unbiased=True)[None, None]


class ClaimSampler:
    """A `DiNofPipeline` with the start of the reverse process chosen by the keyword `start`, for `generate_samples`.

    `start="sde"` is the baseline (the SDE prior at T), `"flow"` DiNof, `"gaussian"` the control: x(t*) drawn as
    `control_mean + control_std * noise`, the noise drawn first from the call's generator, exactly where DiNof draws
    the flow's input noise, so that both see the same random numbers throughout. Every other keyword (the sampler,
    its steps) goes to the pipeline.
    """

    def __init__(self, pipeline: DiNofPipeline, data_mean: torch.Tensor, data_var: torch.Tensor):
        self.pipeline = pipeline
        self.data_mean = data_mean
        self.data_var = data_var

    @property
    def scheduler(self) -> DiNofScheduler:
        return self.pipeline.scheduler

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipeline.set_progress_bar_config(**kwargs)

    def control_moments(self) -> (torch.Tensor, torch.Tensor):
        """Mean and standard deviation (1, C, H, W) of the moment-matched Gaussian of the marginal at t*."""
        t_star = torch.tensor([self.scheduler.t_star], dtype=torch.float64)
        mean_coeff, std = (v.item() for v in self.scheduler.marginal_mean_std(t_star))
        mean = mean_coeff * self.data_mean
        variance = mean_coeff**2 * self.data_var + std**2
        return mean.float(), variance.sqrt().float()

    def __call__(
        self, batch_size: int, generator=None, output_type: str = "pt", start: str = "flow", weights=None, **kwargs
    ):
        """Samples a batch; `weights` (the fingerprint of the weights, for the dump's manifest) is ignored."""
        if start == "gaussian":
            from diffusers.utils.torch_utils import randn_tensor

            shape = (batch_size, CHANNELS, RESOLUTION, RESOLUTION)
            noise = randn_tensor(shape, generator=generator, dtype=torch.float32)
            mean, std = self.control_moments()
            kwargs.update(prior_sample=mean + std * noise, use_flow_prior=True)
        elif start in ("flow", "sde"):
            kwargs.update(use_flow_prior=start == "flow")
        else:
            raise ValueError(f"`start` must be 'sde', 'flow' or 'gaussian', got {start!r}.")
        return self.pipeline(batch_size=batch_size, generator=generator, output_type=output_type, **kwargs)


def configure_steps(pipeline: DiNofPipeline, base_config: Dict, prior: str, sampler: str, n: int, args) -> Dict:
    """Sets up `pipeline` for a row; returns the sampler keywords of the pipeline call.

    PC: continuous-time models get a scheduler with `num_train_timesteps=N` (Song et al.'s N) and its default grid; a
    discrete model keeps its N and samples n (baseline) or int(flow_start * n) (DiNof) of its steps. The ODE rows keep
    the scheduler (the ODE needs a continuous-time model; the pipeline says so otherwise).
    """
    pipeline.scheduler = DiNofScheduler.from_config(base_config)
    if sampler == "heun":
        return {"sampler": "ode", "ode_solver": "heun", "num_inference_steps": n, "timestep_spacing": HEUN_SPACING}
    if sampler == "rk45":
        return {"sampler": "ode", "ode_solver": "rk45", "rtol": args.rk45_tolerance, "atol": args.rk45_tolerance}
    if base_config["continuous"]:
        pipeline.scheduler = DiNofScheduler.from_config(base_config, num_train_timesteps=n)
        return {}
    return {"num_inference_steps": n if prior == "sde" else num_flow_steps(n, base_config["flow_start"])}


def row_plan(args) -> List[tuple]:
    """(prior, sampler, n, seed) of every dump of one model, in order."""
    plan = [("sde", "pc", n, 0) for n in args.steps] + [("flow", "pc", n, 0) for n in args.steps]
    plan += [("gaussian", "pc", n, 0) for n in args.control_steps]
    plan += [(prior, "heun", n, 0) for prior in ("sde", "flow") for n in args.heun_steps]
    if args.rk45_tolerance:
        plan += [("sde", "rk45", 0, 0), ("flow", "rk45", 0, 0)]
    smallest = min(args.steps)
    return plan + [(prior, "pc", smallest, seed) for seed in args.repeat_seeds for prior in ("sde", "flow")]


def nfe_per_sample(prior: str, sampler: str, n: int, flow_start: float, correct_steps: int) -> int:
    """Network evaluations per sample (rk45: `RK45_NFE_GUESS`, for the estimate only)."""
    if sampler == "heun":
        return 2 * n - 1
    if sampler == "rk45":
        return RK45_NFE_GUESS["sde" if prior == "sde" else "flow"]
    steps = n if prior == "sde" else num_flow_steps(n, flow_start)
    return steps * (1 + correct_steps)


@torch.no_grad()
def seconds_per_forward(pipeline: DiNofPipeline, batch_size: int, repeats: int = 3) -> float:
    """Median seconds of one UNet forward per image at `batch_size`, after one warm-up call."""
    x = torch.randn(batch_size, CHANNELS, RESOLUTION, RESOLUTION)
    t = pipeline.scheduler.model_timestep(torch.full((batch_size,), 0.5))
    pipeline.unet(x, t)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipeline.unet(x, t)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / batch_size


def save_grid(samples_dir: Path, path: Path, count: int = 64) -> str:
    from PIL import Image

    files = sorted(samples_dir.glob("[0-9]*.png"))[:count]
    images = [Image.open(file).convert("L") for file in files]
    save_image_atomically(image_grid(images, scale=2), path)
    return str(path)


def score(samples_dir: Path, args) -> Dict[str, float]:
    return compute_metrics(
        samples_dir,
        reference=REFERENCE,
        feature_extractor="dinof-digits",
        metrics=METRICS,
        batch_size=256,
        seed=args.seed,
    )


def data_floor(args, output_dir: Path, draw: int) -> Row:
    """Scores `num_samples` real training digits (a random draw, without replacement) like a dump: the floor of every
    metric against the held-out reference, and, over the draws, its noise at this sample count."""
    from PIL import Image

    folder = output_dir / "samples" / "data" / f"draw-{draw}"
    images = digits_images(RESOLUTION, split=TRAIN_SPLIT)
    size = min(args.num_samples, len(images))
    indices = np.random.default_rng([args.seed, draw]).choice(len(images), size=size, replace=False)
    marker = folder / "indices.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == indices.tolist()):
        for stale in folder.glob("*.png"):
            stale.unlink()
        for position, index in enumerate(indices):
            save_image_atomically(Image.fromarray(images[index], mode="L"), folder / f"{position:06d}.png")
        write_json_atomically(indices.tolist(), marker)
    metrics = score(folder, args)
    grid = save_grid(folder, output_dir / "grids" / "data.png") if draw == 0 else None
    return make_row("data", "data", "data", 0, 0, 0, metrics, None, size, folder, grid, seed=draw)


# ---------------------------------------------------------------------------------------------------------------------
# Likelihood
# ---------------------------------------------------------------------------------------------------------------------


def held_out_digits(count: int) -> torch.Tensor:
    """The first `count` held-out digits at the models' resolution, (N, 1, 16, 16) float in [0, 1] (k / 255)."""
    return torch.from_numpy(digits_images(RESOLUTION, split="test")[:count]).float().div(255.0).unsqueeze(1)


def model_likelihood(model: str, pipeline: DiNofPipeline, fingerprint: str, args, output_dir: Path) -> Dict:
    """Bits per dimension of the test digits with the flow prior and with the SDE prior; cached by weights and
    settings in `likelihood/<model>.json`, so that a rerun does not redo it."""
    identity = {
        "weights": fingerprint,
        "num_images": args.likelihood_images,
        "batch_size": args.likelihood_batch_size,
        "seed": args.seed,
        "tolerance": args.likelihood_tolerance,
    }
    path = output_dir / "likelihood" / f"{model}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("identity") == identity:
            return cached["result"]
    tqdm.write(f"[{model}] bits/dim of {args.likelihood_images} test digits, flow prior and SDE prior")
    result = evaluate_likelihood(
        pipeline,
        held_out_digits(args.likelihood_images),
        batch_size=args.likelihood_batch_size,
        seed=args.seed,
        rtol=args.likelihood_tolerance,
        atol=args.likelihood_tolerance,
    ).to_dict()
    write_json_atomically({"identity": identity, "result": result}, path)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output_dir", type=str, default="outputs/reproduce", help="Models, samples and report.")
    parser.add_argument("--quick", action="store_true", help="A few training steps, samples and steps: a minute.")
    parser.add_argument(
        "--reuse_dir",
        type=str,
        default=None,
        help="Use the trained pipelines in DIR/{ve,vp} (or DIR/models/{ve,vp}) instead of training; for a fair "
        "baseline their score networks must have been trained up to T (train.py --score_time_range full).",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    full = {key: f"full {value}" for key, value in FULL.items()}
    parser.add_argument("--max_train_steps", type=int, default=None, help=full["max_train_steps"])
    parser.add_argument("--train_batch_size", type=int, default=None, help=full["train_batch_size"])
    parser.add_argument("--train_seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=None, help=f"Samples per row; {full['num_samples']}")
    parser.add_argument("--batch_size", type=int, default=None, help=f"Sampling batch; {full['batch_size']}")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help=f"PC's N; {full['steps']}")
    parser.add_argument(
        "--control_steps", type=int, nargs="*", default=None, help="The N of the Gaussian control; default the largest"
    )
    parser.add_argument("--heun_steps", type=int, nargs="*", default=None, help=f"Heun's steps; {full['heun_steps']}")
    parser.add_argument(
        "--rk45_tolerance",
        type=float,
        default=None,
        help=f"rk45's rtol = atol, 0 for no rk45 rows; {full['rk45_tolerance']}",
    )
    parser.add_argument(
        "--repeat_seeds", type=int, nargs="*", default=None,
        help=f"More sampling seeds for the PC rows at the smallest N (the spread); {full['repeat_seeds']}",
    )  # fmt: skip
    parser.add_argument(
        "--floor_draws", type=int, default=None, help=f"Random draws of real digits scored; {full['floor_draws']}"
    )
    parser.add_argument(
        "--likelihood_images", type=int, default=None,
        help=f"Test digits whose bits/dim are measured (of 297), 0 for none; {full['likelihood_images']}",
    )  # fmt: skip
    parser.add_argument(
        "--likelihood_tolerance", type=float, default=None, help=f"rk45's rtol = atol; {full['likelihood_tolerance']}"
    )
    parser.add_argument("--likelihood_batch_size", type=int, default=100, help="Test digits per ODE solve.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (the same for every row) and metric seed.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads here and in the training runs; default: 1 or torch's default, whichever runs a UNet "
        "forward faster right now (--quick: 1, the tests' setting)",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    if args.quick and args.threads is None:
        args.threads = 1
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        for key in ("max_train_steps", "train_batch_size", "num_samples", "batch_size", "floor_draws",
                    "likelihood_batch_size"):  # fmt: skip
            check_positive_int(getattr(args, key), f"--{key}")
        check_int(args.likelihood_images, "--likelihood_images", minimum=0)
        check_number(args.rk45_tolerance, "--rk45_tolerance", minimum=0.0)
        check_number(args.likelihood_tolerance, "--likelihood_tolerance", minimum=0.0, exclusive_minimum=True)
    except ValueError as error:
        parser.error(str(error))
    if args.likelihood_images > DIGITS_NUM_TEST:
        parser.error(f"--likelihood_images must be at most {DIGITS_NUM_TEST} (the test digits).")
    if args.num_samples < 2:
        parser.error("--num_samples must be >= 2 (FID and KID need two samples).")
    if any(n < 2 for n in args.steps):
        parser.error("--steps must all be >= 2.")
    if any(n < 1 for n in args.heun_steps):
        parser.error("--heun_steps must all be >= 1.")
    args.steps = sorted(set(args.steps), reverse=True)
    args.heun_steps = sorted(set(args.heun_steps), reverse=True)
    args.repeat_seeds = sorted(set(args.repeat_seeds) - {0})
    if args.control_steps is None:
        args.control_steps = [args.steps[0]]
    return args


def main(argv=None) -> List[Row]:
    args = parse_args(argv)
    # Without --threads: 1 or torch's default, whichever is faster now; checked again before every dump, since the
    # load of a shared machine changes during a long run.
    candidate_threads = sorted({1, torch.get_num_threads()}) if args.threads is None else [args.threads]

    def pick_threads(repeats=5):
        if len(candidate_threads) > 1:
            timings = choose_threads(candidate_threads, repeats=repeats)
            args.threads = min(timings, key=timings.get)
            shown = ", ".join(f"{threads}: {seconds * 1e3:.1f} ms" for threads, seconds in timings.items())
            tqdm.write(f"threads: UNet forward at batch 64 with ({shown}): using {args.threads} (or pass --threads)")
        else:
            args.threads = candidate_threads[0]
        torch.set_num_threads(args.threads)

    pick_threads()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    phases = {}

    model_dirs = train_models(args, output_dir)
    phases["training_seconds"] = time.perf_counter() - start

    pipelines = {}
    for model, model_dir in model_dirs.items():
        pipeline = DiNofPipeline.from_pretrained(str(model_dir))
        pipeline.set_progress_bar_config(disable=True)
        if pipeline.flow_prior is None:
            raise ValueError(f"{model_dir} has no flow prior: DiNof needs one.")
        # both SDEs sample with the tiny preset's PC sampler (reverse diffusion + one Langevin step), not the sampler
        # of the published preset nearest to the VP network (DDPM++: Euler-Maruyama without corrector)
        sampler = {
            key: get_preset("tiny").scheduler_config[key] for key in ("predictor", "corrector", "correct_steps")
        }
        pipeline.scheduler = DiNofScheduler.from_config(pipeline.scheduler.config, **sampler)
        pipelines[model] = pipeline
    fingerprints = {model: weights_fingerprint(model_dir) for model, model_dir in model_dirs.items()}

    # the plan, and what it will cost
    plan = [(model, *row) for model in pipelines for row in row_plan(args)]
    total_nfe = 0
    for model, prior, sampler, n, _ in plan:
        config = pipelines[model].scheduler.config
        correct_steps = config["correct_steps"] if config["corrector"] != "none" else 0
        total_nfe += nfe_per_sample(prior, sampler, n, config["flow_start"], correct_steps)
    forward = seconds_per_forward(next(iter(pipelines.values())), min(args.batch_size, args.num_samples))
    estimate = total_nfe * args.num_samples * forward
    tqdm.write(
        f"plan: {len(plan)} dumps of {args.num_samples} samples, ~{total_nfe} NFE per sample over all of them; UNet "
        f"forward {forward * 1e3:.2f} ms per image at batch {min(args.batch_size, args.num_samples)}: sampling "
        f"~{estimate / 60:.1f} min"
    )

    meta = {
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "steps": args.steps,
        "control_steps": args.control_steps,
        "heun_steps": args.heun_steps,
        "heun_spacing": HEUN_SPACING,
        "rk45_tolerance": args.rk45_tolerance,
        "repeat_seeds": args.repeat_seeds,
        "reference": REFERENCE,
        "models": {model: str(path) for model, path in model_dirs.items()},
        "weights_fingerprints": fingerprints,
        "quick": args.quick,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "seconds_per_forward_per_image": forward,
        "estimated_sampling_seconds": estimate,
        "control": "moment-matched diagonal Gaussian of x(t*): per pixel N(mean_coeff * mu, mean_coeff^2 var + std^2)",
    }
    rows: List[Row] = [data_floor(args, output_dir, draw) for draw in range(args.floor_draws)]
    likelihoods: Dict[str, Dict] = {}
    sampling_start = time.perf_counter()
    with tqdm(plan, desc="dumps", unit="dump") as bar:
        for model, prior, sampler, n, seed in bar:
            bar.set_postfix_str(f"{model} {prior} {sampler} {n or ''} seed {seed}")
            pick_threads(repeats=2)
            pipeline = pipelines[model]
            base_config = dict(pipeline.scheduler.config)
            sampler_kwargs = configure_steps(pipeline, base_config, prior, sampler, n, args)
            data_mean, data_var = data_statistics(*pipeline.scheduler.data_range)
            name = f"{prior}-{sampler}" + (f"-{n}" if n else "") + (f"-s{seed}" if seed else "")
            samples_dir = output_dir / "samples" / model / name
            try:
                dump = generate_samples(
                    ClaimSampler(pipeline, data_mean, data_var),
                    samples_dir,
                    num_samples=args.num_samples,
                    batch_size=args.batch_size,
                    seed=args.seed + seed,
                    overwrite=True,
                    start=prior,
                    weights=fingerprints[model],
                    **sampler_kwargs,
                )
            finally:
                pipeline.scheduler = DiNofScheduler.from_config(base_config)
            if sampler == "pc":
                steps = nfe_per_sample(prior, sampler, n, base_config["flow_start"], 0)
            else:
                steps = n
            metrics = score(samples_dir, args)
            grid = save_grid(samples_dir, output_dir / "grids" / f"{model}-{name}.png") if not seed else None
            row = make_row(
                model, prior, sampler, n, steps, dump["nfe"], metrics, dump["seconds_per_image"], args.num_samples,
                samples_dir, grid, seed=seed,
            )  # fmt: skip
            row.threads = torch.get_num_threads()
            rows.append(row)
            tqdm.write(
                f"{row.name:>26}: NFE {row.nfe:6.0f}  FID {row.fid:8.2f}  KID {row.kid:.4f}  confidence "
                f"{row.confidence:.2f}  {row.seconds_per_image:.3f} s/img"
            )
            meta.update(phases, sampling_seconds=time.perf_counter() - sampling_start)
            write_report(rows, likelihoods, meta, output_dir)  # after every dump: a long run shows its progress
    phases["sampling_seconds"] = time.perf_counter() - sampling_start
    if args.likelihood_images:
        likelihood_start = time.perf_counter()
        for model, pipeline in pipelines.items():
            pick_threads(repeats=2)
            likelihoods[model] = model_likelihood(model, pipeline, fingerprints[model], args, output_dir)
            write_report(rows, likelihoods, meta, output_dir)
        phases["likelihood_seconds"] = time.perf_counter() - likelihood_start
    phases["total_seconds"] = time.perf_counter() - start
    meta.update(phases)
    write_report(rows, likelihoods, meta, output_dir)
    tqdm.write(
        f"wrote {output_dir / 'results.md'} and {output_dir / 'quality_vs_nfe.png'} in {phases['total_seconds']:.0f} s"
    )
    print((output_dir / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
