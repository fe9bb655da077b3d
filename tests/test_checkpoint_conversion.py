"""Published DiNof / score_sde_pytorch checkpoints -> a complete DiNofPipeline (`dinof-convert-checkpoint`).

The checkpoints are written here in the published layout (`utils.save_checkpoint` of either code base): the score
network's state dict in the published naming (`NCSNppModel.to_original_state_dict`, checked against the published
code by tests/test_ncsnpp.py), the flow as the published code builds it (normflows, as in test_flow_conversion.py),
the EMAs as Song et al.'s `ExponentialMovingAverage.state_dict()` (shadow parameters in `parameters()` order over the
parameters that require grad), and an Adam state.
"""

import argparse
import json
import os
import runpy
import sys

import pytest
import torch
from test_flow_conversion import published_glow, trained_like

from dinof_diffusers import DiNofPipeline, NCSNppModel
from dinof_diffusers.conversion.checkpoint import infer_published_config, main
from dinof_diffusers.models import NCSNPP_PUBLISHED_CONFIGS
from dinof_diffusers.schedulers import DINOF_PUBLISHED_SCHEDULER_CONFIGS
from dinof_diffusers.training import build_models, resolve_run_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the small network of every test: one resolution level of each kind, nf 16
SMALL = dict(sample_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def published_network(name, seed=0):
    """An NCSNppModel of the published config `name` at the small size, its weights perturbed (the residual branches'
    last convolutions start at ~0 and would hide mapping errors)."""
    torch.manual_seed(seed)
    model = NCSNppModel(**{**NCSNPP_PUBLISHED_CONFIGS[name], **SMALL})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def published_ema(model, seed=1):
    """An EMA state of `model` in the published form: shadow parameters differing from the raw weights."""
    generator = torch.Generator().manual_seed(seed)
    state = model.to_original_state_dict()
    shadow = [
        state[k] + 0.01 * torch.randn(state[k].shape, generator=generator) for k in model.original_parameter_names()
    ]
    return {"decay": 0.999, "num_updates": 12, "shadow_params": shadow}


def adam_state(*parameter_lists):
    parameters = [p for parameters in parameter_lists for p in parameters]
    optimizer = torch.optim.Adam(parameters, lr=2e-4)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()
    return optimizer.state_dict()


@pytest.fixture(scope="module")
def dinof_checkpoint(tmp_path_factory):
    """A DiNof `checkpoint_3.pth` of the (small) NCSN++ VE config: model_0 / model_1 / ema_0 / ema_1 / optimizer."""
    score = published_network("ncsnpp-cifar10-ve")
    torch.manual_seed(2)
    flow = trained_like(published_glow(channels=3, size=8, num_levels=2, flow_depth=2, hidden=16))
    flow_ema = {
        "decay": 0.999,
        "num_updates": 12,
        "shadow_params": [p.detach() + 0.01 * torch.randn_like(p) for p in flow.parameters()],
    }
    checkpoint = {
        "optimizer": adam_state(score.parameters(), flow.parameters()),
        "model_0": score.to_original_state_dict(),
        "model_1": flow.state_dict(),
        "ema_0": published_ema(score),
        "ema_1": flow_ema,
        "step": 3,
    }
    path = tmp_path_factory.mktemp("dinof") / "checkpoint_3.pth"
    torch.save(checkpoint, path)
    return {"path": path, "checkpoint": checkpoint, "score": score, "flow": flow}


@pytest.fixture(scope="module")
def score_sde_checkpoint(tmp_path_factory):
    """A score_sde_pytorch checkpoint of the (small) DDPM++ VP config: model (DataParallel prefix) / ema / ..."""
    score = published_network("ddpmpp-cifar10-vp", seed=3)
    checkpoint = {
        "optimizer": adam_state(score.parameters()),
        "model": {f"module.{k}": v for k, v in score.to_original_state_dict().items()},
        "ema": published_ema(score, seed=4),
        "step": 5,
    }
    path = tmp_path_factory.mktemp("score_sde") / "checkpoint_5.pth"
    torch.save(checkpoint, path)
    return {"path": path, "checkpoint": checkpoint, "score": score}


def small_config_file(folder):
    path = folder / "small.json"
    path.write_text(json.dumps(SMALL))
    return str(path)


def assert_network_weights(unet, original_state, ema=None):
    """The converted network holds `original_state` (published naming), with the EMA's shadow parameters in place
    of the parameters that require grad when `ema` is given."""
    expected = dict(original_state)
    if ema is not None:
        expected.update(zip(unet.original_parameter_names(), ema["shadow_params"]))
    state = unet.state_dict()
    for key, published in unet.original_key_map().items():
        torch.testing.assert_close(state[key], expected[published], rtol=0, atol=0, msg=key)


def test_dinof_checkpoint_gives_a_complete_pipeline_with_the_ema_weights(dinof_checkpoint, tmp_path, capsys):
    out = tmp_path / "pipeline"
    args = ["--checkpoint", str(dinof_checkpoint["path"]), "--output_dir", str(out)]
    assert main(args + ["--config", "ncsnpp-cifar10-ve", "--model_config", small_config_file(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "dinof checkpoint (step 3): ncsnpp-cifar10-ve" in printed and "EMA weights (decay 0.999" in printed
    assert sorted(os.listdir(tmp_path)) == ["pipeline", "small.json"]  # nothing temporary left

    pipeline = DiNofPipeline.from_pretrained(out)
    checkpoint = dinof_checkpoint["checkpoint"]
    assert isinstance(pipeline.unet, NCSNppModel) and pipeline.unet.config.nf == 16
    assert_network_weights(pipeline.unet, checkpoint["model_0"], checkpoint["ema_0"])
    # the Fourier features' W is not averaged (not in shadow_params): it is the raw one
    assert pipeline.unet.original_key_map()["time_proj.weight"] == "all_modules.0.W"
    assert "all_modules.0.W" not in pipeline.unet.original_parameter_names()
    ema_flow = published_glow(channels=3, size=8, num_levels=2, flow_depth=2, hidden=16)
    ema_flow.load_state_dict(dict(checkpoint["model_1"]))
    for parameter, shadow in zip(ema_flow.parameters(), checkpoint["ema_1"]["shadow_params"]):
        parameter.data.copy_(shadow)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.flow_prior.log_prob(x), ema_flow.log_prob(x, None), rtol=1e-5, atol=1e-4)
    scheduler = {k: pipeline.scheduler.config[k] for k in DINOF_PUBLISHED_SCHEDULER_CONFIGS["ncsnpp-cifar10-ve"]}
    assert scheduler == DINOF_PUBLISHED_SCHEDULER_CONFIGS["ncsnpp-cifar10-ve"]

    images = pipeline(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt"
    )
    assert images.images.shape == (2, 3, 8, 8) and torch.isfinite(images.images).all() and images.nfe == 6

    # --no_ema: the raw weights of both networks
    assert main(args + ["--overwrite", "--no_ema", "--config", "ncsnpp-cifar10-ve", "--model_config",
                        small_config_file(tmp_path)]) == 0  # fmt: skip
    raw = DiNofPipeline.from_pretrained(out)
    assert_network_weights(raw.unet, checkpoint["model_0"])
    with torch.no_grad():
        flow_log_prob = dinof_checkpoint["flow"].log_prob(x, None)
        torch.testing.assert_close(raw.flow_prior.log_prob(x), flow_log_prob, rtol=1e-5, atol=1e-4)


def test_score_sde_checkpoint_gives_a_pipeline_ready_for_flow_training(score_sde_checkpoint, tmp_path, capsys):
    out = tmp_path / "pipeline"
    args = ["--checkpoint", str(score_sde_checkpoint["path"]), "--output_dir", str(out)]
    assert main(args + ["--config", "ddpmpp-cifar10-vp", "--model_config", small_config_file(tmp_path)]) == 0
    assert "No flow prior" in capsys.readouterr().out

    pipeline = DiNofPipeline.from_pretrained(out)
    checkpoint = score_sde_checkpoint["checkpoint"]
    assert pipeline.flow_prior is None
    published = {k[len("module.") :]: v for k, v in checkpoint["model"].items()}
    assert_network_weights(pipeline.unet, published, checkpoint["ema"])
    config = pipeline.scheduler.config
    assert (config.sde_type, config.prediction_type, config.predictor, config.corrector) == (
        "vp",
        "epsilon",
        "euler_maruyama",
        "none",
    )
    generator = torch.Generator().manual_seed(0)  # no flow: the baseline PC sampler from the SDE prior at T
    images = pipeline(batch_size=2, num_inference_steps=4, generator=generator, use_flow_prior=False, output_type="pt")
    assert images.images.shape == (2, 3, 8, 8) and torch.isfinite(images.images).all() and images.nfe == 4

    # train.py --train_component flow --pretrained_model_name_or_path <folder>: the converted network, a new flow
    run = resolve_run_config(
        argparse.Namespace(pretrained_model_name_or_path=str(out), train_component="flow", flow_num_levels=2)
    )
    assert run.unet_class == "NCSNppModel" and run.pretrained_kind == "dinof" and run.flow_prior == "new"
    unet, flow_prior, scheduler = build_models(run)
    assert isinstance(unet, NCSNppModel) and flow_prior.config.in_channels == 3 and flow_prior.config.sample_size == 8
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.model_conditioning == "score_sde"
    assert_network_weights(unet, published, checkpoint["ema"])
    # and the network alone, as a plain NCSNppModel folder
    run = resolve_run_config(argparse.Namespace(pretrained_model_name_or_path=str(out / "unet"), sde="vp"))
    assert (
        run.unet_class == "NCSNppModel" and run.pretrained_kind == "unet" and run.scheduler_config["sde_type"] == "vp"
    )
    assert isinstance(build_models(run)[0], NCSNppModel)


def test_config_inference_and_its_ambiguity(dinof_checkpoint, score_sde_checkpoint):
    # at the small size: the VE network is also the deep one's (num_res_blocks is overridden), DDPM++ is three configs
    smld = published_network("ncsnpp-cifar10-ve-discrete").to_original_state_dict()
    assert infer_published_config(smld, SMALL) == "ncsnpp-cifar10-ve-discrete"
    with pytest.raises(ValueError, match="several published configs, ncsnpp-cifar10-ve, ncsnpp-deep-cifar10-ve"):
        infer_published_config(dinof_checkpoint["checkpoint"]["model_0"], SMALL)
    with pytest.raises(ValueError, match="ddpmpp-cifar10-vp, ddpmpp-cifar10-vp-discrete, ddpmpp-cifar10-subvp"):
        infer_published_config(score_sde_checkpoint["checkpoint"]["model"], SMALL)
    # the full-size published networks (shapes only: zero-size storage, nothing allocated)
    for name in ("ncsnpp-cifar10-ve", "ncsnpp-celebahq256-ve"):  # the latter told apart by its sigma_max
        with torch.device("meta"):
            model = NCSNppModel(**NCSNPP_PUBLISHED_CONFIGS[name])
        shapes = {key: torch.zeros(()).expand(value.shape) for key, value in model.to_original_state_dict().items()}
        shapes["sigmas"] = model._original_sigmas()
        assert infer_published_config(shapes) == name
    with pytest.raises(ValueError, match="fits none of the published configs .*ncsnpp-cifar10-ve: .*missing keys"):
        infer_published_config(dict(smld, **{"all_modules.99.weight": torch.zeros(3)}), SMALL)


class NotATensor:
    """Pickled by reference: torch.load(weights_only=True) refuses it."""


def test_clear_errors_before_anything_is_written(dinof_checkpoint, tmp_path, capsys):
    pickled = tmp_path / "pickled.pth"
    torch.save({"model_0": NotATensor()}, pickled)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(pickled), "--output_dir", str(out)]) == 1
    assert "weights_only=True" in capsys.readouterr().err

    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, other)
    assert main(["--checkpoint", str(other), "--output_dir", str(out)]) == 1
    assert "neither DiNof's (`model_0`" in capsys.readouterr().err

    without_ema = dict(dinof_checkpoint["checkpoint"])
    del without_ema["ema_0"]
    path = tmp_path / "without_ema.pth"
    torch.save(without_ema, path)
    args = ["--checkpoint", str(path), "--output_dir", str(out), "--model_config", small_config_file(tmp_path)]
    assert main(args + ["--config", "ncsnpp-cifar10-ve"]) == 1
    error = capsys.readouterr().err
    assert "no `ema_0`" in error and "--no_ema" in error
    # a config that does not fit: the key errors of NCSNppModel.from_original_state_dict
    assert main(args + ["--config", "ddpmpp-cifar10-vp", "--no_ema"]) == 1
    assert "missing" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["other.pth", "pickled.pth", "small.json", "without_ema.pth"]


def test_the_script_is_the_console_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convert_dinof_checkpoint.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO_ROOT, "scripts", "convert_dinof_checkpoint.py"), run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "dinof-convert-checkpoint" in printed and "--no_ema" in printed and "ncsnpp-celebahq256-ve" in printed
