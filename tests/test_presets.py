"""Training presets: the seven published DiNof configs as published, their UNet2DModel approximations, the small ones;
how train.py resolves a preset's network, parameterisation and conditioning."""

import argparse
import json
import re

import pytest
import torch

from dinof_diffusers.models import NCSNPP_PUBLISHED_CONFIGS, NCSNPP_PUBLISHED_PARAMETER_COUNTS
from dinof_diffusers.schedulers import DiNofScheduler
from dinof_diffusers.training import TrainingError, resolve_run_config
from dinof_diffusers.training import presets as presets_module
from dinof_diffusers.training.presets import PRESETS, get_preset, nearest_published_preset
from dinof_diffusers.training.run_config import UNET_CLASSES

# Read from MohsenZand/DiNof configs/ (training.sde, training.continuous, sampling.predictor / corrector / snr,
# model.sigma_max, model.ema_rate, training.reduce_mean, training.batch_size, model.dropout with the defaults of
# default_cifar10.py / default_celeba.py): sde, continuous, predictor, corrector, snr, sigma_max, ema, loss, dropout.
PUBLISHED = {
    "ncsnpp-cifar10-ve": ("ve", True, "reverse_diffusion", "langevin", 0.16, 50.0, 0.999, "sum", 0.1),
    "ncsnpp-deep-cifar10-ve": ("ve", True, "reverse_diffusion", "langevin", 0.16, 50.0, 0.999, "sum", 0.1),
    "ncsnpp-cifar10-ve-discrete": ("ve", False, "reverse_diffusion", "langevin", 0.16, 50.0, 0.999, "sum", 0.1),
    "ddpmpp-cifar10-vp": ("vp", True, "euler_maruyama", "none", 0.16, 50.0, 0.9999, "mean", 0.1),
    "ddpmpp-cifar10-vp-discrete": ("vp", False, "ancestral", "none", 0.16, 50.0, 0.9999, "mean", 0.1),
    "ddpmpp-cifar10-subvp": ("subvp", True, "euler_maruyama", "none", 0.16, 50.0, 0.9999, "mean", 0.1),
    "ncsnpp-celebahq256-ve": ("ve", True, "reverse_diffusion", "langevin", 0.17, 348.0, 0.999, "sum", 0.1),
}


def resolve(**flags):
    return resolve_run_config(argparse.Namespace(**flags))


def build(preset):
    """The preset's network on the meta device, at its published resolution."""
    with torch.device("meta"):
        return UNET_CLASSES[preset.unet_class](**{**preset.get_unet_config(), "sample_size": preset.resolution})


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_the_parameter_count_its_docs_give(name):
    preset = get_preset(name)
    network = build(preset)
    scheduler = DiNofScheduler(**preset.scheduler_config)
    count = sum(p.numel() for p in network.parameters())
    assert f"{count:,} parameters" in preset.description
    assert preset.loss_reduction in ("mean", "sum") and type(network).__name__ == preset.unet_class
    if preset.unet_class == "UNet2DModel":
        assert preset.differences and scheduler.config.model_conditioning == "diffusers"
        fourier = network.config.time_embedding_type == "fourier"
        assert scheduler.config.prediction_type == ("score" if fourier else "epsilon")
    else:
        assert scheduler.config.model_conditioning == "score_sde"
    if name.endswith("-unet2d"):  # the published configuration but the network
        published = get_preset(name[: -len("-unet2d")])
        assert {**preset.scheduler_config, "model_conditioning": "score_sde"} == published.scheduler_config
        assert (preset.ema_decay, preset.train_batch_size, preset.loss_reduction) == (
            published.ema_decay,
            published.train_batch_size,
            published.loss_reduction,
        )


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_the_seven_published_configs_as_published(name):
    preset = get_preset(name)
    network = build(preset)
    assert preset.unet_class == "NCSNppModel" and preset.unet_config == NCSNPP_PUBLISHED_CONFIGS[name]
    counts = NCSNPP_PUBLISHED_PARAMETER_COUNTS[name]
    assert sum(p.numel() for p in network.parameters()) == counts["total"]
    assert sum(p.numel() for p in network.parameters() if p.requires_grad) == counts["trainable"]
    table_row = [line for line in presets_module.__doc__.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(table_row) == 1 and f"| {counts['total']:,} |" in table_row[0]

    sde, continuous, predictor, corrector, snr, sigma_max, ema_decay, loss, dropout = PUBLISHED[name]
    config = DiNofScheduler(**preset.scheduler_config).config
    assert (config.sde_type, config.continuous, config.predictor, config.corrector, config.snr) == (
        sde,
        continuous,
        predictor,
        corrector,
        snr,
    )
    assert config.prediction_type == ("score" if sde == "ve" else "epsilon")  # the published get_score_fn
    assert config.num_train_timesteps == 1000 and config.flow_start == 0.6 and config.correct_steps == 1
    assert (config.sigma_min, config.beta_min, config.beta_max) == (0.01, 0.1, 20.0)
    assert config.sigma_max == sigma_max and network.config.sigma_max == sigma_max
    assert (preset.ema_decay, preset.loss_reduction, network.config.dropout) == (ema_decay, loss, dropout)
    assert preset.train_batch_size == 128 and preset.learning_rate == 2e-4 and preset.lr_warmup_steps == 5000
    assert preset.flow_config == {"num_levels": 3, "flow_depth": 16, "hidden_channels": 256}
    assert network.config.scale_by_sigma == (sde == "ve") and network.config.centered == (sde != "ve")

    # what train.py makes of it: the network's class, the published parameterisation and labels
    run = resolve(unet_config=name, train_data_dir=None, num_channels=3)
    assert run.unet_class == "NCSNppModel" and run.resolution == preset.resolution
    assert run.scheduler_config["prediction_type"] == config.prediction_type
    assert run.scheduler_config["model_conditioning"] == "score_sde"
    assert run.train_batch_size == 128 and run.ema_decay == ema_decay


def test_names_nearest_presets_and_refusals(tmp_path):
    assert (
        nearest_published_preset("UNet2DModel", {"time_embedding_type": "fourier"}).name == "ncsnpp-cifar10-ve-unet2d"
    )
    assert nearest_published_preset("UNet2DModel", {}).name == "ddpmpp-cifar10-vp-unet2d"
    smld = dict(NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve-discrete"], sample_size=16, in_channels=1)
    assert nearest_published_preset("NCSNppModel", json.loads(json.dumps(smld))).name == "ncsnpp-cifar10-ve-discrete"
    other = dict(smld, nf=32, scale_by_sigma=False)
    assert nearest_published_preset("NCSNppModel", other).name == "ddpmpp-cifar10-vp"
    with pytest.raises(KeyError, match="known presets"):
        get_preset("ncsn")

    # a JSON file names its class; the SMLD noise levels of a new network follow the scheduler's
    config = tmp_path / "smld.json"
    config.write_text(json.dumps({"_class_name": "NCSNppModel", **smld}))
    run = resolve(unet_config=str(config), sigma_max=40.0)
    assert run.unet_class == "NCSNppModel" and run.scheduler_config["continuous"] is False
    assert run.unet_kwargs["sigma_max"] == 40.0 and run.scheduler_config["sigma_max"] == 40.0
    assert run.scheduler_config["model_conditioning"] == "score_sde" and run.resolution == 16
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(TrainingError, match="is a UNet2DConditionModel; train.py trains UNet2DModel or NCSNppModel"):
        resolve(unet_config=str(bad))

    # an NCSNppModel must fit the SDE as published
    with pytest.raises(
        TrainingError, match=r"does not fit --sde vp .*\[0, 1\] \(centered=False\).*divides its output"
    ):
        resolve(unet_config="ncsnpp-tiny", sde="vp")
    with pytest.raises(TrainingError, match="Fourier features embed sigma"):
        resolve(unet_config="ncsnpp-tiny", continuous=False)
    with pytest.raises(TrainingError, match=re.escape("positional embedding takes labels")):
        resolve(unet_config="ddpmpp-cifar10-vp", sde="ve", resolution=32)
