"""The sample grids of a training run: the current networks (their EMA weights) sampled with a fixed seed."""

import copy
from typing import Optional, Tuple

import torch
from PIL import Image

from ..image_utils import image_grid
from ..pipelines.dinof import DiNofPipeline
from ..schedulers.scheduling_dinof import DiNofScheduler
from .losses import flow_marginal_sample


def averaged_copy(model: Optional[torch.nn.Module], ema) -> Optional[torch.nn.Module]:
    """A copy of the (unwrapped) `model` for inference and saving, with the EMA weights when there is an EMA."""
    if model is None:
        return None
    averaged = copy.deepcopy(model).eval()
    if ema is not None:
        ema.copy_to(averaged.parameters())
    return averaged


def make_pipeline(unet, flow_prior, scheduler: DiNofScheduler, show_progress: bool = False) -> DiNofPipeline:
    """A DiNofPipeline around the given networks (with a scheduler of its own: sampling sets its timesteps); with
    `show_progress`, sampling shows a progress bar that disappears when done."""
    pipeline = DiNofPipeline(unet=unet, scheduler=DiNofScheduler.from_config(scheduler.config), flow_prior=flow_prior)
    pipeline.set_progress_bar_config(disable=not show_progress, desc="Sample grid", leave=False)
    return pipeline


def sample_grid(run, pipeline: DiNofPipeline, reference_images: torch.Tensor) -> Tuple[Image.Image, torch.Tensor, int]:
    """The run's sample grid: `run.num_sample_images` images with the fixed `run.sample_seed`.

    Without a flow prior, x(t*) is drawn from the data marginal at t* of `reference_images` (B, C, H, W), which shows
    what the score network alone does from t*.

    Returns:
        The grid (upscaled to about 64 pixels per image), the images (B, C, H, W) in [0, 1], and the number of
        network evaluations per image.
    """
    generator = torch.Generator(device="cpu").manual_seed(run.sample_seed)
    prior_sample = None
    if pipeline.flow_prior is None:
        prior_sample = flow_marginal_sample(pipeline.scheduler, reference_images, generator=generator)
    output = pipeline(
        batch_size=run.num_sample_images,
        num_inference_steps=run.sample_num_inference_steps,
        generator=generator,
        prior_sample=prior_sample,
        output_type="pt",
    )
    return image_grid(output.images, scale=max(1, 64 // run.resolution)), output.images, output.nfe


def log_sample_grid(trackers, grid: Image.Image, images: torch.Tensor, step: int) -> None:
    """Shows a sample grid in tensorboard and wandb."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": images.cpu().numpy()}, step=step, dataformats="NCHW")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [grid]}, step=step)
