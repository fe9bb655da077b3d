"""Published DiNof flows (normflows 1.7.3 `MultiscaleFlow` of `GlowBlock`s) -> `FlowPriorModel`."""

import errno
import json
import os
import subprocess
import sys

import normflows as nf  # a test extra: the published code vendors it
import pytest
import safetensors.torch
import torch

from dinof_diffusers.conversion.flow import apply_ema, convert_checkpoint, main
from dinof_diffusers.models import FlowPriorModel
from dinof_diffusers.models.glow_layout import GlowLayout

# normflows' Invertible1x1Conv calls the deprecated torch.lu.
pytestmark = pytest.mark.filterwarnings("ignore:torch.lu is deprecated")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def published_glow(channels=3, size=8, num_levels=2, flow_depth=2, hidden=16, scale=True):
    """The flow exactly as the published DiNof code builds it (`init_models` in its run_lib.py)."""
    layout = GlowLayout(channels, num_levels)
    q0, merges, flows = [], [], []
    for i, latent_shape in enumerate(layout.latent_shapes(size, size)):
        level = [
            nf.flows.GlowBlock(layout.level_channels(i), hidden, split_mode="channel", scale=scale)
            for _ in range(flow_depth)
        ]
        flows.append(level + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
        q0.append(nf.distributions.GlowBase(latent_shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def trained_like(flow, size=8, channels=3, seed=0):
    """ActNorm initialised on data, then every parameter perturbed (zero last convolutions would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(flow.parameters()).dtype
    flow.log_prob(0.5 + torch.randn(8, channels, size, size, generator=gen, dtype=dtype), None)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            std = 0.3 if name.startswith("q0") else 0.05
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=dtype))
    return flow


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return trained_like(published_glow().double())


def test_log_prob_matches_normflows_float64(reference):
    model = FlowPriorModel.from_original_state_dict(reference.state_dict(), sample_size=8)
    assert model.dtype == torch.float64 and not model.training
    config = {k: model.config[k] for k in ("in_channels", "num_levels", "flow_depth", "hidden_channels", "coupling")}
    assert config == dict(in_channels=3, num_levels=2, flow_depth=2, hidden_channels=16, coupling="affine")
    x = 0.5 + torch.randn(6, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = reference.log_prob(x, None)
        torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-10, atol=0)
        ref_latents, _ = reference.inverse_and_log_det(x)
        for a, b in zip(model.encode(x), ref_latents):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        # the sampling direction too
        z = [torch.randn_like(t) for t in ref_latents]
        ref_x, _ = reference.forward_and_log_det(z)
        torch.testing.assert_close(model.decode(z), ref_x, rtol=0, atol=1e-10)
    assert all(level.actnorm_initialized.all() for level in model.levels)


def test_additive_coupling_and_float32():
    torch.manual_seed(1)
    reference = trained_like(published_glow(channels=1, num_levels=3, flow_depth=3, scale=False), channels=1)
    model = FlowPriorModel.from_original_state_dict(reference.state_dict(), sample_size=8)
    assert model.config.coupling == "additive" and model.config.num_levels == 3 and model.dtype == torch.float32
    x = 0.5 + torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), reference.log_prob(x, None), rtol=1e-5, atol=1e-4)


def test_data_parallel_prefix_and_explicit_config(reference):
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    model = FlowPriorModel.from_original_state_dict(state, sample_size=8, num_levels=2, hidden_channels=16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), reference.log_prob(x, None), rtol=1e-10, atol=0)


def test_clear_errors(reference):
    state = dict(reference.state_dict())
    missing = dict(state)
    del missing["flows.1.0.flows.1.log_S"]
    with pytest.raises(ValueError, match=r"missing keys: flows\.1\.0\.flows\.1\.log_S"):
        FlowPriorModel.from_original_state_dict(missing)
    extra = {**state, "flows.0.0.flows.2.extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys: flows\.0\.0\.flows\.2\.extra"):
        FlowPriorModel.from_original_state_dict(extra)
    bad = {**state, "flows.0.1.flows.2.s": torch.zeros(1, 5, 1, 1, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"flows\.0\.1\.flows\.2\.s: expected \(1, 24, 1, 1\), got \(1, 5, 1, 1\)"):
        FlowPriorModel.from_original_state_dict(bad)
    with pytest.raises(ValueError, match="hidden_channels=32"):  # a given config is checked against the weights
        FlowPriorModel.from_original_state_dict(state, hidden_channels=32)
    with pytest.raises(ValueError, match="sample_size"):
        FlowPriorModel.from_original_state_dict(state, sample_size=6)
    with pytest.raises(ValueError, match="q0"):
        FlowPriorModel.from_original_state_dict({"flows.0.0.flows.1.L": torch.eye(4)})
    class_cond = {**state, "q0.0.loc_cc": torch.zeros(10, 24)}
    with pytest.raises(ValueError, match="class-conditional"):
        FlowPriorModel.from_original_state_dict(class_cond)


def published_checkpoint(flow, step=7):
    """What the published `save_checkpoint` writes: both models, both EMAs, the optimiser."""
    score_model = torch.nn.Conv2d(3, 3, 1).double()
    optimizer = torch.optim.Adam(list(score_model.parameters()) + list(flow.parameters()), lr=2e-4)
    ema_flow = {
        "decay": 0.999,
        "num_updates": step,
        "shadow_params": [p.detach() + 0.01 * torch.randn_like(p) for p in flow.parameters()],
    }
    return {
        "optimizer": optimizer.state_dict(),
        "model_0": score_model.state_dict(),
        "model_1": flow.state_dict(),
        "ema_0": {
            "decay": 0.999,
            "num_updates": step,
            "shadow_params": [p.detach() for p in score_model.parameters()],
        },
        "ema_1": ema_flow,
        "step": step,
    }


def test_conversion_script_end_to_end(reference, tmp_path, capsys):
    checkpoint = published_checkpoint(reference)
    path = tmp_path / "checkpoint_7.pth"
    torch.save(checkpoint, path)
    out = tmp_path / "converted"
    assert main(["--checkpoint", str(path), "--output_dir", str(out), "--sample_size", "8", "--dtype", "float64"]) == 0
    assert "ema weights" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_7.pth", "converted"]  # no temporary folder left
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "FlowPriorModel" and config["sample_size"] == 8 and config["flow_depth"] == 2

    model = FlowPriorModel.from_pretrained(out, torch_dtype=torch.float64)
    ema_reference = published_glow().double()
    ema_reference.load_state_dict(apply_ema(checkpoint["model_1"], checkpoint["ema_1"]))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), ema_reference.log_prob(x, None), rtol=1e-10, atol=0)

    # raw weights, and replacing an existing folder
    assert main(["--checkpoint", str(path), "--output_dir", str(out), "--sample_size", "8"]) == 1
    assert "not empty" in capsys.readouterr().err
    args = ["--checkpoint", str(path), "--output_dir", str(out), "--sample_size", "8", "--weights", "raw"]
    assert main(args + ["--dtype", "float64", "--overwrite"]) == 0
    raw = FlowPriorModel.from_pretrained(out, torch_dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(raw.log_prob(x), reference.log_prob(x, None), rtol=1e-10, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_7.pth", "converted"]


def test_conversion_errors_leave_nothing_behind(reference, tmp_path, capsys):
    checkpoint = published_checkpoint(reference)
    del checkpoint["model_1"]["flows.0.1.flows.1.U"]
    torch.save(checkpoint, tmp_path / "broken.pth")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tmp_path / "broken.pth"), "--output_dir", str(out), "--sample_size", "8"]) == 1
    assert "flows.0.1.flows.1.U" in capsys.readouterr().err
    checkpoint = published_checkpoint(reference)
    checkpoint["model_1"]["q0.1.loc"] = torch.zeros(1, 7, 1, 1, dtype=torch.float64)
    torch.save(checkpoint, tmp_path / "shape.pth")
    assert main(["--checkpoint", str(tmp_path / "shape.pth"), "--output_dir", str(out), "--weights", "raw"]) == 1
    assert "q0.1.loc: expected (1, 6, 1, 1), got (1, 7, 1, 1)" in capsys.readouterr().err
    checkpoint = published_checkpoint(reference)
    checkpoint["ema_1"]["shadow_params"].pop()
    torch.save(checkpoint, tmp_path / "ema.pth")
    assert main(["--checkpoint", str(tmp_path / "ema.pth"), "--output_dir", str(out), "--weights", "ema"]) == 1
    assert "shadow parameters" in capsys.readouterr().err
    torch.save({"unrelated": {"weight": torch.zeros(2)}}, tmp_path / "other.pth")
    assert main(["--checkpoint", str(tmp_path / "other.pth"), "--output_dir", str(out)]) == 1
    assert "No flow state dict" in capsys.readouterr().err
    torch.save({"model_1": reference.state_dict(), "config": object.__new__(_Opaque)}, tmp_path / "pickled.pth")
    assert main(["--checkpoint", str(tmp_path / "pickled.pth"), "--output_dir", str(out)]) == 1
    assert "weights_only" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["broken.pth", "ema.pth", "other.pth", "pickled.pth", "shape.pth"]


class _Opaque:
    pass


def test_damaged_checkpoints_and_unwritable_or_full_outputs_are_clear_errors(reference, tmp_path, capsys, monkeypatch):
    whole_path = tmp_path / "whole.pth"
    torch.save(published_checkpoint(reference), whole_path)
    whole = whole_path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    for name in ("truncated.pth", "random.pth"):
        assert main(["--checkpoint", str(tmp_path / name), "--output_dir", str(out), "--sample_size", "8"]) == 1
        error = capsys.readouterr().err
        assert f"{name}' cannot be read as a torch checkpoint" in error and "truncated, damaged" in error

    (tmp_path / "file").write_text("")
    assert main(["--checkpoint", str(whole_path), "--output_dir", str(tmp_path / "file" / "out")]) == 1
    assert "The folder of --output_dir" in capsys.readouterr().err

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert main(["--checkpoint", str(whole_path), "--output_dir", str(out), "--sample_size", "8"]) == 1
    error = capsys.readouterr().err
    assert "the disk is full" in error and str(out) in error and "GiB free" in error
    assert sorted(os.listdir(tmp_path)) == ["file", "random.pth", "truncated.pth", "whole.pth"]


def test_flow_state_dict_alone_and_explicit_key(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "flow.pth")
    model, info = convert_checkpoint(str(tmp_path / "flow.pth"), sample_size=8)
    assert info == {"state_dict_key": "", "weights": "raw"}
    torch.save({"model": [torch.nn.Linear(2, 2).state_dict(), reference.state_dict()]}, tmp_path / "list.pth")
    model, info = convert_checkpoint(str(tmp_path / "list.pth"), sample_size=8)
    assert info["state_dict_key"] == "model.1"
    model, info = convert_checkpoint(str(tmp_path / "list.pth"), key="model.1", sample_size=8)
    with pytest.raises(ValueError, match="model.0"):
        convert_checkpoint(str(tmp_path / "list.pth"), key="model.0", sample_size=8)


def test_script_runs_as_a_program(reference, tmp_path):
    torch.save(published_checkpoint(reference), tmp_path / "ckpt.pth")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = os.path.join(REPO_ROOT, "scripts", "convert_dinof_flow.py")
    args = ["--checkpoint", str(tmp_path / "ckpt.pth"), "--output_dir", str(tmp_path / "out"), "--sample_size", "8"]
    result = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
