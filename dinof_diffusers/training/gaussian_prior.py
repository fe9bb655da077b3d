"""`train.py --train_component gaussian_prior`: the closed-form Gaussian prior of x(t*) for a frozen score network.

Nothing is trained. The training images (the run's data set through its transforms, without random crops; with
`--random_flip` each image and its mirror image, the distribution the score network saw) are streamed once through
`GaussianPriorModel.fit`, which diffuses their mean and covariance to t*: N(a mu, a^2 Sigma + s^2 I) with (a, s) the
scheduler's marginal coefficients at t* (`--flow_start`, default the pretrained pipeline's). The pipeline is saved
with it as its `flow_prior` component, like a trained flow: `DiNofPipeline.from_pretrained` samples from it exactly
as from a flow, and `training_scripts/flow_gain.py` compares the two.
"""

import logging
import math
import os
import time
from typing import Optional

import torch
from accelerate import PartialState

from ..file_utils import remove_temporary_files
from ..models.gaussian_prior import GaussianPriorModel
from ..pipelines.dinof import DiNofPipeline
from . import checkpoints
from .data import IMAGE_DECODE_ERRORS, ImageReader, image_transforms, load_training_dataset, reference_images
from .model_card import run_model_card
from .run_config import RunConfig, build_models
from .samples import make_pipeline, sample_grid

logger = logging.getLogger(__name__)
BATCH_SIZE = 256  # images per streamed batch of the moment estimate


class _ImageBatches:
    """The run's images as (B, C, H, W) batches, with their mirror images appended for `--random_flip`; iterable
    again and again (the low-rank moments of large images read the data several times)."""

    def __init__(self, run: RunConfig, reader: ImageReader, data_range):
        self.reader, self.dataset, self.column = reader, reader.dataset, run.image_column
        self.transform = image_transforms(run, data_range, augment=False)
        self.flip = run.random_flip

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / BATCH_SIZE)

    def __iter__(self):
        for start in range(0, len(self.dataset), BATCH_SIZE):
            indices = range(start, min(start + BATCH_SIZE, len(self.dataset)))
            try:  # slices of the data set decode a batch at once (many times faster than item by item)
                decoded = self.dataset[start : indices.stop][self.column]
            except IMAGE_DECODE_ERRORS:  # an unreadable image: item by item, each bad one named and skipped
                decoded = [image for image in map(self._read_or_skip, indices) if image is not None]
            if not decoded:
                continue
            images = torch.stack([self.transform(image) for image in decoded])
            yield torch.cat([images, images.flip(-1)]) if self.flip else images

    def _read_or_skip(self, index: int):
        image, problem = self.reader.read(index)
        if image is None:
            logger.warning("Skipping the unreadable image %s (%s).", self.reader.name(index), problem)
        return image


def fit_gaussian_prior(run: RunConfig) -> Optional[DiNofPipeline]:
    """Fits the Gaussian prior of a `--train_component gaussian_prior` run and saves the pipeline with it.

    Runs on the main process only (under `accelerate launch` the other processes just wait): the fit is one pass
    over the data on the CPU.

    Args:
        run (`RunConfig`): the resolved run (`run.flow_prior == "gaussian"`).

    Returns:
        The saved `DiNofPipeline` on the main process, `None` on the others.
    """
    if run.train_component != "gaussian_prior":
        raise ValueError(f"`run.train_component` must be 'gaussian_prior', got {run.train_component!r}.")
    state = PartialState()
    pipeline = None
    if state.is_main_process:
        start = time.perf_counter()
        os.makedirs(run.output_dir, exist_ok=True)
        remove_temporary_files(run.output_dir)
        unet, _, scheduler = build_models(run)
        dataset, dataset_description = load_training_dataset(run)
        reader = ImageReader(dataset, run.image_column)
        batches = _ImageBatches(run, reader, scheduler.data_range)
        prior = GaussianPriorModel.fit(batches, scheduler, covariance=run.gaussian_covariance, seed=run.seed)
        fit_seconds = time.perf_counter() - start
        logger.info(
            "Fitted a %s-covariance Gaussian prior of x(t*), t* = %s, to %d images in %.1f s",
            run.gaussian_covariance,
            scheduler.t_star,
            prior.config.num_images,
            fit_seconds,
        )
        unet.eval().requires_grad_(False)
        pipeline = make_pipeline(unet=unet, flow_prior=prior, scheduler=scheduler)
        grid, _, nfe = sample_grid(run, pipeline, reference_images(reader, run, scheduler.data_range))
        card = run_model_card(
            run,
            dataset_description,
            pipeline,
            steps=0,
            nonfinite_steps=0,
            total_batch_size=0,
            mixed_precision="no",
            samples_description=(
                f"{run.num_sample_images} samples, seed {run.sample_seed}, {nfe} score-network evaluations per image; "
                f"the prior was fitted to {prior.config.num_images} images in {fit_seconds:.1f} s."
            ),
        )
        checkpoints.save_final_pipeline(run, pipeline, card, grid, f"DiNof, Gaussian prior at t* = {scheduler.t_star}")
    state.wait_for_everyone()
    return pipeline
