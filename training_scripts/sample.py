#!/usr/bin/env python
"""Sample a trained DiNof pipeline and save the grid; optionally the baseline PC sampler beside it, same seed.

python training_scripts/sample.py --pipeline outputs/demo/pipeline --output_dir outputs/demo --compare_baseline

Steps: DiNof's reverse SDE runs from t* = flow_start * T, the baseline's from T. With --compare_baseline,
--num_inference_steps K is the baseline's number of noise scales N, and DiNof runs int(K * flow_start) steps on the
same grid from t* (what the paper compares: NFE ratio flow_start); alone, K is DiNof's number of steps from t*.
"""

import argparse
import os
import sys
import time

import torch

from dinof_diffusers import DiNofPipeline
from dinof_diffusers.file_utils import check_writable_folder, write_json_atomically
from dinof_diffusers.image_utils import image_grid, save_image_atomically
from dinof_diffusers.validation import check_number, check_positive_int


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="Folder or Hub id of a saved DiNofPipeline.")
    parser.add_argument("--output_dir", required=True, help="Where the grids and `sampling.json` are written.")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="Reverse steps. With --compare_baseline: the baseline's N, DiNof runs int(N * flow_start) from t*; "
        "otherwise DiNof's steps from t*. Default: the scheduler's own (N and int(N * flow_start)).",
    )
    parser.add_argument("--flow_temperature", type=float, default=1.0)
    parser.add_argument(
        "--compare_baseline", action="store_true", help="Also run the full PC sampler from the SDE prior."
    )
    parser.add_argument("--grid_scale", type=int, default=4, help="Nearest-neighbour upscaling of the saved grids.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        for flag in ("num_images", "grid_scale", "num_inference_steps"):
            check_positive_int(getattr(args, flag), f"--{flag}", allow_none=flag == "num_inference_steps")
        check_number(args.flow_temperature, "--flow_temperature", minimum=0.0, exclusive_minimum=True)
        check_writable_folder(args.output_dir, "--output_dir")
    except ValueError as error:
        parser.error(str(error))
    return args


def sampler_steps(pipeline: DiNofPipeline, num_inference_steps, compare_baseline: bool):
    """Sampler name -> (use_flow_prior, num_inference_steps) of each sampler to run."""
    if pipeline.flow_prior is None:
        return {"baseline": (False, num_inference_steps)}
    if not compare_baseline:
        return {"dinof": (True, num_inference_steps)}
    dinof_steps = None
    if num_inference_steps is not None:  # K noise scales for the baseline; DiNof the part of that grid below t*
        dinof_steps = int(num_inference_steps * pipeline.scheduler.config.flow_start)
        if dinof_steps < 1:
            raise ValueError(
                f"--num_inference_steps {num_inference_steps} leaves DiNof int({num_inference_steps} * flow_start "
                f"{pipeline.scheduler.config.flow_start}) = 0 steps from t*."
            )
    return {"dinof": (True, dinof_steps), "baseline": (False, num_inference_steps)}


def main(argv=None):
    args = parse_args(argv)
    try:
        pipeline = DiNofPipeline.from_pretrained(args.pipeline).to(args.device)
        samplers = sampler_steps(pipeline, args.num_inference_steps, args.compare_baseline)
        for use_flow_prior, steps in samplers.values():  # the pipeline's own step check, before any sampling
            pipeline.scheduler.set_timesteps(steps, use_flow_prior=use_flow_prior)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")

    report, seconds = {}, {}
    for name, (use_flow_prior, num_inference_steps) in samplers.items():
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        start = time.perf_counter()
        output = pipeline(
            batch_size=args.num_images,
            num_inference_steps=num_inference_steps,
            generator=generator,
            use_flow_prior=use_flow_prior,
            flow_temperature=args.flow_temperature,
            output_type="pt",
        )
        seconds[name] = time.perf_counter() - start
        path = os.path.join(args.output_dir, f"{name}.png")
        save_image_atomically(image_grid(output.images, scale=args.grid_scale), path)
        steps = pipeline.num_timesteps
        report[name] = {"nfe": output.nfe, "steps": steps, "seconds": round(seconds[name], 2), "grid": path}
        print(f"{name:>8}: steps {steps:5d}   NFE {output.nfe:5d}   wall {seconds[name]:8.1f} s   grid {path}")
    if len(report) == 2:
        ratio = seconds["dinof"] / seconds["baseline"]
        print(f"DiNof / baseline: NFE {report['dinof']['nfe'] / report['baseline']['nfe']:.2f}, wall {ratio:.2f}")

    write_json_atomically(report, os.path.join(args.output_dir, "sampling.json"))


if __name__ == "__main__":
    main()
