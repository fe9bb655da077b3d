#!/usr/bin/env python
"""Sample a trained DiNof pipeline and save the grid; optionally the baseline PC sampler beside it, same seed.

python training_scripts/sample.py --pipeline outputs/demo/pipeline --output_dir outputs/demo --compare_baseline
"""

import argparse
import os
import time

import torch

from dinof_diffusers import DiNofPipeline
from dinof_diffusers.file_utils import write_json_atomically
from dinof_diffusers.image_utils import image_grid, save_image_atomically
from dinof_diffusers.validation import check_number, check_positive_int


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="Folder or Hub id of a saved DiNofPipeline.")
    parser.add_argument("--output_dir", required=True, help="Where the grids and `sampling.json` are written.")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the scheduler's own.")
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
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    pipeline = DiNofPipeline.from_pretrained(args.pipeline).to(args.device)
    samplers = {"dinof": True, "baseline": False} if args.compare_baseline else {"dinof": True}
    if pipeline.flow_prior is None:
        samplers = {"baseline": False}

    report = {}
    for name, use_flow_prior in samplers.items():
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        start = time.perf_counter()
        output = pipeline(
            batch_size=args.num_images,
            num_inference_steps=args.num_inference_steps,
            generator=generator,
            use_flow_prior=use_flow_prior,
            flow_temperature=args.flow_temperature,
            output_type="pt",
        )
        seconds = time.perf_counter() - start
        path = os.path.join(args.output_dir, f"{name}.png")
        save_image_atomically(image_grid(output.images, scale=args.grid_scale), path)
        report[name] = {"nfe": output.nfe, "seconds": round(seconds, 2), "grid": path}
        print(f"{name:>8}: NFE {output.nfe:5d}   wall {seconds:8.1f} s   grid {path}")
    if len(report) == 2:
        ratio = report["dinof"]["seconds"] / report["baseline"]["seconds"]
        print(f"DiNof / baseline: NFE {report['dinof']['nfe'] / report['baseline']['nfe']:.2f}, wall {ratio:.2f}")

    write_json_atomically(report, os.path.join(args.output_dir, "sampling.json"))


if __name__ == "__main__":
    main()
