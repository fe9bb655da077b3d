"""How tests/data/pipeline_v0_1 and its expected outputs were made (run once, with the code of commit 69611d8).

Do not run this again to "update" the folder: it is the record of what today's code wrote, and the test
tests/test_backward_compatibility.py checks that later code still loads it and samples the same values. A deliberate
change of the sampler's numbers is a new expected file, made with this script under a new name, beside the old one.

    PYTHONPATH=. python tests/data/make_pipeline_v0_1.py
"""

import json
import os

import torch
from diffusers import UNet2DModel

from dinof_diffusers import DiNofPipeline, DiNofScheduler, FlowPriorModel

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_v0_1")
BATCH_SIZE = 2


def build() -> DiNofPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(2, 4),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=2,
        time_embedding_type="fourier",
        flip_sin_to_cos=True,
        freq_shift=0,
        add_attention=False,
    )
    flow_prior = FlowPriorModel(sample_size=8, in_channels=1, num_levels=2, flow_depth=2, hidden_channels=4)
    flow_prior.log_prob(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)))  # ActNorm initialised
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every weight away from its initialisation (the couplings start as the identity)
        for parameter in list(unet.parameters()) + list(flow_prior.parameters()):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    scheduler = DiNofScheduler(sde_type="ve", num_train_timesteps=20, sigma_max=5.0)
    return DiNofPipeline(unet=unet, scheduler=scheduler, flow_prior=flow_prior)


def sample(pipeline: DiNofPipeline, **kwargs):
    """(images, nfe, the last predictor's mean before clamping) of a seeded call."""
    last_mean = {}

    def record(pipe, step, timestep, tensors):
        last_mean["value"] = tensors["latents_mean"]
        return tensors

    output = pipeline(
        batch_size=BATCH_SIZE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents_mean"],
        **kwargs,
    )
    return output.images, output.nfe, last_mean["value"]


def expected_outputs(pipeline: DiNofPipeline) -> dict:
    """What the test recomputes from the loaded folder."""
    pipeline.set_progress_bar_config(disable=True)
    dinof_images, dinof_nfe, dinof_mean = sample(pipeline)
    baseline_images, baseline_nfe, baseline_mean = sample(pipeline, num_inference_steps=5, use_flow_prior=False)
    x = torch.randn(BATCH_SIZE, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        log_prob = pipeline.flow_prior.log_prob(x)
    return {
        "dinof_images": dinof_images.tolist(),
        "dinof_mean": dinof_mean.tolist(),
        "dinof_nfe": dinof_nfe,
        "baseline_images": baseline_images.tolist(),
        "baseline_mean": baseline_mean.tolist(),
        "baseline_nfe": baseline_nfe,
        "flow_log_prob": log_prob.tolist(),
    }


if __name__ == "__main__":
    build().save_pretrained(FOLDER)
    loaded = DiNofPipeline.from_pretrained(FOLDER)
    with open(os.path.join(os.path.dirname(FOLDER), "pipeline_v0_1_expected.json"), "w") as handle:
        for line, (key, value) in enumerate(expected_outputs(loaded).items()):  # one line per entry
            handle.write(("{\n" if line == 0 else ",\n") + f"{json.dumps(key)}: {json.dumps(value)}")
        handle.write("\n}\n")
