#!/usr/bin/env python
# Copyright 2024 The dinof-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Performance ratios of dinof-diffusers, each measured side by side in one run.

Every number this script reports is a ratio of two (or more) timings taken in the same process, with their repeats
interleaved (A, B, B, A, A, B, ...) and summarised by their median, so that a machine whose load changes during the
run (shared CPUs) shifts both sides alike. Absolute timings are printed for context only.

Ratios (one line each, `ratio <name> = <value>`):

- `pipeline_overhead`: wall time of the baseline `DiNofPipeline` call (PC sampler from the SDE prior, N steps with one
  Langevin corrector step each) / (NFE x the bare `UNet2DModel` forward of the same batch). The limit is 1.0; the
  excess is the scheduler's and the pipeline's own work per step.
- `dinof_over_baseline`: wall time of DiNof (flow prior, then int(0.6 N) steps) / wall time of the baseline (N steps),
  same UNet, batch and N (1000 in the full mode). The ideal is NFE ratio (0.6) + one flow pass / baseline wall,
  printed beside it.
- `ode_heun_overhead`: wall time of the probability-flow ODE sampler (`sampler="ode"`, heun, `ode_heun_steps` steps
  from the flow prior's x(t*)) / (NFE x the bare UNet forward); target <= 1.05. The flow pass is included (it is
  small beside the steps).
- `ode_rk45_overhead`: the same for rk45 at rtol = atol = `ode_rk45_tolerance` (1e-5, published; its NFE beside it):
  the adaptive solver's own work per network evaluation (error norms in float64, step control).
- `flow_log_prob_vs_normflows`, `flow_sample_vs_normflows`: `FlowPriorModel.log_prob` / `sample` time over the same
  call of normflows 1.7.3's `MultiscaleFlow` of `GlowBlock`s in the published DiNof layout (docs/DESIGN.md, "The
  Glow flow prior"), with identical weights: the FlowPriorModel is built from the normflows state dict with
  `FlowPriorModel.from_original_state_dict`, and the script checks that both give the same log p (float64 to 1e-8
  relative) and the same samples from the same latents before timing anything. < 1 means FlowPriorModel is faster.
  normflows' `sample` also returns the log-density of its samples (its API has no sampling call without it); the
  FlowPriorModel caches the inverse 1x1 convolution weights while the weights do not change, normflows inverts them
  at every call.
- `flow_train_step_vs_normflows`: one training step (forward NLL of a batch, backward, Adam step) of FlowPriorModel
  over the same step of normflows, from identical weights.
- `evaluation_two_processes`: the generation throughput (images / s, as `training_scripts/evaluate.py` writes it to
  `metrics.json`: the sampling alone, without start-up) of `accelerate launch` on 2 CPU processes with one thread
  each over a plain run (1 process) with one thread, same tiny pipeline (the sampler ratios' UNet and flow), sample
  count, batch size and steps (ideal 2.0; below it: the per-round gathering of the batches' records, the manifest
  writes, and processes waiting for each other). The runs alternate (1, 2, 2, 1, ...) and the medians are compared;
  every run is a fresh subprocess. On a CPU with fewer than 2 free cores the ratio measures the machine, not the
  code: run it on a quiet machine.

Timings (one line each, `timing <name> = <milliseconds> ms`, no ratio: the published network is not a dependency, its
comparison is measured once and quoted in the README): `ncsnpp_forward`, `ncsnpp_forward_backward`, the median time
of `NCSNppModel` (the published CIFAR-10 NCSN++ config `ncsnpp-cifar10-ve`, width `--ncsnpp_nf`) on a batch of
`--ncsnpp_batch` images, so that regressions show.

The full mode uses the paper's flow (L = 3, K = 16, hidden 256, 32x32x3, batch 32) for the flow ratios and the tiny
preset's UNet (16x16x3, batch 16, N = 1000) for the sampler ratios; `--quick` shrinks everything so that the script
runs in seconds (the test suite runs it so that it cannot rot). Every size is a flag.

    python benchmarks/perf.py                       # full: a few minutes on 2 CPU cores
    python benchmarks/perf.py --quick --output perf.json
"""

import argparse
import copy
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import diffusers  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402

from dinof_diffusers.file_utils import write_json_atomically  # noqa: E402
from dinof_diffusers.models.flow_prior import FlowPriorModel  # noqa: E402
from dinof_diffusers.models.glow_layout import GlowLayout  # noqa: E402
from dinof_diffusers.models.ncsnpp import NCSNppModel  # noqa: E402
from dinof_diffusers.models.ncsnpp_configs import NCSNPP_PUBLISHED_CONFIGS  # noqa: E402
from dinof_diffusers.pipelines.dinof import DiNofPipeline  # noqa: E402
from dinof_diffusers.schedulers import DiNofScheduler  # noqa: E402
from dinof_diffusers.training.presets import get_preset  # noqa: E402

FULL = {
    "unet_preset": "tiny",
    "unet_resolution": 16,
    "unet_channels": 3,
    "unet_batch": 16,
    "num_train_timesteps": 1000,
    "ode_heun_steps": 50,
    "ode_rk45_tolerance": 1e-5,
    "forwards_per_timing": 100,
    "flow_resolution": 32,
    "flow_channels": 3,
    "flow_levels": 3,
    "flow_depth": 16,
    "flow_hidden": 256,
    "flow_batch": 32,
    "repeats": 5,
    "sampler_repeats": 4,
    "warmup": 1,
    "ncsnpp_nf": 128,
    "ncsnpp_resolution": 32,
    "ncsnpp_batch": 8,
    "evaluation_samples": 32,
    "evaluation_batch": 4,
    "evaluation_steps": 100,
    "evaluation_repeats": 3,
}
QUICK = {
    **FULL,
    "unet_batch": 4,
    "num_train_timesteps": 20,
    "ode_heun_steps": 5,
    "ode_rk45_tolerance": 1e-2,
    "forwards_per_timing": 5,
    "flow_resolution": 8,
    "flow_levels": 2,
    "flow_depth": 2,
    "flow_hidden": 16,
    "flow_batch": 4,
    "repeats": 3,
    "sampler_repeats": 2,
    "warmup": 1,
    "ncsnpp_nf": 16,
    "ncsnpp_resolution": 16,
    "evaluation_samples": 4,
    "evaluation_batch": 2,
    "evaluation_steps": 4,
    "evaluation_repeats": 1,
}


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    functions: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, Dict[str, List[float]]]]:
    """Times several functions side by side.

    Every function is first called `warmup` times; then `repeats` rounds follow, each calling every function once,
    in an order that is reversed every other round (so neither side always runs first, e.g. right after the other
    warmed the caches). Each call is timed twice: wall clock (`time.perf_counter`) and this process's CPU time
    (`time.process_time`, all threads). On a shared machine the CPU time does not count the time other processes
    hold the cores, so with one thread (`--threads 1`) its ratios are the more robust ones; with several threads it
    also counts their spinning.

    Args:
        functions: name -> a function without arguments.
        repeats: rounds of timed calls (>= 1).
        warmup: untimed calls of each function before the first round.
        device: the device whose queue is synchronised around each timed call.

    Returns:
        `(wall, cpu, times)`: the median wall and CPU seconds per function, and every timed call's seconds
        (`times[name]["wall"]`, `times[name]["cpu"]`).
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: {"wall": [], "cpu": []} for name in functions}
    names = list(functions)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            _synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            functions[name]()
            _synchronize(device)
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    wall_medians = {name: statistics.median(values["wall"]) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values["cpu"]) for name, values in times.items()}
    return wall_medians, cpu_medians, times


# ---------------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> Dict[str, object]:
    """Versions, threads and the machine the timings come from."""
    import normflows

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "normflows": getattr(normflows, "__version__", "unknown"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def report_ratio(results: Dict[str, dict], name: str, value: float, description: str, **details) -> None:
    """Prints one ratio as one line and stores it with its details."""
    results[name] = {"value": value, "description": description, **details}
    shown = ", ".join(f"{key} {_format(val)}" for key, val in details.items() if not isinstance(val, (list, dict)))
    print(f"ratio {name} = {value:.4f}    {description}" + (f" | {shown}" if shown else ""), flush=True)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------------------
# The sampler ratios
# ---------------------------------------------------------------------------------------------------------------------


def build_sampler_pipeline(config: dict, device: torch.device) -> DiNofPipeline:
    """A DiNofPipeline of the preset's UNet, its flow prior (ActNorm initialised) and a VE scheduler with N steps."""
    preset = get_preset(config["unet_preset"])
    size, channels = config["unet_resolution"], config["unet_channels"]
    unet_config = preset.get_unet_config()
    unet_config.update(sample_size=size, in_channels=channels, out_channels=channels)
    unet = UNet2DModel(**unet_config).eval()
    flow_prior = FlowPriorModel(sample_size=size, in_channels=channels, **preset.flow_config).eval()
    with torch.no_grad():  # initialise ActNorm on data-like inputs, as after training
        flow_prior.log_prob(torch.rand(8, channels, size, size, generator=torch.Generator().manual_seed(0)))
    scheduler = DiNofScheduler(**{**preset.scheduler_config, "num_train_timesteps": config["num_train_timesteps"]})
    pipeline = DiNofPipeline(unet=unet, scheduler=scheduler, flow_prior=flow_prior).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampler_ratios(config: dict, device: torch.device, results: Dict[str, dict]) -> None:
    """`pipeline_overhead` and `dinof_over_baseline`, from one interleaved set of timings."""
    pipeline = build_sampler_pipeline(config, device)
    batch = config["unet_batch"]
    shape = (batch, config["unet_channels"], config["unet_resolution"], config["unet_resolution"])
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    model_timestep = pipeline.scheduler.model_timestep(torch.full((batch,), 0.5)).to(device)
    forwards = config["forwards_per_timing"]
    tolerance = config["ode_rk45_tolerance"]
    nfe = {}

    def run_pipeline(use_flow_prior, name=None, **sampler_kwargs):
        def call():
            output = pipeline(
                batch_size=batch,
                generator=torch.Generator().manual_seed(0),
                use_flow_prior=use_flow_prior,
                output_type="pt",
                **sampler_kwargs,
            )
            nfe[use_flow_prior if name is None else name] = output.nfe

        return call

    @torch.no_grad()  # as inside the pipeline
    def unet_forwards():
        for _ in range(forwards):
            pipeline.unet(sample, model_timestep)

    @torch.no_grad()
    def flow_sample():
        pipeline.flow_prior.sample(batch, generator=torch.Generator().manual_seed(0))

    print(
        f"sampler: {config['unet_preset']} UNet {shape}, N = {config['num_train_timesteps']}, "
        f"{config['sampler_repeats']} interleaved repeats ...",
        flush=True,
    )
    medians, cpu, times = interleaved_medians(
        {
            "baseline": run_pipeline(False),
            "dinof": run_pipeline(True),
            "ode_heun": run_pipeline(
                True, "ode_heun", sampler="ode", ode_solver="heun", num_inference_steps=config["ode_heun_steps"]
            ),
            "ode_rk45": run_pipeline(
                True, "ode_rk45", sampler="ode", ode_solver="rk45", rtol=tolerance, atol=tolerance
            ),
            "unet_forwards": unet_forwards,
            "flow_sample": flow_sample,
        },
        repeats=config["sampler_repeats"],
        warmup=config["warmup"],
        device=device,
    )
    forward = medians["unet_forwards"] / forwards
    baseline, dinof, flow = medians["baseline"], medians["dinof"], medians["flow_sample"]
    report_ratio(
        results,
        "pipeline_overhead",
        baseline / (nfe[False] * forward),
        "baseline pipeline wall / (NFE x bare UNet forward); limit 1.0",
        cpu_ratio=cpu["baseline"] / (nfe[False] * cpu["unet_forwards"] / forwards),
        nfe=nfe[False],
        pipeline_seconds=baseline,
        unet_forward_ms=forward * 1e3,
        times={name: times[name] for name in ("baseline", "unet_forwards")},
    )
    nfe_ratio = nfe[True] / nfe[False]
    report_ratio(
        results,
        "dinof_over_baseline",
        dinof / baseline,
        f"DiNof wall / baseline wall at N = {config['num_train_timesteps']}; ideal = NFE ratio + flow pass / baseline",
        ideal=nfe_ratio + flow / baseline,
        cpu_ratio=cpu["dinof"] / cpu["baseline"],
        cpu_ideal=nfe_ratio + cpu["flow_sample"] / cpu["baseline"],
        nfe_ratio=nfe_ratio,
        nfe_dinof=nfe[True],
        nfe_baseline=nfe[False],
        dinof_seconds=dinof,
        baseline_seconds=baseline,
        flow_pass_seconds=flow,
        times={name: times[name] for name in ("dinof", "baseline", "flow_sample")},
    )
    for solver in ("heun", "rk45"):
        name = f"ode_{solver}"
        report_ratio(
            results,
            f"{name}_overhead",
            medians[name] / (nfe[name] * forward),
            f"ODE sampler ({solver}) wall / (NFE x bare UNet forward); limit 1.0"
            + ("" if solver == "rk45" else ", target <= 1.05"),
            cpu_ratio=cpu[name] / (nfe[name] * cpu["unet_forwards"] / forwards),
            nfe=nfe[name],
            pipeline_seconds=medians[name],
            times={name: times[name]},
        )


# ---------------------------------------------------------------------------------------------------------------------
# The flow ratios
# ---------------------------------------------------------------------------------------------------------------------


def published_glow(channels: int, size: int, num_levels: int, flow_depth: int, hidden: int):
    """normflows' `MultiscaleFlow` in the published DiNof layout (docs/DESIGN.md, "The Glow flow prior").

    Level i (0 = coarsest) has K `GlowBlock`s on `GlowLayout.level_channels(i)` channels (affine coupling, channel
    split, LU 1x1 convolution, ActNorm) followed by a `Squeeze`; a `Merge` joins level i > 0 to the levels before it;
    each level has a `GlowBase` (per-channel diagonal Gaussian) for its latent, of `GlowLayout.latent_shapes`.
    """
    import normflows as nf

    layout = GlowLayout(channels, num_levels)
    base_distributions, flows, merges = [], [], []
    for i, latent_shape in enumerate(layout.latent_shapes(size, size)):
        blocks = [
            nf.flows.GlowBlock(layout.level_channels(i), hidden, split_mode="channel", scale=True)
            for _ in range(flow_depth)
        ]
        flows.append(blocks + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
        base_distributions.append(nf.distributions.GlowBase(latent_shape))
    return nf.MultiscaleFlow(base_distributions, flows, merges, class_cond=False)


def flow_data(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Stand-ins for x(t*): uniform "images" plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator) + 0.5 * torch.randn(
        batch, channels, size, size, generator=generator
    )


def trained_like_glow(config: dict):
    """The normflows flow with ActNorm initialised on data and every parameter perturbed (as after training)."""
    channels, size = config["flow_channels"], config["flow_resolution"]
    torch.manual_seed(config["seed"])
    flow = published_glow(channels, size, config["flow_levels"], config["flow_depth"], config["flow_hidden"])
    with torch.no_grad():
        flow.log_prob(flow_data(max(config["flow_batch"], 8), channels, size, seed=1), None)
        generator = torch.Generator().manual_seed(2)
        for name, parameter in flow.named_parameters():
            std = 0.1 if name.startswith("q0") else 0.01
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return flow.eval()


def check_same_flow(reference, config: dict) -> Dict[str, float]:
    """Raises if FlowPriorModel, built from the normflows state dict, does not compute the same flow.

    log p of a small batch must agree to 1e-8 relative in float64 and the samples from the same latents to 1e-8
    absolute; the float32 differences on the benchmark batch are returned for the record.
    """
    size = config["flow_resolution"]
    reference64 = copy.deepcopy(reference).double()
    model64 = FlowPriorModel.from_original_state_dict(reference64.state_dict(), sample_size=size)
    x = flow_data(2, config["flow_channels"], size, seed=3).double()
    with torch.no_grad():
        expected = reference64.log_prob(x, None)
        got = model64.log_prob(x)
        relative = ((got - expected).abs() / expected.abs()).max().item()
        latents, _ = reference64.inverse_and_log_det(x)
        latents = [torch.randn_like(z) for z in latents]
        expected_x, _ = reference64.forward_and_log_det(latents)
        sample_error = (model64.decode(latents) - expected_x).abs().max().item()
    if not (relative < 1e-8 and sample_error < 1e-8):
        raise RuntimeError(
            "FlowPriorModel.from_original_state_dict does not reproduce the normflows flow (float64: log p relative "
            f"difference {relative:.3g}, sample difference {sample_error:.3g}); the comparison would be meaningless."
        )
    return {"float64_log_prob_max_relative_difference": relative, "float64_sample_max_abs_difference": sample_error}


def flow_ratios(config: dict, device: torch.device, results: Dict[str, dict]) -> None:
    """`flow_log_prob_vs_normflows`, `flow_sample_vs_normflows` and `flow_train_step_vs_normflows`."""
    channels, size, batch = config["flow_channels"], config["flow_resolution"], config["flow_batch"]
    reference = trained_like_glow(config)
    checks = check_same_flow(reference, config)
    reference = reference.to(device)
    model = FlowPriorModel.from_original_state_dict(reference.state_dict(), sample_size=size).to(device).eval()
    x = flow_data(batch, channels, size, seed=4).to(device)
    with torch.no_grad():
        difference = (model.log_prob(x) - reference.log_prob(x, None)).abs()
        checks["float32_log_prob_max_relative_difference"] = (
            (difference / reference.log_prob(x, None).abs()).max().item()
        )
    num_parameters = sum(p.numel() for p in model.parameters())
    print(
        f"flow: L = {config['flow_levels']}, K = {config['flow_depth']}, hidden {config['flow_hidden']}, "
        f"{channels}x{size}x{size}, batch {batch}, {num_parameters / 1e6:.2f}M parameters; same flow as normflows "
        f"(float64 log p rel. diff {checks['float64_log_prob_max_relative_difference']:.1e}, float32 "
        f"{checks['float32_log_prob_max_relative_difference']:.1e}); {config['repeats']} interleaved repeats ...",
        flush=True,
    )

    @torch.no_grad()
    def ours_log_prob():
        model.log_prob(x)

    @torch.no_grad()
    def normflows_log_prob():
        reference.log_prob(x, None)

    @torch.no_grad()
    def ours_sample():
        model.sample(batch)

    @torch.no_grad()
    def normflows_sample():
        reference.sample(batch)

    # training: copies of the same weights, one Adam each
    train_model = FlowPriorModel.from_original_state_dict(reference.state_dict(), sample_size=size).to(device)
    train_model.train()
    train_reference = copy.deepcopy(reference).train()
    optimizers = {
        "ours": torch.optim.Adam(train_model.parameters(), lr=1e-5),
        "normflows": torch.optim.Adam(train_reference.parameters(), lr=1e-5),
    }

    def ours_train_step():
        loss = -train_model.log_prob(x).mean()
        loss.backward()
        optimizers["ours"].step()
        optimizers["ours"].zero_grad(set_to_none=True)

    def normflows_train_step():
        loss = train_reference.forward_kld(x)
        loss.backward()
        optimizers["normflows"].step()
        optimizers["normflows"].zero_grad(set_to_none=True)

    medians, cpu, times = interleaved_medians(
        {
            "ours_log_prob": ours_log_prob,
            "normflows_log_prob": normflows_log_prob,
            "ours_sample": ours_sample,
            "normflows_sample": normflows_sample,
            "ours_train_step": ours_train_step,
            "normflows_train_step": normflows_train_step,
        },
        repeats=config["repeats"],
        warmup=config["warmup"],
        device=device,
    )
    for name, label in (("log_prob", "log_prob"), ("sample", "sample"), ("train_step", "training step")):
        ours, theirs = medians[f"ours_{name}"], medians[f"normflows_{name}"]
        details = {
            "cpu_ratio": cpu[f"ours_{name}"] / cpu[f"normflows_{name}"],
            "ours_seconds": ours,
            "normflows_seconds": theirs,
            "batch": batch,
        }
        if name == "log_prob":
            details.update(checks)
        report_ratio(
            results,
            f"flow_{name}_vs_normflows",
            ours / theirs,
            f"FlowPriorModel / normflows Glow, {label} (< 1: faster)",
            **details,
            times={"ours": times[f"ours_{name}"], "normflows": times[f"normflows_{name}"]},
        )


# ---------------------------------------------------------------------------------------------------------------------
# The score network's timings
# ---------------------------------------------------------------------------------------------------------------------


def ncsnpp_timings(config: dict, device: torch.device, timings: Dict[str, dict]) -> None:
    """Median forward and forward + backward times of NCSNppModel (`ncsnpp-cifar10-ve` options, training mode)."""
    options = dict(NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve"], nf=config["ncsnpp_nf"])
    options["sample_size"] = config["ncsnpp_resolution"]
    model = NCSNppModel(**options).to(device).train()
    batch, size = config["ncsnpp_batch"], config["ncsnpp_resolution"]
    sample = torch.rand(batch, options["in_channels"], size, size, device=device)
    sigmas = torch.full((batch,), 1.0, device=device)

    def forward():
        with torch.no_grad():
            model(sample, sigmas)

    def forward_backward():
        model(sample, sigmas).sample.square().mean().backward()
        model.zero_grad(set_to_none=True)

    wall, cpu, _ = interleaved_medians(
        {"ncsnpp_forward": forward, "ncsnpp_forward_backward": forward_backward},
        config["repeats"],
        config["warmup"],
        device,
    )
    parameters = sum(p.numel() for p in model.parameters())
    for name in wall:
        timings[name] = {"milliseconds": 1e3 * wall[name], "cpu_milliseconds": 1e3 * cpu[name], "batch": batch}
        print(
            f"timing {name} = {1e3 * wall[name]:.1f} ms    NCSNppModel nf {options['nf']}, {size}x{size}, batch {batch}, "
            f"{parameters} parameters | cpu {1e3 * cpu[name]:.1f} ms",
            flush=True,
        )


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation ratio
# ---------------------------------------------------------------------------------------------------------------------

EVALUATE_SCRIPT = REPO_ROOT / "training_scripts" / "evaluate.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_evaluation(pipeline_dir: Path, output_dir: Path, num_processes: int, config: dict) -> dict:
    """evaluate.py on `num_processes` CPU processes of one thread each: a plain `python` run for one, `accelerate
    launch` (gloo, as the tests) for more; returns its `metrics.json`."""
    if num_processes == 1:
        command = [sys.executable, str(EVALUATE_SCRIPT), "--device", "cpu"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
        command += ["--num_processes", str(num_processes), "--num_cpu_threads_per_process", "1"]
        command += ["--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += [str(EVALUATE_SCRIPT)]
    command += ["--pipeline", str(pipeline_dir), "--output_dir", str(output_dir), "--metrics", "none"]
    command += ["--num_samples", str(config["evaluation_samples"]), "--batch_size", str(config["evaluation_batch"])]
    command += ["--num_inference_steps", str(config["evaluation_steps"]), "--no_progress"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"evaluate.py on {num_processes} process(es) failed:\n{result.stderr[-4000:]}")
    with open(output_dir / "metrics.json") as file:
        return json.load(file)


def evaluation_ratio(config: dict, results: Dict[str, dict]) -> None:
    """`evaluation_two_processes`: 2-process over 1-process generation throughput of evaluate.py (CPU)."""
    pipeline = build_sampler_pipeline(config, torch.device("cpu"))
    repeats = config["evaluation_repeats"]
    print(
        f"evaluation: {config['evaluation_samples']} samples in batches of {config['evaluation_batch']}, "
        f"{config['evaluation_steps']} steps, 1 and 2 processes of one thread, {repeats} interleaved repeats ...",
        flush=True,
    )
    throughput: Dict[int, List[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="perf-evaluation-") as workspace:
        pipeline.save_pretrained(Path(workspace) / "pipeline")
        for repeat in range(repeats):
            for num_processes in (1, 2) if repeat % 2 == 0 else (2, 1):
                output_dir = Path(workspace) / f"eval-{num_processes}-{repeat}"
                report = launch_evaluation(Path(workspace) / "pipeline", output_dir, num_processes, config)
                throughput[num_processes].append(report["throughput"]["images_per_second"])
    one, two = statistics.median(throughput[1]), statistics.median(throughput[2])
    report_ratio(
        results,
        "evaluation_two_processes",
        two / one,
        "evaluate.py images / s, 2 processes of one thread over 1; ideal 2.0",
        images_per_second_1=one,
        images_per_second_2=two,
        nfe_per_image=report["nfe"],
        throughputs={str(key): values for key, values in throughput.items()},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and few repeats: runs in seconds.")
    parser.add_argument("--output", type=str, default=None, help="Also write every ratio and timing to this JSON.")
    parser.add_argument("--device", type=str, default="cpu", help="'cpu' or 'cuda'.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only",
        choices=["sampler", "flow", "ncsnpp", "evaluation"],
        default=None,
        help="Run only the sampler ratios, the flow ratios, the NCSNppModel timings or the evaluation ratio.",
    )
    sizes = parser.add_argument_group("sizes (default: the full mode's, or --quick's)")
    for key, value in FULL.items():
        kind = str if isinstance(value, str) else type(value)
        sizes.add_argument(f"--{key}", type=kind, default=None, help=f"full {value}, quick {QUICK[key]}")
    args = parser.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    for key in FULL:
        value = getattr(args, key)
        if value is not None:
            if isinstance(value, float) and not value > 0:
                parser.error(f"--{key} must be > 0, got {value}.")
            if isinstance(value, int) and value < (0 if key == "warmup" else 1):
                parser.error(f"--{key} must be {'>= 0' if key == 'warmup' else '>= 1'}, got {value}.")
            config[key] = value
    if config["flow_resolution"] % 2 ** config["flow_levels"]:
        parser.error("--flow_resolution must be divisible by 2 ** --flow_levels.")
    config["seed"] = args.seed
    return args, config


def main(argv=None) -> Dict[str, object]:
    args, config = parse_args(argv)
    # normflows 1.7.3's LU 1x1 convolution calls the deprecated torch.lu at every inverse.
    warnings.filterwarnings("ignore", message=".*torch.lu is deprecated.*")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    print("environment: " + ", ".join(f"{key} {value}" for key, value in env.items()), flush=True)
    load = env.get("load_average_at_start", [0.0])[0]
    if device.type == "cpu" and load > (os.cpu_count() or 1) - 0.5:
        print(
            f"warning: load average {load} on {os.cpu_count()} CPUs: other processes compete for the cores. The "
            "ratios are measured side by side, but wall times are noisy (compare the cpu_ratio beside each), and "
            "several intra-op threads can run many times slower than one: prefer --threads 1.",
            flush=True,
        )
    print(f"mode: {'quick' if args.quick else 'full'}", flush=True)
    torch.manual_seed(args.seed)

    results: Dict[str, dict] = {}
    start = time.perf_counter()
    if args.only in (None, "sampler"):
        sampler_ratios(config, device, results)
    if args.only in (None, "flow"):
        flow_ratios(config, device, results)
    timings: Dict[str, dict] = {}
    if args.only in (None, "ncsnpp"):
        ncsnpp_timings(config, device, timings)
    if args.only in (None, "evaluation"):
        evaluation_ratio(config, results)
    if hasattr(os, "getloadavg"):
        env["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    total = time.perf_counter() - start
    print(f"done in {total:.1f} s", flush=True)

    bad = [name for name, entry in results.items() if not (math.isfinite(entry["value"]) and entry["value"] > 0)]
    report = {"mode": "quick" if args.quick else "full", "environment": env, "config": config, "ratios": results}
    report["timings"] = timings
    report["seconds"] = total
    if args.output is not None:
        write_json_atomically(report, Path(args.output))
        print(f"wrote {args.output}", flush=True)
    if bad:
        raise SystemExit(f"non-finite or non-positive ratios: {bad}")
    return report


if __name__ == "__main__":
    main()
