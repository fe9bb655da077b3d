"""NCSNppModel: the published NCSN++ / DDPM++ score network (issue 10, part 1).

The reference is tests/data/ncsnpp/ (made once from score_sde_pytorch, see its README): the published state dict's
layout, small weights and the published network's output, which NCSNppModel must reproduce to 1e-5.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dinof_diffusers import NCSNppModel
from dinof_diffusers.models import NCSNPP_PUBLISHED_CONFIGS, NCSNPP_PUBLISHED_PARAMETER_COUNTS
from dinof_diffusers.models.ncsnpp_layers import (
    Downsample,
    Upsample,
    fir_downsample_2d,
    fir_kernel_2d,
    fir_upsample_2d,
    upfirdn2d,
)

DATA = Path(__file__).parent / "data" / "ncsnpp"
LAYOUT = json.loads((DATA / "published_layout.json").read_text())
FIXTURES = ("ncsnpp_ve", "ddpmpp_vp")

TINY = dict(sample_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
# The combinations of resampling / pyramids / embedding that the seven published configs use, at toy size.
PUBLISHED_KINDS = {
    "ncsnpp-ve": dict(NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve"], **TINY),
    "ncsnpp-ve-discrete": dict(NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve-discrete"], **TINY),
    "ddpmpp-vp": dict(NCSNPP_PUBLISHED_CONFIGS["ddpmpp-cifar10-vp"], **TINY),
    "ncsnpp-celebahq": dict(NCSNPP_PUBLISHED_CONFIGS["ncsnpp-celebahq256-ve"], **TINY),
    # options no published config uses (the published PyTorch code cannot run some of them, see ncsnpp_layers.py)
    "ddpm-blocks-residual-output-cat-input": dict(
        NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve"],
        **TINY,
        resblock_type="ddpm",
        progressive="residual",
        progressive_input="input_skip",
        progressive_combine="cat",
    ),
}


def conditioning(config, batch=2):
    """A valid `timestep` per the class docstring: sigma (Fourier) or a label / 999 t (positional)."""
    if config["embedding_type"] == "fourier":
        return torch.tensor([0.3, 5.0][:batch])
    return torch.tensor([10.0, 900.0][:batch])


def inputs(config, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    return torch.rand(batch, config.get("in_channels", 3), size, size, generator=gen)


def perturbed(model, seed=0):
    """All trainable weights moved off their initialisation (init_scale 0 makes branches ~1e-10)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def fixture_state_dict(name):
    """The published state dict: stored in float16 (lossless), float32 as published, `sigmas` float64."""
    state = load_file(DATA / f"{name}.safetensors")
    return {key: value.float() if value.dtype == torch.float16 else value for key, value in state.items()}


def fixture_config(name):
    entry = LAYOUT[name]
    return dict(
        entry["model_options"],
        sample_size=LAYOUT["sample_size"],
        in_channels=LAYOUT["in_channels"],
        centered=entry["centered"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# the published network, reproduced


@pytest.mark.parametrize("name", FIXTURES)
def test_reproduces_the_published_network(name):
    model = NCSNppModel.from_original_state_dict(fixture_state_dict(name), **fixture_config(name))
    io = load_file(DATA / f"{name}_io.safetensors")
    with torch.no_grad():
        out = model(io["sample"], io["timestep"]).sample
    assert out.dtype == torch.float32 and not model.training
    torch.testing.assert_close(out, io["output"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FIXTURES)
def test_published_naming_order_and_ema_order(name):
    entry = LAYOUT[name]
    model = NCSNppModel(**fixture_config(name))
    original = model.to_original_state_dict()
    # same keys, in the published order, with the published shapes and dtypes (float64 `sigmas`)
    assert [[key, list(value.shape), str(value.dtype)[6:]] for key, value in original.items()] == entry["keys"]
    # the published EMA keeps the parameters that require grad, in `model.parameters()` order (no Fourier `W`)
    assert model.original_parameter_names() == entry["trainable_parameters"]
    assert len(model.original_parameter_names(requires_grad_only=False)) == len(entry["keys"]) - 1  # no `sigmas`
    assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"]


def test_a_wrong_key_map_changes_the_output():
    """The fixture can tell a swapped pair of same-shaped weights (here attention's query and key)."""
    name = "ncsnpp_ve"
    state = fixture_state_dict(name)
    model = NCSNppModel(**fixture_config(name))
    key_map = model.original_key_map()
    query, key = key_map["mid_block.attention.to_q.weight"], key_map["mid_block.attention.to_k.weight"]
    state[query], state[key] = state[key], state[query]
    swapped = NCSNppModel.from_original_state_dict(state, **fixture_config(name))
    io = load_file(DATA / f"{name}_io.safetensors")
    with torch.no_grad():
        out = swapped(io["sample"], io["timestep"]).sample
    assert (out - io["output"]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# every published kind of network


@pytest.mark.parametrize("kind", PUBLISHED_KINDS)
def test_shape_determinism_gradients_and_round_trip(kind):
    config = PUBLISHED_KINDS[kind]
    torch.manual_seed(0)
    model = NCSNppModel(**config)
    torch.manual_seed(0)
    twin = NCSNppModel(**config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    perturbed(model)
    x, t = inputs(config), conditioning(config)
    with torch.no_grad():
        out = model(x, t).sample
        again = model(x, t, return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, again)

    # the published naming: to it and back gives the same weights and the same function
    original = model.to_original_state_dict()
    assert all(key == "sigmas" or key.startswith("all_modules.") for key in original)
    restored = NCSNppModel.from_original_state_dict(original, **config)
    assert restored.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(restored(x, t).sample, out)

    # gradients reach every parameter that requires grad (training mode, dropout on)
    model.train()
    model(x, t).sample.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert name == "time_proj.weight" and p.grad is None


def test_parameter_counts_of_the_seven_published_configs():
    assert set(NCSNPP_PUBLISHED_CONFIGS) == set(NCSNPP_PUBLISHED_PARAMETER_COUNTS)
    assert len(NCSNPP_PUBLISHED_CONFIGS) == 7
    for name, config in NCSNPP_PUBLISHED_CONFIGS.items():
        with torch.device("meta"):
            model = NCSNppModel(**config)
        counts = NCSNPP_PUBLISHED_PARAMETER_COUNTS[name]
        assert sum(p.numel() for p in model.parameters()) == counts["total"], name
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["trainable"], name
    with torch.device("meta"):
        default = NCSNppModel()
    expected = NCSNPP_PUBLISHED_CONFIGS["ncsnpp-cifar10-ve"]
    assert {key: default.config[key] for key in expected} == expected


# ---------------------------------------------------------------------------------------------------------------------
# conditioning and the data range


def test_scale_by_sigma_divides_by_sigma():
    for kind in ("ncsnpp-ve", "ncsnpp-ve-discrete"):
        config = PUBLISHED_KINDS[kind]
        scaled = perturbed(NCSNppModel(**config))
        plain = NCSNppModel(**dict(config, scale_by_sigma=False)).eval()
        plain.load_state_dict(scaled.state_dict())
        x = inputs(config)
        if config["embedding_type"] == "fourier":
            t = torch.tensor([0.3, 5.0])
            sigma = t
        else:  # the label indexes the descending noise levels: 0 is sigma_max, N - 1 is sigma_min
            t = torch.tensor([0, config["num_scales"] - 1])
            sigma = torch.tensor([config["sigma_max"], config["sigma_min"]])
        with torch.no_grad():
            torch.testing.assert_close(scaled(x, t).sample * sigma[:, None, None, None], plain(x, t).sample)


def test_smld_labels_index_the_published_sigmas():
    config = PUBLISHED_KINDS["ncsnpp-ve-discrete"]
    model = NCSNppModel(**config)
    sigmas = model.to_original_state_dict()["sigmas"]
    assert sigmas.dtype == torch.float64 and sigmas[0] == pytest.approx(50.0) and sigmas[-1] == pytest.approx(0.01)
    labels = torch.tensor([0, 1, 137, 998, 999])
    torch.testing.assert_close(model._sigma_of_label(labels), sigmas[labels], rtol=1e-12, atol=0.0)


def test_centered_false_maps_inputs_to_2x_minus_1():
    config = PUBLISHED_KINDS["ncsnpp-ve"]
    uncentered = perturbed(NCSNppModel(**config))
    centered = NCSNppModel(**dict(config, centered=True)).eval()
    centered.load_state_dict(uncentered.state_dict())
    x, t = inputs(config), conditioning(config)
    with torch.no_grad():
        torch.testing.assert_close(uncentered(x, t).sample, centered(2 * x - 1, t).sample)


def test_timestep_forms_and_unconditional_model():
    config = PUBLISHED_KINDS["ddpmpp-vp"]
    model = perturbed(NCSNppModel(**config))
    x = inputs(config)
    with torch.no_grad():
        full = model(x, torch.tensor([500.0, 500.0])).sample
        for t in (500.0, 500, torch.tensor(500.0), torch.tensor([500.0])):
            torch.testing.assert_close(model(x, t).sample, full)
        with pytest.raises(ValueError, match="timestep"):
            model(x, torch.ones(3))
        assert not torch.allclose(model(x, 10.0).sample, full)

        unconditional = perturbed(NCSNppModel(**dict(config, conditional=False)))
        torch.testing.assert_close(unconditional(x, 10.0).sample, unconditional(x, 900.0).sample, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_key_errors_are_clear_and_the_data_parallel_prefix_is_accepted():
    name = "ddpmpp_vp"
    config = fixture_config(name)
    state = fixture_state_dict(name)
    reference = NCSNppModel.from_original_state_dict(state, **config)
    prefixed = NCSNppModel.from_original_state_dict({f"module.{k}": v for k, v in state.items()}, **config)
    assert all(torch.equal(v, prefixed.state_dict()[k]) for k, v in reference.state_dict().items())

    broken = dict(state)
    del broken["all_modules.3.GroupNorm_0.weight"]
    broken["all_modules.99.Conv_0.weight"] = torch.zeros(1)
    broken["all_modules.0.weight"] = torch.zeros(64, 17)
    with pytest.raises(ValueError) as error:
        NCSNppModel.from_original_state_dict(broken, **config)
    message = str(error.value)
    assert "1 missing: all_modules.3.GroupNorm_0.weight" in message
    assert "1 unexpected: all_modules.99.Conv_0.weight" in message
    assert "1 mis-shaped: all_modules.0.weight: (64, 17) (expected (64, 16))" in message

    # a config that does not fit the weights is the same error
    with pytest.raises(ValueError, match="missing"):
        NCSNppModel.from_original_state_dict(state, **dict(config, num_res_blocks=2))
    with pytest.raises(ValueError, match="sigma_max"):
        NCSNppModel.from_original_state_dict(state, **dict(config, sigma_max=90.0))


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("normalization", "InstanceNorm++", "`normalization` must be 'GroupNorm'"),
        ("nonlinearity", "elu", "`nonlinearity` must be 'swish'"),
        ("attention_type", "legacy", "`attention_type` must be 'ddpm'"),
        ("conv_size", 5, "`conv_size` must be 3"),
        ("resblock_type", "BigGAN", "`resblock_type` must be one of \\['biggan', 'ddpm'\\]"),
        ("progressive", "input_skip", "`progressive` must be one of"),
        ("progressive_input", "output_skip", "`progressive_input` must be one of"),
        ("progressive_combine", "max", "`progressive_combine` must be one of"),
        ("embedding_type", "learned", "`embedding_type` must be one of"),
        ("sample_size", 7, "`sample_size` must be divisible by 2"),
        ("ch_mult", (1, 0), "`ch_mult` must be an integer >= 1"),
        ("dropout", 1.5, "`dropout` must be a finite number in"),
        ("nf", 15, "GroupNorm"),
        ("sigma_min", 60.0, "`sigma_max` must be a finite number > 60.0"),
    ],
)
def test_config_refusals(option, value, match):
    with pytest.raises(ValueError, match=match):
        NCSNppModel(**dict(TINY, **{option: value}))


# ---------------------------------------------------------------------------------------------------------------------
# FIR resampling in plain PyTorch, and save / load


def naive_upfirdn2d(x, kernel, up, down, pad0, pad1):
    """StyleGAN2's definition, step by step: zero insertion, padding (or cropping), true convolution, decimation."""
    b, c, h, w = x.shape
    stuffed = x.new_zeros(b, c, h * up, w * up)
    stuffed[..., ::up, ::up] = x
    padded = F.pad(stuffed, [pad0, pad1, pad0, pad1])
    out = F.conv2d(padded.reshape(b * c, 1, *padded.shape[2:]), kernel.flip(0, 1)[None, None])
    return out.reshape(b, c, *out.shape[2:])[..., ::down, ::down]


@pytest.mark.parametrize("fir", [(1, 3, 3, 1), (1, 2, 4), (1, 1)])
def test_upfirdn2d_matches_its_definition(fir):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    kernel = fir_kernel_2d(fir).double() * torch.linspace(0.5, 1.5, len(fir), dtype=torch.float64)  # asymmetric
    for up, down in ((2, 1), (1, 2), (1, 1)):
        for pad in ((2, 1), (1, 1), (0, 2), (-1, 2)):
            torch.testing.assert_close(upfirdn2d(x, kernel, up, down, pad), naive_upfirdn2d(x, kernel, up, down, *pad))
    # the published wrappers double / halve the size; with the published kernel they keep constants
    ones = torch.ones(1, 2, 8, 8)
    k = fir_kernel_2d(fir)
    assert fir_upsample_2d(ones, k).shape == (1, 2, 16, 16) and fir_downsample_2d(ones, k).shape == (1, 2, 4, 4)
    if fir == (1, 3, 3, 1):
        torch.testing.assert_close(fir_upsample_2d(ones, k)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
        torch.testing.assert_close(fir_downsample_2d(ones, k)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


def test_fused_fir_resampling_convolutions_equal_the_unfused_ones_inside_the_border():
    """The fused published ops equal FIR upsampling then a 3x3 conv (and a 3x3 conv then FIR downsampling) away
    from the one-pixel border: this checks the transposed convolution's weight flip and alignment."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    up = Upsample(4, 6, with_conv=True, fir=True, fir_kernel=(1, 3, 3, 1))
    unfused = F.conv2d(fir_upsample_2d(x, up.fir_filter), up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(up(x)[..., 1:-1, 1:-1], unfused[..., 1:-1, 1:-1])
    down = Downsample(4, 6, with_conv=True, fir=True, fir_kernel=(1, 3, 3, 1))
    x = torch.randn(2, 4, 16, 16)
    unfused = fir_downsample_2d(F.conv2d(x, down.conv.weight, down.conv.bias, padding=1), down.fir_filter)
    torch.testing.assert_close(down(x)[..., 1:-1, 1:-1], unfused[..., 1:-1, 1:-1])


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    config = PUBLISHED_KINDS["ncsnpp-celebahq"]
    model = perturbed(NCSNppModel(**config))
    model.save_pretrained(tmp_path)
    loaded = NCSNppModel.from_pretrained(tmp_path).eval()
    saved = {key: list(value) if isinstance(value, tuple) else value for key, value in model.config.items()}
    assert {key: loaded.config[key] for key in saved} == saved
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert not loaded.time_proj.weight.requires_grad
    x, t = inputs(config), conditioning(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, model(x, t).sample, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# the scheduler's conditioning: a score computed through DiNofScheduler is the published get_score_fn's


def published_score_fn(plain, sde, continuous, x, t, N=1000):
    """score_sde_pytorch's `models/utils.get_score_fn`, written out, around `plain`, the network without
    `scale_by_sigma` (so that the division by sigma is this function's, from the published noise levels)."""
    t = t.double()
    if sde == "ve":
        if continuous:
            sigma = 0.01 * (50.0 / 0.01) ** t  # the marginal std, also the label
            return plain(x, sigma.float()).sample / sigma.float()[:, None, None, None]
        labels = torch.round((1.0 - t) * (N - 1)).long()  # label 0 is sigma_max
        sigmas = torch.exp(torch.linspace(math.log(50.0), math.log(0.01), N, dtype=torch.float64))
        return plain(x, labels).sample / sigmas[labels].float()[:, None, None, None]
    log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    if continuous:
        labels = 999 * t
        std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean)) if sde == "vp" else 1.0 - torch.exp(2.0 * log_mean)
    else:
        labels = t * (N - 1)
        alphas_cumprod = torch.cumprod(1.0 - torch.linspace(0.1 / N, 20.0 / N, N, dtype=torch.float64), dim=0)
        std = torch.sqrt(1.0 - alphas_cumprod)[labels.long()]
    return -plain(x, labels.float()).sample / std.float()[:, None, None, None]


@pytest.mark.parametrize(
    "config_name,fixture",
    [
        ("ncsnpp-cifar10-ve", "ncsnpp_ve"),
        ("ncsnpp-cifar10-ve-discrete", "ddpmpp_vp"),  # the fixture's positional network, made an SMLD score network
        ("ddpmpp-cifar10-vp", "ddpmpp_vp"),
        ("ddpmpp-cifar10-vp-discrete", "ddpmpp_vp"),
        ("ddpmpp-cifar10-subvp", "ddpmpp_vp"),
    ],
)
def test_scheduler_conditioning_gives_the_published_score(config_name, fixture):
    from dinof_diffusers import DiNofScheduler
    from dinof_diffusers.schedulers import DINOF_PUBLISHED_SCHEDULER_CONFIGS

    scheduler = DiNofScheduler(**DINOF_PUBLISHED_SCHEDULER_CONFIGS[config_name])
    sde, continuous = scheduler.config.sde_type, scheduler.config.continuous
    config = dict(fixture_config(fixture), centered=sde != "ve")
    if config_name == "ncsnpp-cifar10-ve-discrete":
        config.update(scale_by_sigma=True)
    model = NCSNppModel.from_original_state_dict(fixture_state_dict(fixture), **config)
    plain = NCSNppModel.from_original_state_dict(fixture_state_dict(fixture), **dict(config, scale_by_sigma=False))
    # the times of the sampler (DiNof's grid from t*, the baseline's from T; in float64, the exact grid the scheduler
    # snaps its float32 `timesteps` to) and of training
    eps = scheduler.sampling_eps
    dinof = torch.linspace(0.6, eps, 600, dtype=torch.float64)[[0, 1, 300, -1]]
    baseline = torch.linspace(1.0, eps, 1000, dtype=torch.float64)[[0, 1, 500, -1]]
    training = scheduler.sample_training_timesteps(4, generator=torch.Generator().manual_seed(0))
    t = torch.cat([dinof, baseline, training.double()])
    x = inputs(config, batch=len(t), seed=1) * (1.0 if sde == "ve" else 2.0) - (0.0 if sde == "ve" else 1.0)
    with torch.no_grad():
        output = model(x, scheduler.model_timestep(t)).sample
        ours = scheduler.output_to_score(output, x, t)
        published = published_score_fn(plain, sde, continuous, x, t)
    torch.testing.assert_close(ours, published, rtol=1e-4, atol=1e-4)
    if not continuous:  # the training labels are the published training's integers (DDPM: to float32 rounding)
        labels = scheduler.model_timestep(training)
        index = torch.floor(training.double() * 999 + 1e-7).long()
        expected = 999 - index if sde == "ve" else index.float()
        torch.testing.assert_close(labels.to(expected.dtype), expected, rtol=0, atol=1e-3)


def test_the_pipeline_takes_ncsnpp_with_its_published_labels_only():
    from dinof_diffusers import DiNofPipeline, DiNofScheduler

    model = NCSNppModel(**PUBLISHED_KINDS["ddpmpp-vp"])
    diffusers_labels = DiNofScheduler(sde_type="vp", prediction_type="epsilon", continuous=False)
    with pytest.raises(ValueError, match="NCSNppModel expects the labels of `model_conditioning='score_sde'`"):
        DiNofPipeline(unet=model, scheduler=diffusers_labels)
    pipeline = DiNofPipeline(
        unet=model, scheduler=DiNofScheduler.from_config(diffusers_labels.config, model_conditioning="score_sde")
    )
    with pytest.raises(ValueError, match="model_conditioning='diffusers'"):
        pipeline.scheduler = diffusers_labels
    # continuous models are conditioned alike under both conventions
    DiNofPipeline(unet=model, scheduler=DiNofScheduler(sde_type="vp", prediction_type="epsilon"))
