#!/usr/bin/env python
r"""Sample a trained DiNof pipeline and save the grid; optionally the baseline beside it, same seed.

python training_scripts/sample.py --pipeline outputs/demo/pipeline --output_dir outputs/demo --compare_baseline
python training_scripts/sample.py --pipeline outputs/demo/pipeline --output_dir outputs/demo/heun --compare_baseline \
    --sampler ode --ode_solver heun --num_inference_steps 20 --timestep_spacing karras

The prior and the sampler are two choices: --prior flow (a sample of the flow prior at t* = flow_start * T: DiNof,
the default for a pipeline with a flow) or sde (the SDE prior at T: the baseline), and --sampler pc (the
predictor-corrector sampler of the reverse SDE, default) or ode (the probability-flow ODE, continuous-time models:
--ode_solver heun|euler|rk45, --timestep_spacing uniform|karras for heun / euler, --rtol / --atol for rk45).

Steps: DiNof runs from t*, the baseline from T. With --compare_baseline (the flow prior's grid `dinof.png` beside
the SDE prior's `baseline.png`, same sampler and seed), --num_inference_steps K is the baseline's number of steps
and DiNof runs int(K * flow_start) steps of the same grid from t* (what the paper compares: NFE ratio flow_start;
for heun / euler the same rule, for rk45 steps do not apply); alone, K is the chosen prior's number of steps.
`sampling.json` records each run's prior, sampler, solver settings, steps, NFE and seconds.
"""

import argparse
import os
import sys
import time

import torch

from dinof_diffusers import DiNofPipeline
from dinof_diffusers.evaluation import EvaluationError
from dinof_diffusers.evaluation.sampler_flags import (
    add_sampler_arguments,
    check_pipeline_sampler,
    check_sampler_arguments,
    sampler_keywords,
    sampler_record,
)
from dinof_diffusers.file_utils import check_writable_folder, write_json_atomically
from dinof_diffusers.image_utils import image_grid, save_image_atomically
from dinof_diffusers.validation import check_positive_int

RUN_NAMES = {"flow": "dinof", "sde": "baseline"}  # prior -> the name of its grid and its entry in sampling.json


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="Folder or Hub id of a saved DiNofPipeline.")
    parser.add_argument("--output_dir", required=True, help="Where the grids and `sampling.json` are written.")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="Reverse steps (PC, or heun / euler ODE steps). With --compare_baseline: the baseline's K, DiNof runs "
        "int(K * flow_start) from t*; otherwise the chosen prior's steps. Default: the scheduler's own (N from T, "
        "int(N * flow_start) from t*).",
    )
    add_sampler_arguments(parser)
    parser.add_argument(
        "--compare_baseline",
        action="store_true",
        help="Also run the same sampler from the SDE prior at T (--prior flow only).",
    )
    parser.add_argument("--grid_scale", type=int, default=4, help="Nearest-neighbour upscaling of the saved grids.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for flag in ("num_images", "grid_scale", "num_inference_steps"):
            check_positive_int(getattr(args, flag), f"--{flag}", allow_none=flag == "num_inference_steps")
        check_sampler_arguments(args)
        if args.compare_baseline and args.prior == "sde":
            raise ValueError("--compare_baseline runs the SDE prior beside the flow prior: leave out --prior sde.")
        check_writable_folder(args.output_dir, "--output_dir")
    except ValueError as error:
        parser.error(str(error))
    return args


def sampler_steps(pipeline: DiNofPipeline, args):
    """Prior -> num_inference_steps of each run: the chosen prior's, and with --compare_baseline the SDE prior's."""
    steps = args.num_inference_steps
    if not (args.compare_baseline and args.prior == "flow"):
        return {args.prior: steps}
    flow_steps = None
    if steps is not None:  # K steps for the baseline; DiNof the part of that grid below t*
        flow_steps = int(steps * pipeline.scheduler.config.flow_start)
        if flow_steps < 1:
            raise ValueError(
                f"--num_inference_steps {steps} leaves DiNof int({steps} * flow_start "
                f"{pipeline.scheduler.config.flow_start}) = 0 steps from t*."
            )
    return {"flow": flow_steps, "sde": steps}


def main(argv=None):
    args = parse_args(argv)
    try:
        pipeline = DiNofPipeline.from_pretrained(args.pipeline).to(args.device)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    try:  # the flags only the pipeline can check (its prior, the ODE for its model, steps), before any sampling
        check_pipeline_sampler(args, pipeline)
        runs = sampler_steps(pipeline, args)
        if args.sampler == "pc":
            for prior, steps in runs.items():  # the pipeline's own step check
                pipeline.scheduler.set_timesteps(steps, use_flow_prior=prior == "flow")
    except (EvaluationError, ValueError) as error:
        build_parser().error(str(error))

    report, seconds = {}, {}
    for prior, steps in runs.items():
        name = RUN_NAMES[prior]
        keywords = sampler_keywords(args, prior=prior, num_inference_steps=steps)
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        start = time.perf_counter()
        output = pipeline(batch_size=args.num_images, generator=generator, output_type="pt", **keywords)
        seconds[name] = time.perf_counter() - start
        path = os.path.join(args.output_dir, f"{name}.png")
        save_image_atomically(image_grid(output.images, scale=args.grid_scale), path)
        num_steps = pipeline.num_timesteps
        report[name] = {
            **sampler_record(args, keywords, prior=prior),
            "nfe": output.nfe,
            "steps": num_steps,
            "seconds": round(seconds[name], 2),
            "grid": path,
        }
        print(f"{name:>8}: steps {num_steps:5d}   NFE {output.nfe:5d}   wall {seconds[name]:8.1f} s   grid {path}")
    if len(report) == 2:
        ratio = seconds["dinof"] / seconds["baseline"]
        print(f"DiNof / baseline: NFE {report['dinof']['nfe'] / report['baseline']['nfe']:.2f}, wall {ratio:.2f}")

    write_json_atomically(report, os.path.join(args.output_dir, "sampling.json"))


if __name__ == "__main__":
    main()
