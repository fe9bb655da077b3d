"""Training: the losses against docs/DESIGN.md, the presets, the run configuration, and train.py end to end.

The end-to-end runs use a tiny UNet (JSON config), an 8x8 imagefolder written here and a few optimisation steps;
each run is an `accelerate launch` subprocess on the CPU (two gloo processes for the data-parallel test).
"""

import argparse
import copy
import dataclasses
import importlib
import json
import math
import os
import pkgutil
import shutil
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from accelerate.utils import convert_outputs_to_fp32, set_seed
from analytic_models import AnalyticGaussianModel, spec_chain_mean_std, spec_mean_std
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils import BaseOutput
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file

import dinof_diffusers
from dinof_diffusers.config_utils import public_config
from dinof_diffusers.data import digits_images
from dinof_diffusers.models.flow_prior import FlowPriorModel
from dinof_diffusers.pipelines.dinof import DiNofPipeline
from dinof_diffusers.schedulers import DiNofScheduler
from dinof_diffusers.training import RunConfig, TrainingError, build_models, resolve_run_config
from dinof_diffusers.training.checkpoints import (
    TrainingState,
    check_finite_weights,
    checkpoint_to_resume,
    compare_run_records,
    list_checkpoints,
    prune_checkpoints,
    read_run_record,
    run_record,
    save_pipeline_atomically,
)
from dinof_diffusers.training.data import load_training_dataset
from dinof_diffusers.training.losses import flow_nll_loss, nats_to_bits_per_dim, score_matching_loss
from dinof_diffusers.training.model_card import create_model_card
from dinof_diffusers.training.run_config import run_config_parser

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO_ROOT, "training_scripts", "train.py")
N = 1000


def resolve(**flags):
    """`resolve_run_config` of these flags (the others at their defaults), as train.py calls it."""
    return resolve_run_config(argparse.Namespace(**flags))


# ----------------------------------------------------------------------------------------------------------------------
# Losses on fixed inputs, against docs/DESIGN.md ("Training")
# ----------------------------------------------------------------------------------------------------------------------


class RecordingModel(torch.nn.Module):
    """A known "network": output = 0.3 * x + 0.1; records what it was conditioned on."""

    def __init__(self):
        super().__init__()
        self.timesteps = []

    def forward(self, sample, timestep):
        self.timesteps.append(timestep.detach().clone())
        return UNet2DOutput(sample=0.3 * sample + 0.1)


def spec_conditioning(sde_type, continuous, t):
    """(mean, std, expected model timestep) for float64 times t, from docs/DESIGN.md (continuous or the discrete chain)."""
    if continuous:
        mean, std = spec_mean_std(sde_type, t)
        timestep = std if sde_type == "ve" else 999.0 * t
    else:
        index = torch.floor(t * (N - 1)).long()
        mean, std = spec_chain_mean_std(sde_type, index, N=N)
        timestep = std if sde_type == "ve" else index.double()
    return mean, std, timestep


@pytest.mark.parametrize(
    "sde_type,continuous,prediction_type",
    [
        ("ve", True, "score"),
        ("vp", True, "epsilon"),
        ("subvp", True, "epsilon"),
        ("vp", False, "epsilon"),
        ("ve", False, "score"),
    ],
)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_score_matching_loss_matches_spec(sde_type, continuous, prediction_type, reduce):
    scheduler = DiNofScheduler(sde_type=sde_type, continuous=continuous, prediction_type=prediction_type)
    clean = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = RecordingModel()
    loss = score_matching_loss(model, scheduler, clean, generator=torch.Generator().manual_seed(0), reduce=reduce)

    # the same draws, in the documented order: times, then noise
    generator = torch.Generator().manual_seed(0)
    t = scheduler.sample_training_timesteps(6, generator=generator).double()
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32).double()
    mean, std, timestep = spec_conditioning(sde_type, continuous, t)
    view = (-1, 1, 1, 1)
    x = mean.view(view) * clean.double() + std.view(view) * noise
    output = 0.3 * x + 0.1
    score = output if prediction_type == "score" else -output / std.view(view)
    residual = (std.view(view) * score + noise).flatten(1)
    expected = residual.square().mean(1) if reduce == "mean" else 0.5 * residual.square().sum(1)

    assert loss.shape == (6,)
    torch.testing.assert_close(model.timesteps[0].double(), timestep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sde_type,continuous", [("ve", True), ("vp", True), ("vp", False), ("ve", False)])
def test_score_matching_loss_times_stay_below_t_star(sde_type, continuous):
    flow_start = 0.6
    scheduler = DiNofScheduler(
        sde_type=sde_type,
        continuous=continuous,
        prediction_type="score" if sde_type == "ve" else "epsilon",
        flow_start=flow_start,
    )
    model = RecordingModel()
    score_matching_loss(model, scheduler, torch.zeros(4000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    conditioning = model.timesteps[0].double()
    if sde_type == "ve":  # the network sees sigma; invert sigma(t) (continuous) or find sigma_i (discrete)
        if continuous:
            t = torch.log(conditioning / 0.01) / math.log(50.0 / 0.01)
        else:
            sigmas = spec_chain_mean_std("ve", torch.arange(N), N=N)[1]
            index = (conditioning[:, None] - sigmas[None, :]).abs().argmin(dim=1)
    elif continuous:
        t = conditioning / 999.0
    else:
        index = conditioning.long()
    if continuous:
        eps = scheduler.sampling_eps
        # t ~ U(eps, T) * flow_start
        assert t.min() >= eps * flow_start - 1e-6 and t.max() <= flow_start + 1e-6
        assert t.max() > 0.99 * flow_start and t.min() < 0.01 * flow_start
        assert abs(t.mean().item() - 0.5 * (1 + eps) * flow_start) < 0.02
    else:
        # the indices below int(N * flow_start), all of them reachable
        assert index.min() == 0 and index.max() == int(N * flow_start) - 1


@pytest.mark.parametrize("sde_type,continuous", [("ve", True), ("vp", False), ("subvp", True)])
def test_score_matching_loss_vanishes_for_the_exact_score_of_a_point_mass(sde_type, continuous):
    prediction_type = "score" if sde_type == "ve" else "epsilon"
    scheduler = DiNofScheduler(sde_type=sde_type, continuous=continuous, prediction_type=prediction_type)
    model = AnalyticGaussianModel(
        sde_type=sde_type, prediction_type=prediction_type, continuous=continuous, data_mean=0.3, data_std=0.0
    )
    clean = torch.full((64, 1, 4, 4), 0.3)
    loss = score_matching_loss(model, scheduler, clean, generator=torch.Generator().manual_seed(0))
    assert loss.max() < 1e-6


@pytest.mark.parametrize("sde_type", ["ve", "vp"])
def test_flow_nll_is_minus_log_prob_of_the_marginal_sample_at_t_star(sde_type):
    scheduler = DiNofScheduler(sde_type=sde_type, flow_start=0.6)
    flow = FlowPriorModel(sample_size=8, in_channels=1, num_levels=2, flow_depth=2, hidden_channels=8)
    clean = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    nll = flow_nll_loss(flow, scheduler, clean, generator=torch.Generator().manual_seed(0))

    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    mean, std = spec_mean_std(sde_type, torch.tensor([0.6], dtype=torch.float64))
    x_star = (mean * clean.double() + std * noise.double()).float()
    assert nll.shape == (5,)
    torch.testing.assert_close(nll, -flow.log_prob(x_star), rtol=1e-5, atol=1e-4)
    assert bool(torch.cat([level.actnorm_initialized for level in flow.levels]).all())
    assert nats_to_bits_per_dim(64 * math.log(2.0), 64) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Mixed precision: accelerate's output wrapper
# ----------------------------------------------------------------------------------------------------------------------


def package_output_classes():
    """Every `BaseOutput` dataclass defined in the package (all its modules imported)."""
    for module in pkgutil.walk_packages(dinof_diffusers.__path__, prefix="dinof_diffusers."):
        importlib.import_module(module.name)
    found, pending = set(), [BaseOutput]
    while pending:
        for subclass in pending.pop().__subclasses__():
            pending.append(subclass)
            if subclass.__module__.startswith("dinof_diffusers."):
                found.add(subclass)
    return sorted(found, key=lambda cls: cls.__name__)


def test_model_outputs_survive_accelerates_fp32_output_wrapper():
    """With mixed precision, `accelerator.prepare` wraps `forward` in `convert_outputs_to_fp32`, which rebuilds an
    output as `type(output)(dict)`: that needs a default on every field (else bf16 training crashes at step 1)."""
    classes = package_output_classes()
    assert {
        "FlowPriorOutput",
        "GaussianPriorOutput",
        "DiNofSchedulerOutput",
        "DiNofPipelineOutput",
        "DiNofLikelihoodOutput",
    } <= {cls.__name__ for cls in classes}
    for cls in classes:
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        assert not missing, f"{cls.__name__}: no default for {missing}"

    unet = small_epsilon_unet()
    flow = FlowPriorModel(sample_size=8, in_channels=1, num_levels=2, flow_depth=2, hidden_channels=8)
    sample = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    flow(sample)  # ActNorm initialised in float32
    for model, inputs in ((unet, (sample, torch.tensor([10, 500]))), (flow, (sample,))):
        with torch.no_grad():
            reference = model(*inputs)
            half = copy.deepcopy(model).half()  # the fp16 forward, through the wrapper `prepare` installs
            output = convert_outputs_to_fp32(half.forward)(*[x.half() if x.is_floating_point() else x for x in inputs])
        assert type(output) is type(reference) and output.keys() == reference.keys()
        for key in reference.keys():
            expected = reference[key] if isinstance(reference[key], list) else [reference[key]]
            got = output[key] if isinstance(output[key], list) else [output[key]]
            for value, target in zip(got, expected):
                assert value.dtype == torch.float32
                torch.testing.assert_close(value, target, rtol=0.02, atol=0.02 * float(target.abs().max()))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint and output helpers
# ----------------------------------------------------------------------------------------------------------------------


def test_checkpoint_listing_ignores_unfinished_ones_and_pruning_keeps_the_limit(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-30", ".tmp-checkpoint-40", "checkpoint-x"):
        os.makedirs(tmp_path / name)
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-10",
        "checkpoint-30",
    ]
    prune_checkpoints(tmp_path, 2)
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30"]
    assert (tmp_path / ".tmp-checkpoint-40").is_dir()


def small_epsilon_unet():
    """A 1-channel 8x8 UNet2DModel with positional time embedding (an epsilon predictor)."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )


def test_save_pipeline_atomically_replaces_the_pipeline_and_keeps_the_rest(tmp_path):
    pipeline = DiNofPipeline(
        unet=small_epsilon_unet(), scheduler=DiNofScheduler(sde_type="vp", prediction_type="epsilon")
    )
    os.makedirs(tmp_path / "checkpoint-3")
    os.makedirs(tmp_path / "unet")
    (tmp_path / "unet" / "stale.bin").write_text("old")
    save_pipeline_atomically(pipeline, tmp_path, extra_files={"note.txt": lambda p: open(p, "w").write("hi")})
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "checkpoint-3").is_dir()
    assert not (tmp_path / "unet" / "stale.bin").exists()
    assert (tmp_path / "note.txt").read_text() == "hi"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    assert DiNofPipeline.from_pretrained(str(tmp_path)).flow_prior is None


# ----------------------------------------------------------------------------------------------------------------------
# The run configuration: bad flags fail at once, naming the flag (both flags when two contradict each other)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,named",
    [
        ({"unet_config": "ncsn-unknown"}, ["--unet_config"]),
        ({"unet_config": "missing.json"}, ["--unet_config"]),
        ({"resolution": 10}, ["--resolution", "--flow_num_levels"]),
        ({"resolution": 16, "flow_num_levels": 5}, ["--resolution", "--flow_num_levels"]),
        ({"resolution": 6, "flow_num_levels": 1}, ["--resolution", "--unet_config tiny"]),
        ({"train_component": "flow"}, ["--train_component", "--pretrained_model_name_or_path"]),
        ({"train_data_dir": "/nonexistent/images"}, ["--train_data_dir"]),
        ({"dataset_name": "cifar10", "train_data_dir": "."}, ["--dataset_name", "--train_data_dir"]),
        ({"dataset_config_name": "plain_text"}, ["--dataset_config_name", "--dataset_name"]),
        ({"digits_split": "test", "dataset_name": "cifar10"}, ["--digits_split", "--dataset_name"]),
        ({"digits_split": "validation"}, ["--digits_split", "'train'"]),
        ({"flow_start": 1.5}, ["--flow_start"]),
        ({"sde": "vp"}, ["--sde", "--unet_config"]),
        ({"unet_config": "tiny", "pretrained_model_name_or_path": "org/model"}, ["--unet_config", "--pretrained"]),
        ({"pretrained_model_name_or_path": "{empty_dir}"}, ["--pretrained_model_name_or_path"]),
        ({"revision": "main"}, ["--revision", "--pretrained_model_name_or_path"]),
        ({"resume_from_checkpoint": "/nonexistent/checkpoint-5"}, ["--resume_from_checkpoint"]),
        ({"checkpoints_total_limit": 0}, ["--checkpoints_total_limit"]),
        ({"report_to": "nowhere"}, ["--report_to"]),
        ({"train_component": "both"}, ["--train_component"]),
        ({"ema_decay": 1.5}, ["--ema_decay"]),
        ({"ema_decay": 0.99, "use_ema": False}, ["--ema_decay", "--no-use_ema"]),
        ({"hub_model_id": "org/model"}, ["--hub_model_id", "--push_to_hub"]),
        ({"sigma_max": float("inf")}, ["--sigma_max", "finite"]),
        ({"adam_beta1": float("nan")}, ["--adam_beta1", "finite"]),
        ({"adam_epsilon": float("inf")}, ["--adam_epsilon", "finite"]),
        ({"adam_weight_decay": -1.0}, ["--adam_weight_decay"]),
        ({"max_nonfinite_fraction": 1.5}, ["--max_nonfinite_fraction"]),
        ({"output_dir": "{file}"}, ["--output_dir", "is a file"]),
        ({"sample_num_inference_steps": 700}, ["--sample_num_inference_steps", "--flow_start"]),
        ({"no_such_flag": 1}, ["no_such_flag"]),
    ],
)
def test_bad_flags_fail_before_anything_is_loaded_naming_the_flags(tmp_path, flags, named):
    (tmp_path / "file").write_text("")
    placeholders = {"{empty_dir}": str(tmp_path), "{file}": str(tmp_path / "file")}
    flags = {key: placeholders.get(value, value) if isinstance(value, str) else value for key, value in flags.items()}
    with pytest.raises(TrainingError) as error:
        resolve(**flags)
    for name in named:
        assert name in str(error.value)


def test_default_flags_are_the_tiny_preset_on_the_digits():
    run = resolve()
    assert run.unet_config == "tiny" and run.is_digits and run.train_component == "joint"
    # the training part of the digits' fixed split by default: the test digits stay held out
    assert run.digits_split == "train" and resolve(dataset_name="cifar10").digits_split is None
    for split, size in (("train", 1500), ("all", 1797)):
        dataset, description = load_training_dataset(resolve(digits_split=split))
        assert len(dataset) == size and f"{size} images" in description
    assert np.array_equal(np.asarray(dataset[7]["image"]), digits_images(16)[7])
    assert (run.resolution, run.num_channels, run.train_batch_size, run.ema_decay) == (16, 1, 64, 0.999)
    assert run.unet_kwargs["in_channels"] == 1 and run.unet_kwargs["sample_size"] == 16
    assert run.continuous is True and run.scheduler_config["sigma_max"] == 10.0 and run.flow_prior == "new"
    assert run.flow_kwargs == {
        "sample_size": 16,
        "in_channels": 1,
        "num_levels": 2,
        "flow_depth": 4,
        "hidden_channels": 32,
    }
    assert resolve(continuous=False).scheduler_config["continuous"] is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 1


def test_the_parser_of_train_py_has_every_flag_with_the_run_configs_default():
    parser = run_config_parser("train.py")
    assert vars(parser.parse_args([])) == RunConfig.flag_defaults()
    args = parser.parse_args(["--no-use_ema", "--no-continuous", "--debug_nonfinite_steps", "2", "3", "--center_crop"])
    run = resolve_run_config(args)
    assert (run.use_ema, run.continuous, run.debug_nonfinite_steps, run.center_crop) == (False, False, (2, 3), True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--report_to", "nowhere"])


# ----------------------------------------------------------------------------------------------------------------------
# train.py end to end under accelerate
# ----------------------------------------------------------------------------------------------------------------------

TINY_UNET = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "time_embedding_type": "fourier",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "attention_head_dim": None,
    "add_attention": False,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny imagefolder (20 RGB 12x12 images), the tiny UNet config, and an HF_HOME of its own."""
    root = tmp_path_factory.mktemp("training")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        array = np.zeros((12, 12, 3), dtype=np.uint8)
        top, left = rng.integers(0, 6, size=2)
        array[top : top + 6, left : left + 6] = rng.integers(64, 256, size=3)
        Image.fromarray(array).save(images / f"image_{i:02d}.png")
    config = root / "tiny_unet.json"
    config.write_text(json.dumps(TINY_UNET))
    return {"root": root, "images": str(images), "unet_config": str(config), "hf_home": str(root / "hf_home")}


def common_args(workspace, output_dir):
    return [
        "--train_data_dir", workspace["images"],
        "--resolution", "8",
        "--random_flip",
        "--train_batch_size", "4",
        "--flow_num_levels", "2",
        "--flow_depth", "2",
        "--flow_hidden_channels", "8",
        "--lr_warmup_steps", "2",
        "--num_sample_images", "4",
        "--sample_num_inference_steps", "3",
        "--report_to", "none",
        "--output_dir", str(output_dir),
    ]  # fmt: skip


def launch(workspace, args, num_processes=1, check=True, launcher=True):
    """`accelerate launch` train.py on the CPU (`python train.py` without `launcher`, a few seconds less for runs that
    stop before the end); returns the CompletedProcess."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch` of this interpreter
    if num_processes == 1:
        command += ["--num_processes", "1", "--cpu"]
    else:
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "29533"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN_SCRIPT, *args]
    if not launcher:
        command = [sys.executable, TRAIN_SCRIPT, *args]
    env = {
        **os.environ,
        "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HF_HOME": workspace["hf_home"],
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    if num_processes > 1 or not launcher:
        env["ACCELERATE_USE_CPU"] = "1"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def load_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def assert_same_weights(first, second, atol=1e-5):
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key].float(), second[key].float(), rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def joint_run(workspace):
    """Joint training, 6 steps over 2 epochs (5 batches each), checkpoints every 2 steps, at most 2 kept."""
    output_dir = workspace["root"] / "joint"
    args = common_args(workspace, output_dir) + [
        "--unet_config", workspace["unet_config"],
        "--max_train_steps", "6",
        "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2",
        "--save_images_steps", "3",
    ]  # fmt: skip
    launch(workspace, args + ["--report_to", "tensorboard"])
    return {"output_dir": output_dir, "args": args}


def test_joint_training_writes_a_loadable_pipeline_and_prunes_checkpoints(joint_run):
    output_dir = joint_run["output_dir"]
    assert [os.path.basename(p) for p in list_checkpoints(output_dir)] == ["checkpoint-4", "checkpoint-6"]
    assert not [name for name in os.listdir(output_dir) if name.startswith(".tmp-")]
    assert os.path.isfile(output_dir / "samples" / "step-0000003.png")
    assert os.listdir(output_dir / "logs")  # tensorboard events

    pipeline = DiNofPipeline.from_pretrained(str(output_dir))
    assert pipeline.flow_prior is not None
    assert bool(torch.cat([level.actnorm_initialized for level in pipeline.flow_prior.levels]).all())
    output = pipeline(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
    assert output.images.shape == (2, 3, 8, 8) and torch.isfinite(output.images).all()


def test_model_card_has_metadata_samples_configuration_and_citation(joint_run, workspace):
    card = ModelCard.load(joint_run["output_dir"] / "README.md")
    assert card.data.library_name == "diffusers"
    assert {"dinof", "normalizing-flow", "score-sde", "unconditional-image-generation"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert workspace["images"] in card.text
    assert "![samples](samples.png)" in card.text and os.path.isfile(joint_run["output_dir"] / "samples.png")
    assert "DiNofPipeline.from_pretrained" in card.text
    assert "Zand, Mohsen and Etemad, Ali and Greenspan, Michael" in card.text
    config = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert config["train_component"] == "joint" and config["steps"] == 6
    assert config["scheduler"]["sde_type"] == "ve" and config["scheduler"]["flow_start"] == 0.6
    assert config["flow_prior"]["num_levels"] == 2 and config["resolution"] == 8
    assert config["score_time_range"] == "[eps, T] * flow_start"
    assert 'pip install "dinof-diffusers' in card.text and card.data.base_model is None


def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(joint_run, workspace):
    """A run stopped right after checkpoint-4 and killed while writing checkpoint-6 (truncated: `latest` falls back to
    checkpoint-4) and while swapping in a pipeline (completed at the start), resumed."""
    output_dir = workspace["root"] / "resumed"
    os.makedirs(output_dir)
    shutil.copytree(joint_run["output_dir"] / "checkpoint-4", output_dir / "checkpoint-4")
    shutil.copytree(joint_run["output_dir"] / "checkpoint-6", output_dir / "checkpoint-6")
    damaged = output_dir / "checkpoint-6" / "model_1.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    for name in ("unet", "scheduler", "model_index.json"):  # a pipeline save killed midway through the swap
        copy_entry = shutil.copytree if (joint_run["output_dir"] / name).is_dir() else shutil.copy
        copy_entry(joint_run["output_dir"] / name, output_dir / ".swap-new" / name)
    args = [arg if arg != str(joint_run["output_dir"]) else str(output_dir) for arg in joint_run["args"]]
    result = launch(workspace, args + ["--resume_from_checkpoint", "latest"])
    assert "Completed an update of" in result.stderr and not (output_dir / ".swap-new").exists()
    assert "Skipping the damaged checkpoint" in result.stderr and "model_1.safetensors has 1000 bytes" in result.stderr
    assert "Resuming from " + str(output_dir / "checkpoint-4") in result.stderr
    assert "--report_to: 'tensorboard' -> 'none'" in result.stderr  # settings that differ from the checkpoint's

    for component in ("unet", "flow_prior"):  # the EMA weights of the final pipelines
        assert_same_weights(load_weights(output_dir / component), load_weights(joint_run["output_dir"] / component))
    for name in ("model.safetensors", "model_1.safetensors"):  # the raw weights at step 6
        assert_same_weights(
            load_file(output_dir / "checkpoint-6" / name), load_file(joint_run["output_dir"] / "checkpoint-6" / name)
        )


@pytest.fixture(scope="module")
def score_run(workspace):
    output_dir = workspace["root"] / "score"
    args = common_args(workspace, output_dir) + [
        "--unet_config", workspace["unet_config"],
        "--train_component", "score",
        "--score_time_range", "full",
        "--max_train_steps", "2",
    ]  # fmt: skip
    launch(workspace, args)
    return output_dir


def test_score_only_training_saves_a_pipeline_without_flow(score_run):
    pipeline = DiNofPipeline.from_pretrained(str(score_run))
    assert pipeline.flow_prior is None
    output = pipeline(
        batch_size=2, num_inference_steps=3, use_flow_prior=False, generator=torch.manual_seed(0), output_type="pt"
    )
    assert output.images.shape == (2, 3, 8, 8) and torch.isfinite(output.images).all()
    assert os.path.isfile(score_run / "samples.png")  # from x(t*) of training images, without a flow
    card = ModelCard.load(score_run / "README.md")
    config = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert config["train_component"] == "score" and config["score_time_range"] == "[eps, T]"
    assert "valid for both" in card.text


def test_flow_only_training_keeps_the_pretrained_unet_unchanged(score_run, workspace):
    output_dir = workspace["root"] / "flow"
    args = common_args(workspace, output_dir) + [
        "--pretrained_model_name_or_path", str(score_run),
        "--train_component", "flow",
        "--max_train_steps", "2",
    ]  # fmt: skip
    args.remove("--resolution")
    args.remove("8")
    launch(workspace, args)

    unet = load_weights(output_dir / "unet")
    pretrained = load_weights(score_run / "unet")
    assert_same_weights(unet, pretrained, atol=0)
    pipeline = DiNofPipeline.from_pretrained(str(output_dir))
    assert pipeline.flow_prior is not None and pipeline.flow_prior.config.num_levels == 2
    output = pipeline(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
    assert torch.isfinite(output.images).all()
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model is None  # a local folder is no Hub id
    assert "Starting point: a local model (score)" in card.text and str(score_run) not in card.text.split("```")[0]
    config = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert "score_time_range" not in config and "loss_reduction" not in config  # the score network was not trained
    assert "was not trained here" in card.text and "below t*" not in card.text and "valid for both" not in card.text


def test_joint_training_of_the_ncsnpp_tiny_preset(workspace):
    """Two joint steps of NCSNppModel (the published network, tiny) through accelerate launch; the pipeline it saves
    samples, and its folder and its plain network folder are pretrained models train.py accepts."""
    output_dir = workspace["root"] / "ncsnpp"
    args = common_args(workspace, output_dir) + ["--unet_config", "ncsnpp-tiny", "--max_train_steps", "2"]
    launch(workspace, args)
    pipeline = DiNofPipeline.from_pretrained(str(output_dir))
    assert type(pipeline.unet).__name__ == "NCSNppModel" and pipeline.unet.config.sample_size == 8
    assert pipeline.scheduler.config.model_conditioning == "score_sde" and pipeline.flow_prior is not None
    output = pipeline(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
    assert output.images.shape == (2, 3, 8, 8) and torch.isfinite(output.images).all()
    # the Fourier features are never trained (a parameter without grad, as published): still the initial ones
    set_seed(0)  # as train.py before build_models
    initial = build_models(resolve_run_config(run_config_parser("").parse_args(args)))[0]
    assert torch.equal(pipeline.unet.time_proj.weight, initial.time_proj.weight)
    assert not torch.equal(pipeline.unet.conv_in.weight, initial.conv_in.weight)

    data = {"train_data_dir": workspace["images"]}
    run = resolve(**data, pretrained_model_name_or_path=str(output_dir / "unet"), flow_num_levels=2)
    unet, _, scheduler = build_models(run)
    assert run.pretrained_kind == "unet" and run.unet_class == "NCSNppModel" and run.resolution == 8
    assert scheduler.config.prediction_type == "score" and scheduler.config.model_conditioning == "score_sde"
    assert_same_weights(unet.state_dict(), load_weights(output_dir / "unet"), atol=0)
    run = resolve(pretrained_model_name_or_path=str(output_dir), train_component="flow", **data)
    assert run.pretrained_kind == "dinof" and run.unet_class == "NCSNppModel" and run.flow_prior == "pretrained"


def test_two_processes_end_with_identical_replicas_actnorm_included(workspace):
    """gloo data parallelism, gradient accumulation and a skipped non-finite step: every replica stays identical."""
    output_dir = workspace["root"] / "ddp"
    hash_dir = workspace["root"] / "ddp_hashes"
    args = common_args(workspace, output_dir) + [
        "--unet_config", workspace["unet_config"],
        "--train_batch_size", "2",
        "--gradient_accumulation_steps", "2",
        "--max_train_steps", "3",
        "--debug_nonfinite_steps", "2",
        "--max_consecutive_nonfinite", "2",
        "--max_nonfinite_fraction", "0.5",
        "--debug_hash_dir", str(hash_dir),
    ]  # fmt: skip
    launch(workspace, args, num_processes=2)

    ranks = [json.loads((hash_dir / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1]
    assert {"unet", "flow_prior", "ema_unet", "ema_flow_prior"} <= set(ranks[0])
    assert any("actnorm" in key for key in ranks[0]["flow_prior"])
    card = ModelCard.load(output_dir / "README.md")
    config = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert config["nonfinite_steps_skipped"] == 1 and config["total_batch_size"] == 8
    flow = FlowPriorModel.from_pretrained(str(output_dir / "flow_prior"))
    assert bool(torch.cat([level.actnorm_initialized for level in flow.levels]).all())
    assert all(torch.isfinite(p).all() for p in flow.parameters())


def test_too_many_skipped_steps_stop_the_run_and_keep_the_last_checkpoint(workspace):
    """Steps 2 and 4 of 6 skipped: more than --max_nonfinite_fraction 0.3 of the 6 steps at step 4 (the rule itself,
    and --max_consecutive_nonfinite, in `test_nonfinite_limits`)."""
    output_dir = workspace["root"] / "diverging"
    args = common_args(workspace, output_dir) + [
        "--unet_config", workspace["unet_config"],
        "--max_train_steps", "6",
        "--checkpointing_steps", "1",
        "--debug_nonfinite_steps", "2", "4",
        "--max_nonfinite_fraction", "0.3",
    ]  # fmt: skip
    result = launch(workspace, args, check=False)
    assert result.returncode != 0
    assert "Stopping at step 4: 2 of 4 optimisation steps" in result.stderr
    assert "--max_nonfinite_fraction 0.3 of the first 6 steps" in result.stderr
    checkpoints = [os.path.basename(p) for p in list_checkpoints(output_dir)]
    assert checkpoints == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not os.path.exists(output_dir / "model_index.json")
    # the skipped step 2 changed nothing
    for name in ("model.safetensors", "model_1.safetensors"):
        assert_same_weights(
            load_file(output_dir / "checkpoint-2" / name), load_file(output_dir / "checkpoint-1" / name), atol=0
        )


def test_nonfinite_limits():
    run = resolve(max_consecutive_nonfinite=3, max_nonfinite_fraction=0.1)
    assert TrainingState(global_step=5, nonfinite_steps=2).nonfinite_stop_reason(2, 1000, run) is None
    reason = TrainingState(global_step=5, nonfinite_steps=3).nonfinite_stop_reason(3, 1000, run)
    assert "3 optimisation steps in a row" in reason and "--max_consecutive_nonfinite 3" in reason
    # the fraction is judged over at least the first 100 steps: 10 skipped may still end at 10%, 11 may not
    assert TrainingState(global_step=20, nonfinite_steps=10).nonfinite_stop_reason(1, 1000, run) is None
    reason = TrainingState(global_step=20, nonfinite_steps=11).nonfinite_stop_reason(1, 1000, run)
    assert "11 of 20" in reason and "--max_nonfinite_fraction 0.1 of the first 100 steps" in reason
    # then over the steps so far, and over the whole run when it is shorter
    assert TrainingState(global_step=500, nonfinite_steps=50).nonfinite_stop_reason(1, 1000, run) is None
    assert "51 of 500" in TrainingState(global_step=500, nonfinite_steps=51).nonfinite_stop_reason(1, 1000, run)
    assert TrainingState(global_step=2, nonfinite_steps=2).nonfinite_stop_reason(2, 10, run) is not None
    assert TrainingState(global_step=10, nonfinite_steps=1).nonfinite_stop_reason(1, 10, run) is None


def test_pretrained_models_of_every_kind_are_recognised(
    score_run, workspace, tmp_path, trained_tiny_pipeline_dir, monkeypatch
):
    """DiNof pipeline, plain UNet2DModel folder, foreign diffusers pipeline (DDPM): models and scheduler settings."""
    data = {"train_data_dir": workspace["images"]}

    # a plain UNet2DModel folder (config.json): the settings of the published preset nearest to it
    run = resolve(**data, pretrained_model_name_or_path=str(score_run / "unet"))
    unet, flow_prior, scheduler = build_models(run)
    assert run.pretrained_kind == "unet" and run.flow_prior == "new"
    assert flow_prior is not None and flow_prior.config.num_levels == 3  # the preset's Glow, for joint training
    assert scheduler.config.sde_type == "ve" and scheduler.config.prediction_type == "score"
    assert run.resolution == 8 and run.num_channels == 3 and run.ema_decay == 0.999
    assert_same_weights(unet.state_dict(), load_weights(score_run / "unet"), atol=0)

    # a DDPM pipeline: the discrete VP chain with its betas
    folder = tmp_path / "ddpm"
    DDPMPipeline(unet=small_epsilon_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    run = resolve(**data, pretrained_model_name_or_path=str(folder), train_component="flow", flow_num_levels=2)
    unet, flow_prior, scheduler = build_models(run)
    assert run.pretrained_kind == "pipeline"
    assert (scheduler.config.sde_type, scheduler.config.continuous, scheduler.config.prediction_type) == (
        "vp",
        False,
        "epsilon",
    )
    assert scheduler.config.beta_min == pytest.approx(0.1) and scheduler.config.beta_max == pytest.approx(20.0)
    assert flow_prior.config.in_channels == 1 and flow_prior.config.num_levels == 2

    # a DiNof pipeline with a flow prior: its networks and scheduler settings, the flow trained further as it is
    run = resolve(pretrained_model_name_or_path=str(trained_tiny_pipeline_dir), snr=0.1)
    unet, flow_prior, scheduler = build_models(run)
    pretrained = DiNofPipeline.from_pretrained(trained_tiny_pipeline_dir)
    assert run.pretrained_kind == "dinof" and run.flow_prior == "pretrained" and run.is_digits
    assert_same_weights(flow_prior.state_dict(), pretrained.flow_prior.state_dict(), atol=0)
    assert_same_weights(unet.state_dict(), pretrained.unet.state_dict(), atol=0)
    assert public_config(scheduler.config) == {**public_config(pretrained.scheduler.config), "snr": 0.1}
    with pytest.raises(
        TrainingError, match="--flow_depth 3 differs .* flow_depth 4 .*--pretrained_model_name_or_path"
    ):
        resolve(pretrained_model_name_or_path=str(trained_tiny_pipeline_dir), flow_depth=3)

    # the same pipeline as a Hub id, offline from the cache: configuration files, then the weights
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--dinof-test--trained"
    shutil.copytree(trained_tiny_pipeline_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "dinof-test/trained" must not resolve as a local folder
    hub = {"cache_dir": str(tmp_path / "cache")}
    run = resolve(pretrained_model_name_or_path="dinof-test/trained", **hub)
    assert run.pretrained_kind == "dinof" and run.flow_prior == "pretrained"
    assert_same_weights(build_models(run)[1].state_dict(), pretrained.flow_prior.state_dict(), atol=0)
    with pytest.raises(TrainingError, match="--pretrained_model_name_or_path 'dinof-test/missing': cannot read"):
        resolve(pretrained_model_name_or_path="dinof-test/missing", **hub)

    # flags that contradict the pretrained model are refused, naming both
    with pytest.raises(TrainingError, match="--resolution 16 differs .*--pretrained_model_name_or_path"):
        resolve(**data, pretrained_model_name_or_path=str(score_run), resolution=16)
    with pytest.raises(TrainingError, match="--sde.*continuous=False"):  # sub-VP has no discrete chain
        resolve(**data, pretrained_model_name_or_path=str(folder), sde="subvp")


# ----------------------------------------------------------------------------------------------------------------------
# Faults: mixed precision, unreadable images, resuming another run or a damaged checkpoint, non-finite weights
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flawed_images(workspace):
    """An imagefolder of 7 files: 4 good, one truncated and one undecodable PNG (all 6 listed in its metadata.csv)
    and a 7th good one that the metadata.csv leaves out."""
    folder = workspace["root"] / "flawed_images"
    folder.mkdir()
    for i in range(5):
        shutil.copy(os.path.join(workspace["images"], f"image_{i:02d}.png"), folder / f"image_{i:02d}.png")
    whole = (folder / "image_00.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "garbage.png").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    listed = ["image_00.png", "truncated.png", "image_01.png", "garbage.png", "image_02.png", "image_03.png"]
    (folder / "metadata.csv").write_text("file_name\n" + "".join(f"{name}\n" for name in listed))
    return folder


@pytest.fixture(scope="module")
def bf16_run(workspace, flawed_images):
    """2 steps of joint training in bf16 on the flawed images: batches of 3, so that every image is read."""
    output_dir = workspace["root"] / "bf16"
    args = common_args(workspace, output_dir) + [
        "--unet_config", workspace["unet_config"],
        "--max_train_steps", "2",
        "--checkpointing_steps", "2",
        "--train_batch_size", "3",
        "--mixed_precision", "bf16",
    ]  # fmt: skip
    args[args.index("--train_data_dir") + 1] = str(flawed_images)
    return {"output_dir": output_dir, "args": args, "result": launch(workspace, args)}


def test_bf16_training_skips_unreadable_images_and_records_its_run(bf16_run, flawed_images):
    output_dir, log = bf16_run["output_dir"], bf16_run["result"].stderr
    pipeline = DiNofPipeline.from_pretrained(str(output_dir))
    output = pipeline(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
    assert output.images.shape == (2, 3, 8, 8) and torch.isfinite(output.images).all()
    config = yaml.safe_load(ModelCard.load(output_dir / "README.md").text.split("```yaml\n")[1].split("```")[0])
    assert config["mixed_precision"] == "bf16" and config["steps"] == 2

    # each unreadable image named once, the metadata.csv's selection said, the sample grid announced
    for name in ("truncated.png", "garbage.png"):
        assert log.count(f"Skipping the unreadable image {flawed_images / name}") == 1
    assert f"Found 7 image files in {flawed_images}; the data set uses 6 of them (the images listed in its " in log
    assert "Drawing the sample grid of step 2 (4 images)" in log

    # the checkpoint records the run and its files
    record = read_run_record(output_dir / "checkpoint-2")
    assert record["run"]["mixed_precision"] == "bf16" and "hub_token" not in record["run"]
    assert record["model"]["flow_prior"]["num_levels"] == 2 and record["model"]["sde"]["sde_type"] == "ve"
    manifest = json.loads((output_dir / "checkpoint-2" / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(manifest)


def test_strict_images_stop_before_training_with_the_list_of_unreadable_files(workspace, flawed_images):
    output_dir = workspace["root"] / "strict"
    args = common_args(workspace, output_dir) + ["--unet_config", workspace["unet_config"], "--strict_images"]
    args[args.index("--train_data_dir") + 1] = str(flawed_images)
    result = launch(workspace, args, check=False, launcher=False)
    assert result.returncode != 0
    assert "2 of the 6 training images cannot be read (--strict_images)" in result.stderr
    assert f"{flawed_images / 'truncated.png'}: OSError" in result.stderr
    assert str(flawed_images / "garbage.png") in result.stderr
    assert "Running training" not in result.stderr and not list_checkpoints(output_dir)


def test_non_finite_weights_are_never_saved(score_run, workspace):
    """Flow training on a frozen score network with a NaN weight: the run trains, and refuses to save."""
    pretrained = workspace["root"] / "nan_unet"
    shutil.copytree(score_run, pretrained)
    weights = load_weights(pretrained / "unet")
    weights["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, pretrained / "unet" / "diffusion_pytorch_model.safetensors")
    output_dir = workspace["root"] / "nan_flow"
    args = common_args(workspace, output_dir) + [
        "--pretrained_model_name_or_path", str(pretrained),
        "--train_component", "flow",
        "--max_train_steps", "1",
    ]  # fmt: skip
    args[args.index("--resolution") : args.index("--resolution") + 2] = []
    result = launch(workspace, args, check=False, launcher=False)
    assert result.returncode != 0
    assert "The trained weights have non-finite values (unet.conv_in.weight)" in result.stderr
    assert not [name for name in ("model_index.json", "README.md", "samples.png") if (output_dir / name).exists()]
    flow = FlowPriorModel(sample_size=8, in_channels=1, num_levels=1, flow_depth=1, hidden_channels=4)
    check_finite_weights({"unet": None, "flow_prior": flow})
    name, parameter = list(flow.named_parameters())[-1]
    with torch.no_grad():
        parameter.view(-1)[-1] = float("inf")
    with pytest.raises(TrainingError, match=f"non-finite values \\(flow_prior.{name}\\)"):
        check_finite_weights({"unet": None, "flow_prior": flow})


def test_resume_checks_the_checkpoint_and_the_run_it_belongs_to(joint_run, tmp_path):
    """On copies of the joint run's checkpoints: the choice of checkpoint, and the comparison of the runs."""
    output_dir = tmp_path / "run"
    for step in (4, 6):
        shutil.copytree(joint_run["output_dir"] / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    assert checkpoint_to_resume(output_dir, "latest") == (str(output_dir / "checkpoint-6"), [])

    # a damaged latest checkpoint: the newest intact one, said; a missing random state: said loudly
    optimizer = output_dir / "checkpoint-6" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    os.remove(output_dir / "checkpoint-4" / "random_states_0.pkl")
    path, warnings = checkpoint_to_resume(output_dir, "latest")
    assert path == str(output_dir / "checkpoint-4")
    assert "Skipping the damaged checkpoint" in warnings[0] and "optimizer.bin has" in warnings[0]
    assert "newest intact" in warnings[1]
    assert "THE RESUME IS NOT EXACT: random_states_0.pkl is missing" in warnings[2]
    assert "process 1" in checkpoint_to_resume(output_dir, "latest", num_processes=2)[1][2]
    with pytest.raises(TrainingError, match="optimizer.bin has"):  # named explicitly: no fallback
        checkpoint_to_resume(output_dir, str(output_dir / "checkpoint-6"))
    shutil.copytree(joint_run["output_dir"] / "checkpoint-6", tmp_path / "checkpoint-6")
    os.remove(tmp_path / "checkpoint-6" / "custom_checkpoint_1.pkl")
    with pytest.raises(TrainingError, match="custom_checkpoint_1.pkl is missing"):
        checkpoint_to_resume(tmp_path, str(tmp_path / "checkpoint-6"))
    shutil.rmtree(output_dir / "checkpoint-4")
    with pytest.raises(TrainingError, match="none of the checkpoints .* is intact"):
        checkpoint_to_resume(output_dir, "latest")

    # folders without a checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="'.*empty' is not an intact checkpoint: it holds no checkpoint files"):
        checkpoint_to_resume(tmp_path, str(tmp_path / "empty"))
    with pytest.raises(TrainingError, match="did you mean '.*checkpoint-6'"):
        checkpoint_to_resume(tmp_path, str(output_dir))
    assert checkpoint_to_resume(tmp_path / "empty", "latest")[0] is None
    assert "no checkpoint in" in checkpoint_to_resume(tmp_path / "empty", "latest")[1][0]

    # the runs: another model is refused, naming what differs; other settings are listed
    saved = read_run_record(joint_run["output_dir"] / "checkpoint-6")
    defaults = RunConfig.flag_defaults()
    same = {key: value for key, value in saved["run"].items() if key in defaults and value != defaults[key]}
    run = resolve(**same)
    unet, flow_prior, _ = build_models(run)
    assert compare_run_records(saved, run_record(run, unet, flow_prior), "checkpoint-6") == []
    run = resolve(**{**same, "seed": 3, "learning_rate": 1e-3})
    (warning,) = compare_run_records(saved, run_record(run, unet, flow_prior), "checkpoint-6")
    assert "--learning_rate: 0.0002 -> 0.001" in warning and "--seed: 0 -> 3" in warning
    run = resolve(**{**same, "flow_depth": 3, "sde": "ve", "sigma_max": 20.0})
    unet, flow_prior, _ = build_models(run)
    with pytest.raises(TrainingError, match="flow_prior.flow_depth: 2 -> 3; sde.sigma_max: 50.0 -> 20.0") as error:
        compare_run_records(saved, run_record(run, unet, flow_prior), "checkpoint-6")
    assert "another --output_dir" in str(error.value)


def test_model_card_metadata_holds_hub_ids_only():
    card = create_model_card("org/model", "digits", {}, "joint", base_model="google/ddpm-cifar10-32")
    assert card.data.base_model == "google/ddpm-cifar10-32" and "Starting point: `google/ddpm-cifar10-32`" in card.text
    card = create_model_card("out", "digits", {}, "score", base_model="/home/me/models/ddpm", score_time_range="full")
    assert card.data.base_model is None and "/home/me" not in card.text and "a local model (ddpm)" in card.text
    assert "valid for both" in card.text and "pip install" in card.text
