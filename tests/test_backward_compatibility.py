"""Pipelines saved by earlier versions keep loading and sampling the same values.

tests/data/pipeline_v0_1 was written by `save_pretrained` with the code of version 0.1 (see
tests/data/make_pipeline_v0_1.py); its model_index.json names the component classes by their module paths
(`dinof_diffusers.models.flow_prior`, `dinof_diffusers.schedulers.scheduling_dinof`), so those must stay importable.
"""

import json
from pathlib import Path

import torch

from dinof_diffusers import DiNofPipeline, DiNofScheduler, FlowPriorModel

DATA = Path(__file__).resolve().parent / "data"


def sample(pipeline, **kwargs):
    """(images, nfe, the last predictor's mean before clamping), as the expected values were recorded."""
    last_mean = {}

    def record(pipe, step, timestep, tensors):
        last_mean["value"] = tensors["latents_mean"]
        return tensors

    output = pipeline(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents_mean"],
        **kwargs,
    )
    return output.images, output.nfe, last_mean["value"]


def test_pipeline_saved_by_version_0_1_loads_and_samples_the_recorded_values():
    expected = json.loads((DATA / "pipeline_v0_1_expected.json").read_text())
    index = json.loads((DATA / "pipeline_v0_1" / "model_index.json").read_text())
    assert index["flow_prior"] == ["dinof_diffusers.models.flow_prior", "FlowPriorModel"]
    assert index["scheduler"] == ["dinof_diffusers.schedulers.scheduling_dinof", "DiNofScheduler"]

    pipeline = DiNofPipeline.from_pretrained(DATA / "pipeline_v0_1")
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline.flow_prior, FlowPriorModel) and isinstance(pipeline.scheduler, DiNofScheduler)
    assert bool(torch.cat([level.actnorm_initialized for level in pipeline.flow_prior.levels]).all())

    def check(name, got):
        torch.testing.assert_close(got, torch.tensor(expected[name]), rtol=1e-5, atol=1e-5, msg=name)

    images, nfe, mean = sample(pipeline)
    assert nfe == expected["dinof_nfe"] == 24
    check("dinof_images", images)
    check("dinof_mean", mean)
    images, nfe, mean = sample(pipeline, num_inference_steps=5, use_flow_prior=False)
    assert nfe == expected["baseline_nfe"] == 10
    check("baseline_images", images)
    check("baseline_mean", mean)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        check("flow_log_prob", pipeline.flow_prior.log_prob(x))
