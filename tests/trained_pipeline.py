"""A tiny DiNof pipeline trained for a few seconds on the embedded 8x8 digits, for tests that need a trained model.

It is trained on the "train" part of the digits' fixed split (as train.py by default), so the 297 "test" digits are
held out for the likelihood and evaluation tests.

Built once per test session (the `trained_tiny_pipeline_dir` fixture of conftest.py) with the package's own losses,
saved with `save_pretrained`; tests load it with `DiNofPipeline.from_pretrained`, so none can change it for another.
The score network learns the whole time range [eps, T] (the baseline sampler from T is valid on it too); the flow
learns x(t*). Neither is good, both are clearly better than at initialisation.
"""

import torch
from diffusers import UNet2DModel

from dinof_diffusers import DiNofPipeline, DiNofScheduler, FlowPriorModel
from dinof_diffusers.data import digits_images
from dinof_diffusers.training.losses import flow_nll_loss, score_matching_loss

RESOLUTION = 8
TRAIN_STEPS = 150
BATCH_SIZE = 64


def digits_tensor(resolution: int = RESOLUTION, split: str = "train") -> torch.Tensor:
    """The digits of a split ("train": 1,500) as (N, 1, resolution, resolution) float32 in [0, 1]."""
    images = torch.from_numpy(digits_images(resolution, split=split)).float().div(255.0)
    return images.unsqueeze(1)


def untrained_tiny_pipeline(seed: int = 0) -> DiNofPipeline:
    """The architecture of the trained fixture at its initialisation (VE, score parameterisation, 1x8x8)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        time_embedding_type="fourier",
        flip_sin_to_cos=True,
        freq_shift=0,
        add_attention=False,
    )
    flow_prior = FlowPriorModel(sample_size=RESOLUTION, in_channels=1, num_levels=2, flow_depth=4, hidden_channels=32)
    scheduler = DiNofScheduler(sde_type="ve", sigma_max=10.0, prediction_type="score")
    pipeline = DiNofPipeline(unet=unet, scheduler=scheduler, flow_prior=flow_prior)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def train_tiny_pipeline(steps: int = TRAIN_STEPS, seed: int = 0) -> DiNofPipeline:
    """Joint training (score on [eps, T], flow on x(t*)) with Adam, as train.py does, on the digits."""
    pipeline = untrained_tiny_pipeline(seed)
    unet, flow_prior, scheduler = pipeline.unet, pipeline.flow_prior, pipeline.scheduler
    full_range = DiNofScheduler.from_config(scheduler.config, flow_start=1.0)
    data = digits_tensor()
    generator = torch.Generator().manual_seed(seed)
    parameters = list(unet.parameters()) + list(flow_prior.parameters())
    optimizer = torch.optim.Adam(parameters, lr=2e-3)
    unet.train()
    flow_prior.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (BATCH_SIZE,), generator=generator)]
        loss = score_matching_loss(unet, full_range, batch, generator=generator, reduce="sum").mean()
        loss = loss + flow_nll_loss(flow_prior, scheduler, batch, generator=generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
    unet.eval()
    flow_prior.eval()
    return pipeline
