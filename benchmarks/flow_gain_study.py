#!/usr/bin/env python
# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Where does DiNof's flow prior pay? The headroom study on two data sets that ship with scikit-learn.

For each data set (the digits, 16x16x1, the fixed 1,500 / 297 split; natural-image patches, 16x16x3: 20,000 training
crops of the left three quarters of scikit-learn's two sample photographs, 2,000 test crops of the right quarter),
stage by stage, each resumable:

1. `data`: the splits as a local data set folder (train.parquet, test.parquet) that train.py and flow_gain.py read
   with `--dataset_name`.
2. `score`: one score network on the whole time range (`train.py --train_component score --score_time_range full`,
   the tiny preset's UNet, under `accelerate launch` like benchmarks/reproduce_claim.py).
3. `flow-<size>-t<t*>`: on the frozen network, a flow prior (`--train_component flow`) for every t* and both sizes
   (the tiny preset's Glow, and a larger one of >= 0.15M parameters), trained in chunks (`--resume_from_checkpoint
   latest`) until the held-out NLL of x(t*) flattens (the improvement of the last chunk, paired over the same noisy
   test images, is below `flatten_bits_per_dim` or two standard errors) or the flow's budget of CPU time is spent
   (CPU seconds of the training processes: the same amount of training on a quiet and on a busy machine).
4. `gaussian-<covariance>-t<t*>`: the full and the diagonal Gaussian priors (`train.py --train_component
   gaussian_prior`; train.py's code path, run in this worker process).
5. `flow_gain-seed<k>`: training_scripts/flow_gain.py on the score pipeline with every prior: the headroom (both
   estimates), each prior's gain and share, and sample quality at equal NFE (the PC sampler on the N = 100 grid,
   int(100 t*) steps; the flows, both Gaussians, the baseline from T) plus the baseline with N = 100 and 1000 steps;
   500 samples a row; FD in the digit classifier's features (digits) or a fixed PCA space of the training patches,
   the nearest-neighbour memorisation check, bootstrap intervals. The key rows (the large flow and the full Gaussian)
   again with a second seed.

The two data sets run side by side in two worker processes with one torch thread each (on a 2-core machine, two
single-threaded processes use both cores and, unlike two OpenMP threads, do not collapse when another process takes a
core); with `--jobs 1` they run one after the other with `--threads` (default: chosen by timing, as
reproduce_claim.py does). Then `results.md`, `results.json`, `flow_gain_study.png` (headroom and gains against t*,
quality against NFE) and `flow_training.png` (held-out NLL of every flow against training steps) are written to
`--output_dir`; the workers' logs are in `logs/`.

    python benchmarks/flow_gain_study.py                     # the full study (make study), ~90 min on 2 cores
    python benchmarks/flow_gain_study.py --quick --output_dir /tmp/study   # seconds; what the tests run
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from tqdm.auto import tqdm

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
for path in (str(REPO_ROOT), str(BENCHMARKS)):
    if path not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, path)

from reproduce_claim import accelerate_train_command, choose_threads, subprocess_environment  # noqa: E402

from dinof_diffusers.data import digits_images, sample_patches  # noqa: E402
from dinof_diffusers.evaluation.flow_gain import diffuse_images, images_to_tensor, prior_log_prob  # noqa: E402
from dinof_diffusers.file_utils import atomic_folder_path, write_json_atomically, write_text_atomically  # noqa: E402
from dinof_diffusers.image_utils import save_figure_atomically  # noqa: E402
from dinof_diffusers.training.presets import get_preset  # noqa: E402

FLOW_GAIN_SCRIPT = REPO_ROOT / "training_scripts" / "flow_gain.py"
TRAIN_SCRIPT = REPO_ROOT / "training_scripts" / "train.py"
DATASETS = ("digits", "patches")
COVARIANCES = ("full", "diagonal")
RESOLUTION = 16

FULL = {
    "t_stars": [0.2, 0.3, 0.4, 0.6],
    "num_patches": {"train": 20000, "test": 2000},
    "score_steps": 3000,
    "batch_size": 64,
    # name -> (levels, steps per level, coupling width): the tiny preset's Glow, and one of >= 0.15M parameters
    "flows": {"tiny": (2, 4, 32), "large": (2, 8, 64)},
    "flow_chunk_steps": {"tiny": 500, "large": 200},
    "flow_budget_seconds": 120.0,  # CPU seconds per flow (training processes, start-up included)
    "flow_max_chunks": 10,
    "flatten_bits_per_dim": 0.001,
    "flow_eval_images": 1000,
    "samples": 500,
    "sample_batch_size": 250,
    "grid_n": 100,
    "baseline_n": [100, 1000],
    "num_bootstrap": 200,
    "num_draws": 4,
    "max_train_points": 2000,
    "max_test_images": None,
    "key_models": ["flow_large", "gaussian_full"],
    "seeds": [0, 1],
    "grid_steps": 10,
}
QUICK = {
    **FULL,
    "t_stars": [0.6],
    "num_patches": {"train": 300, "test": 60},
    "score_steps": 3,
    "batch_size": 16,
    "flows": {"tiny": (2, 1, 8)},
    "flow_chunk_steps": {"tiny": 2},
    "flow_budget_seconds": 0.0,
    "flow_eval_images": 20,
    "samples": 6,
    "sample_batch_size": 6,
    "grid_n": 10,
    "baseline_n": [10],
    "num_bootstrap": 5,
    "num_draws": 1,
    "max_train_points": 50,
    "max_test_images": 40,
    "key_models": ["flow_tiny", "gaussian_full"],
    "grid_steps": 2,
    "features": "pca",  # no digit classifier to train
}
# Song et al.'s rule of thumb: sigma_max about the largest distance between two training images in [0, 1] (8.4 for
# the digits, where the tiny preset's 10 is kept; 26 for the patches).
DATASET_SETTINGS = {
    "digits": {"channels": 1, "sigma_max": 10.0, "features": "dinof-digits"},
    "patches": {"channels": 3, "sigma_max": 25.0, "features": "pca"},
}


def t_name(t: float) -> str:
    return f"t{t:g}"


# ---------------------------------------------------------------------------------------------------------------------
# The stages of one data set (run in a worker process)
# ---------------------------------------------------------------------------------------------------------------------


class Worker:
    """The stages of one data set, each recorded in `<output_dir>/<dataset>/state.json` when done."""

    def __init__(self, dataset: str, args, config: Dict):
        self.dataset, self.args, self.config = dataset, args, config
        self.settings = DATASET_SETTINGS[dataset]
        self.root = Path(args.output_dir) / dataset
        self.data_dir = self.root / "data"
        self.models_dir = self.root / "models"
        self.state_path = self.root / "state.json"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"stages": {}}
        self.env = subprocess_environment(args)

    def stages(self) -> List[str]:
        config = self.config
        flows = [f"flow-{size}-{t_name(t)}" for t in config["t_stars"] for size in config["flows"]]
        gaussians = [f"gaussian-{cov}-{t_name(t)}" for t in config["t_stars"] for cov in COVARIANCES]
        return ["data", "score", *flows, *gaussians, *[f"flow_gain-seed{seed}" for seed in config["seeds"]]]

    def done(self, stage: str, record: Dict) -> bool:
        entry = self.state["stages"].get(stage)
        return entry is not None and entry.get("record") == record

    def finish(self, stage: str, record: Dict, seconds: float, **extra) -> None:
        self.state["stages"][stage] = {"record": record, "seconds": seconds, **extra}
        write_json_atomically(self.state, self.state_path)

    def run(self) -> None:
        for stage in self.stages():
            kind = stage.split("-")[0]
            tqdm.write(f"[{self.dataset}] {stage}")
            getattr(self, f"stage_{kind}")(stage)

    # -- 1. data ------------------------------------------------------------------------------------------------------

    def images(self, split: str) -> np.ndarray:
        if self.dataset == "digits":
            return digits_images(RESOLUTION, split=split)
        return sample_patches(split, size=RESOLUTION, num_patches=self.config["num_patches"][split])

    def stage_data(self, stage: str) -> None:
        record = {"num_patches": self.config["num_patches"]} if self.dataset == "patches" else {"split": "fixed"}
        if self.done(stage, record) and (self.data_dir / "train.parquet").is_file():
            return
        from datasets import Dataset, Features, Image
        from PIL import Image as PILImage

        start = time.perf_counter()
        with atomic_folder_path(self.data_dir) as folder:
            for split in ("train", "test"):
                images = [PILImage.fromarray(image) for image in self.images(split)]
                dataset = Dataset.from_dict({"image": images}, features=Features({"image": Image()}))
                dataset.to_parquet(os.path.join(folder, f"{split}.parquet"))
        self.finish(stage, record, time.perf_counter() - start)

    # -- 2. the score network -----------------------------------------------------------------------------------------

    def common_arguments(self) -> List[str]:
        tiny = get_preset("tiny")
        return [
            "--dataset_name", str(self.data_dir),
            "--train_batch_size", str(self.config["batch_size"]),
            "--learning_rate", str(tiny.learning_rate),
            "--lr_warmup_steps", str(min(tiny.lr_warmup_steps, max(1, self.config["score_steps"] // 10))),
            "--ema_decay", str(tiny.ema_decay),
            "--report_to", "none",
            "--seed", "0",
            "--num_sample_images", "4",
            "--sample_num_inference_steps", str(self.config["grid_steps"]),
        ]  # fmt: skip

    def launch(self, arguments: List[str], what: str) -> float:
        """Runs `accelerate launch train.py arguments`; returns the CPU seconds it took (all its processes)."""
        command = accelerate_train_command() + arguments
        tqdm.write(f"[{self.dataset}] {what}: accelerate launch train.py {' '.join(arguments)}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        if subprocess.run(command, env=self.env).returncode != 0:
            raise RuntimeError(f"[{self.dataset}] {what} failed (train.py's output is above).")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def stage_score(self, stage: str) -> None:
        steps = self.config["score_steps"]
        arguments = [
            "--train_component", "score",
            "--unet_config", "tiny",
            "--score_time_range", "full",
            "--num_channels", str(self.settings["channels"]),
            "--resolution", str(RESOLUTION),
            "--sigma_max", str(self.settings["sigma_max"]),
            "--max_train_steps", str(steps),
            "--checkpointing_steps", str(max(1, min(500, steps))),
            "--checkpoints_total_limit", "1",
            "--resume_from_checkpoint", "latest",
            "--save_images_steps", str(steps),
            "--output_dir", str(self.models_dir / "score"),
            *self.common_arguments(),
        ]  # fmt: skip
        if self.done(stage, arguments):
            return
        start = time.perf_counter()
        record_path = self.models_dir / "score.arguments.json"
        if record_path.is_file() and json.loads(record_path.read_text()) != arguments:  # other settings: afresh
            shutil.rmtree(self.models_dir / "score", ignore_errors=True)
        write_json_atomically(arguments, record_path)
        self.launch(arguments, "score network")
        self.finish(stage, arguments, time.perf_counter() - start)

    def score_version(self) -> float:
        """When the score network's weights were saved (a retrained network invalidates its priors)."""
        return (self.models_dir / "score" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime

    # -- 3. the flows -------------------------------------------------------------------------------------------------

    def held_out_points(self, t: float):
        """The held-out x(t*) every chunk of a flow is evaluated on: two noise draws of (at most) the first
        `flow_eval_images` test images, seeded."""
        from dinof_diffusers import DiNofScheduler

        scheduler = DiNofScheduler.from_pretrained(str(self.models_dir / "score"), subfolder="scheduler")
        scheduler = DiNofScheduler.from_config(scheduler.config, flow_start=t)
        test = images_to_tensor(self.images("test")[: self.config["flow_eval_images"]], scheduler.data_range)
        return diffuse_images(test, scheduler, num_draws=2, seed=1234)

    def stage_flow(self, stage: str) -> None:
        from dinof_diffusers import FlowPriorModel

        _, size, t_label = stage.split("-")
        t = float(t_label[1:])
        levels, depth, width = self.config["flows"][size]
        chunk = self.config["flow_chunk_steps"][size]
        output_dir = self.models_dir / stage
        base = [
            "--train_component", "flow",
            "--pretrained_model_name_or_path", str(self.models_dir / "score"),
            "--flow_start", str(t),
            "--flow_num_levels", str(levels),
            "--flow_depth", str(depth),
            "--flow_hidden_channels", str(width),
            "--checkpointing_steps", str(chunk),
            "--checkpoints_total_limit", "1",
            "--resume_from_checkpoint", "latest",
            "--save_images_steps", str(10**9),  # the grid at the end only
            "--output_dir", str(output_dir),
            *self.common_arguments(),
        ]  # fmt: skip
        record = {
            "arguments": base,
            "budget": self.config["flow_budget_seconds"],
            "chunk": chunk,
            "score": self.score_version(),
        }
        if self.done(stage, record):
            return
        progress_path = output_dir / "chunks.json"
        progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"record": None}
        if progress["record"] != record:  # other settings: start the flow afresh
            shutil.rmtree(output_dir, ignore_errors=True)
            progress = {"record": record, "chunks": []}
        output_dir.mkdir(parents=True, exist_ok=True)
        previous_path = output_dir / "previous_nll.npy"
        previous = np.load(previous_path) if progress["chunks"] and previous_path.is_file() else None
        points = self.held_out_points(t)
        while not (progress["chunks"] and progress["chunks"][-1]["stop"]):
            chunks = progress["chunks"]
            spent = sum(c["cpu_seconds"] for c in chunks)
            steps = chunk * (len(chunks) + 1)
            start = time.perf_counter()
            cpu_seconds = self.launch([*base, "--max_train_steps", str(steps)], f"flow {size}, t* {t:g}, to {steps}")
            seconds = time.perf_counter() - start
            flow = FlowPriorModel.from_pretrained(str(output_dir), subfolder="flow_prior").eval()
            nll = -prior_log_prob(flow, points.reshape(-1, *points.shape[2:]), show_progress=False)
            per_image = nll.reshape(points.shape[:2]).mean(0).numpy() / (math.prod(points.shape[2:]) * math.log(2.0))
            entry = {"steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds}
            entry["held_out_bits_per_dim"] = float(per_image.mean())
            entry.update(chunk_verdict(previous, per_image, spent + cpu_seconds, len(chunks) + 1, self.config))
            np.save(previous_path, per_image)
            previous = per_image
            progress["chunks"].append(entry)
            write_json_atomically(progress, progress_path)
            tqdm.write(f"[{self.dataset}] {stage}: {entry}")
        flow = FlowPriorModel.from_pretrained(str(output_dir), subfolder="flow_prior")
        parameters = sum(p.numel() for p in flow.parameters())
        self.finish(
            stage,
            record,
            sum(c["seconds"] for c in progress["chunks"]),
            chunks=progress["chunks"],
            parameters=parameters,
        )

    # -- 4. the Gaussian priors ---------------------------------------------------------------------------------------

    def stage_gaussian(self, stage: str) -> None:
        _, covariance, t_label = stage.split("-")
        arguments = [
            "--train_component", "gaussian_prior",
            "--gaussian_covariance", covariance,
            "--pretrained_model_name_or_path", str(self.models_dir / "score"),
            "--flow_start", t_label[1:],
            "--output_dir", str(self.models_dir / stage),
            *self.common_arguments(),
        ]  # fmt: skip
        record = {"arguments": arguments, "score": self.score_version()}
        if self.done(stage, record):
            return
        start = time.perf_counter()
        train = load_script(TRAIN_SCRIPT)  # train.py's own code path, in this process (no training loop to launch)
        train.main(train.parse_args(arguments))
        self.finish(stage, record, time.perf_counter() - start)

    # -- 5. the diagnostic and the samples ----------------------------------------------------------------------------

    def flow_gain_arguments(self, seed: int) -> List[str]:
        config = self.config
        arguments = [
            "--pipeline", str(self.models_dir / "score"),
            "--dataset_name", str(self.data_dir),
            "--output_dir", str(self.root / f"flow_gain-seed{seed}"),
            "--t_star", *[f"{t:g}" for t in config["t_stars"]],
            "--seed", str(seed),
            "--num_draws", str(config["num_draws"]),
            "--max_train_points", str(config["max_train_points"]),
            "--samples", str(config["samples"]),
            "--sample_batch_size", str(config["sample_batch_size"]),
            "--num_train_timesteps", str(config["grid_n"]),
            "--quality_features", config.get("features") or self.settings["features"],
            "--num_bootstrap", str(config["num_bootstrap"]),
        ]  # fmt: skip
        if config["max_test_images"]:
            arguments += ["--max_test_images", str(config["max_test_images"])]
        for t in config["t_stars"]:
            for size in config["flows"]:
                arguments += ["--prior", f"flow_{size}={self.models_dir / f'flow-{size}-{t_name(t)}'}"]
            for covariance in COVARIANCES:  # train.py's Gaussians: their NLL must equal flow_gain.py's closed form
                arguments += [
                    "--prior",
                    f"fitted_{covariance}={self.models_dir / f'gaussian-{covariance}-{t_name(t)}'}",
                ]
        sampled = [f"flow_{size}" for size in config["flows"]] + ["gaussian_full", "gaussian_diagonal", "baseline"]
        if seed == config["seeds"][0]:
            return arguments + ["--baseline_n", *map(str, config["baseline_n"]), "--sample_models", *sampled]
        return arguments + ["--skip_nll", "--sample_models", *config["key_models"]]

    def stage_flow_gain(self, stage: str) -> None:
        seed = int(stage.split("seed")[1])
        arguments = self.flow_gain_arguments(seed)
        record = {"arguments": arguments, "models": self.model_fingerprints()}
        if self.done(stage, record):
            return
        start = time.perf_counter()
        load_script(FLOW_GAIN_SCRIPT).main(arguments)  # resumable part by part
        self.finish(stage, record, time.perf_counter() - start)

    def model_fingerprints(self) -> Dict[str, float]:
        """When each model was last saved: retrained models invalidate the diagnostic (flow_gain.py itself redoes only
        the parts whose weights changed)."""
        return {path.parent.name: path.stat().st_mtime for path in sorted(self.models_dir.glob("*/model_index.json"))}


def chunk_verdict(previous, current, seconds: float, num_chunks: int, config: Dict) -> Dict:
    """Whether a flow trains on after a chunk: "flattened" when the held-out NLL (bits/dim per image, paired over the
    same points) improved by less than `flatten_bits_per_dim` or two standard errors, "budget" when `seconds` (CPU) of
    training have reached the flow's budget, "max_chunks"; `None` to go on. Also the improvement and its standard
    error (after the first chunk)."""
    verdict = {"stop": None}
    if previous is not None:
        gain = np.asarray(previous) - np.asarray(current)
        se = float(gain.std(ddof=1) / math.sqrt(len(gain)))
        verdict.update(improvement=float(gain.mean()), improvement_se=se)
        if gain.mean() < max(config["flatten_bits_per_dim"], 2.0 * se):
            verdict["stop"] = "flattened"
    if verdict["stop"] is None and seconds >= config["flow_budget_seconds"]:
        verdict["stop"] = "budget"
    if verdict["stop"] is None and num_chunks >= config["flow_max_chunks"]:
        verdict["stop"] = "max_chunks"
    return verdict


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


def collect(output_dir: Path, datasets: List[str], config: Dict) -> Dict:
    """Per data set: the flow_gain.json of every seed, the flow training records and the stage timings."""
    report = {}
    for dataset in datasets:
        root = output_dir / dataset
        state = json.loads((root / "state.json").read_text())
        report[dataset] = {
            "seeds": {
                seed: json.loads((root / f"flow_gain-seed{seed}" / "flow_gain.json").read_text())
                for seed in config["seeds"]
            },
            "flows": {
                stage: {"chunks": entry["chunks"], "parameters": entry["parameters"], "seconds": entry["seconds"]}
                for stage, entry in state["stages"].items()
                if stage.startswith("flow-")
            },
            "stage_seconds": {stage: entry["seconds"] for stage, entry in state["stages"].items()},
        }
    return report


def _bpd(estimate) -> str:
    return "-" if not estimate else f"{estimate['bits_per_dim']:+.4f} ± {estimate['bits_per_dim_se']:.4f}"


def _fd(entry) -> str:
    from dinof_diffusers.evaluation.sample_quality import format_interval

    return "-" if entry is None else format_interval(entry["fd"])


def markdown(report: Dict, config: Dict, meta: Dict) -> str:
    from dinof_diffusers.evaluation.sample_quality import format_interval

    sizes = list(config["flows"])
    lines = [
        "# Where the flow prior pays: the headroom study",
        "",
        f"`{meta['command']}`: {meta['wall_seconds'] / 60:.1f} min wall on {meta['cpu_count']} CPU cores "
        f"({meta['jobs']} worker(s), {meta['threads']} torch thread(s) each), torch {meta['torch']}.",
        "",
        "## Likelihoods of held-out x(t*) (bits/dim ± standard error over images; paired differences)",
        "",
        "headroom = full Gaussian - exact mixture of the training images (upper: noisy training images; lower: "
        "held-out); gain = full Gaussian - prior on held-out points (positive: the prior is better); share = gain / "
        "upper headroom. `fitted - closed form`: the largest |NLL difference| between train.py's Gaussian priors and "
        "flow_gain.py's closed-form ones (a consistency check).",
        "",
        "| data | t* | headroom (upper) | headroom (lower) | diagonal - full | "
        + " | ".join(f"flow {s}: gain | share" for s in sizes)
        + " | fitted - closed form |",
        "|---|---:|---:|---:|---:|" + "---:|---:|" * len(sizes) + "---:|",
    ]
    for dataset, entry in report.items():
        nll = entry["seeds"][config["seeds"][0]]["nll"]
        for key in sorted(nll, key=float):
            result = nll[key]
            diffs = result["differences"]["test"]
            cells = [
                dataset,
                key,
                _bpd(result["headroom_train"]),
                _bpd(result["headroom_test"]),
                _bpd(diffs.get("gaussian_diagonal - gaussian_full")),
            ]
            for size in sizes:
                share = result["shares"].get(f"flow_{size}")
                cells += [
                    _bpd(diffs.get(f"gaussian_full - flow_{size}")),
                    "-" if share is None else f"{share['share']:+.2f} ± {share['se']:.2f}",
                ]
            test = result["nll"]["test"]
            gaps = [
                abs(test[f"fitted_{cov}"]["bits_per_dim"] - test[f"gaussian_{cov}"]["bits_per_dim"])
                for cov in COVARIANCES
                if f"fitted_{cov}" in test
            ]
            cells.append(f"{max(gaps):.1e}" if gaps else "-")
            lines.append("| " + " | ".join(cells) + " |")

    seeds = config["seeds"]
    rows = [f"flow_{s}" for s in sizes] + ["gaussian_full", "gaussian_diagonal", "baseline"]
    lines += [
        "",
        f"## Sample quality at equal NFE ({config['samples']} samples a row; ± 1.96 bootstrap sd over samples)",
        "",
        f"The PC sampler (reverse diffusion + one Langevin step) on the N = {config['grid_n']} grid: int(N t*) steps "
        "from each prior at t*, and the baseline from T with as many steps (NFE = 2 x steps). FD: Fréchet distance to "
        "the training images (digits: the digit classifier's features; patches: the top 32 principal components of "
        f"the training patches). Δ: FD(row) - FD(full Gaussian), paired sample by sample; seed {seeds[-1]}: the key "
        "rows again with another sampling seed.",
        "",
        "| data | t* | NFE | "
        + " | ".join(f"FD {row}" for row in rows)
        + " | Δ FD flow - full Gaussian | "
        + f"Δ FD (seed {seeds[-1]}) | NN ratio flow / full Gaussian |",
        "|---|---:|---:|" + "---:|" * len(rows) + "---:|---:|---:|",
    ]
    key_flow = config["key_models"][0]
    for dataset, entry in report.items():
        quality = entry["seeds"][seeds[0]]["quality"]
        second = entry["seeds"][seeds[-1]]["quality"] if len(seeds) > 1 else {}
        for t in config["t_stars"]:
            prefix = f"t{t:g}/"
            cells = [dataset, f"{t:g}", f"{quality.get(prefix + 'gaussian_full', {}).get('nfe', 0) or 0:.0f}"]
            cells += [_fd(quality.get(prefix + row)) for row in rows]
            flow_row, gaussian_row = quality.get(prefix + key_flow), quality.get(prefix + "gaussian_full")
            cells.append(format_interval((flow_row or {}).get("fd_minus_gaussian_full")))
            cells.append(format_interval((second.get(prefix + key_flow) or {}).get("fd_minus_gaussian_full")))
            ratios = "-"
            if flow_row and gaussian_row:
                ratios = f"{flow_row['nn_ratio']['value']:.3f} / {gaussian_row['nn_ratio']['value']:.3f}"
            cells.append(ratios)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| data | row | NFE | FD | NN ratio |", "|---|---|---:|---:|---:|"]
    for dataset, entry in report.items():
        quality = entry["seeds"][seeds[0]]["quality"]
        for name, row in quality.items():
            if not name.startswith("t"):
                lines.append(
                    f"| {dataset} | {name} | {row['nfe'] or 0:.0f} | {format_interval(row['fd'])} | "
                    f"{format_interval(row['nn_ratio'], 3)} |"
                )
    lines += ["", "## Flow training (held-out bits/dim of x(t*) after the last chunk)", ""]
    lines += [
        "| data | flow | parameters | steps | held-out bits/dim | stopped | CPU s | wall s |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for dataset, entry in report.items():
        for stage, flow in entry["flows"].items():
            last = flow["chunks"][-1]
            lines.append(
                f"| {dataset} | {stage} | {flow['parameters']} | {last['steps']} | "
                f"{last['held_out_bits_per_dim']:.4f} | {last['stop']} | "
                f"{sum(c['cpu_seconds'] for c in flow['chunks']):.0f} | {flow['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot_flow_training(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(report), figsize=(6.5 * len(report), 4.2), squeeze=False)
    for axis, (dataset, entry) in zip(axes[0], report.items()):
        for stage, flow in sorted(entry["flows"].items()):
            chunks = flow["chunks"]
            axis.plot(
                [c["steps"] for c in chunks], [c["held_out_bits_per_dim"] for c in chunks], marker="o", label=stage
            )
        axis.set_xlabel("flow training steps")
        axis.set_ylabel("held-out NLL of x(t*) (bits/dim)")
        axis.set_title(f"{dataset}: flow training, chunk by chunk")
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=100)


def write_report(output_dir: Path, datasets: List[str], config: Dict, meta: Dict) -> None:
    report = collect(output_dir, datasets, config)
    write_json_atomically({"meta": meta, "config": config, "datasets": report}, output_dir / "results.json")
    write_text_atomically(markdown(report, config, meta), output_dir / "results.md")
    flow_gain = load_script(FLOW_GAIN_SCRIPT)
    panels = {dataset: entry["seeds"][config["seeds"][0]] for dataset, entry in report.items()}
    flow_gain.plot_flow_gain(panels, output_dir / "flow_gain_study.png")
    plot_flow_training(report, output_dir / "flow_training.png")


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output_dir", default="outputs/study", help="Everything: data, models, samples, report.")
    parser.add_argument("--quick", action="store_true", help="Tiny everything: seconds (the tests).")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--jobs", type=int, default=2, help="Data sets run side by side (worker processes).")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker and training run; default 1 with --jobs > 1, else chosen by timing",
    )
    parser.add_argument("--worker", choices=DATASETS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be >= 1.")
    return args


def run_workers(args, config: Dict) -> None:
    """The data sets' stages: in worker processes side by side (logs in logs/), or here one after the other."""
    output_dir = Path(args.output_dir)
    if args.jobs == 1 or len(args.datasets) == 1:
        for dataset in args.datasets:
            Worker(dataset, args, config).run()
        return
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--output_dir",
        str(output_dir),
        "--threads",
        str(args.threads),
    ]
    command += ["--quick"] if args.quick else []
    env = {**subprocess_environment(args), "PYTHONUNBUFFERED": "1"}  # the logs as they happen
    processes, logs = {}, {}
    for dataset in args.datasets:
        logs[dataset] = open(output_dir / "logs" / f"{dataset}.log", "a")
        processes[dataset] = subprocess.Popen(
            command + ["--worker", dataset], env=env, stdout=logs[dataset], stderr=subprocess.STDOUT
        )
    total = sum(len(Worker(d, args, config).stages()) for d in args.datasets)
    with tqdm(total=total, desc="study stages", unit="stage") as bar:
        while any(process.poll() is None for process in processes.values()):
            time.sleep(2.0)
            done = 0
            for dataset in args.datasets:
                path = output_dir / dataset / "state.json"
                done += len(json.loads(path.read_text())["stages"]) if path.is_file() else 0
            bar.update(done - bar.n)
    for log in logs.values():
        log.close()
    failed = [dataset for dataset, process in processes.items() if process.returncode != 0]
    if failed:
        tails = "\n".join(
            f"--- logs/{d}.log ---\n{(output_dir / 'logs' / f'{d}.log').read_text()[-3000:]}" for d in failed
        )
        raise SystemExit(f"The stages of {failed} failed:\n{tails}")


def main(argv=None):
    args = parse_args(argv)
    config = copy.deepcopy(QUICK if args.quick else FULL)
    if args.threads is None:
        if args.quick or (args.jobs > 1 and len(args.datasets) > 1):
            args.threads = 1
        else:
            timings = choose_threads(sorted({1, torch.get_num_threads()}))
            args.threads = min(timings, key=timings.get)
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        Worker(args.worker, args, config).run()
        return None
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_workers(args, config)
    meta = {
        "command": " ".join(["python benchmarks/flow_gain_study.py", *(argv if argv is not None else sys.argv[1:])]),
        "wall_seconds": time.perf_counter() - start,
        "cpu_count": os.cpu_count(),
        "jobs": min(args.jobs, len(args.datasets)),
        "threads": args.threads,
        "torch": torch.__version__,
        "quick": args.quick,
    }
    previous = output_dir / "results.json"
    if previous.is_file():  # a resumed study: the wall time of every run adds up
        meta["wall_seconds_earlier_runs"] = json.loads(previous.read_text())["meta"].get("wall_seconds_total", 0.0)
    meta["wall_seconds_total"] = meta["wall_seconds"] + meta.get("wall_seconds_earlier_runs", 0.0)
    write_report(output_dir, args.datasets, config, meta)
    tqdm.write(f"wrote {output_dir / 'results.md'}, flow_gain_study.png and flow_training.png")
    print((output_dir / "results.md").read_text())
    return meta


if __name__ == "__main__":
    main()
