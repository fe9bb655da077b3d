"""Tests of `FlowPriorModel`, the Glow flow prior (tiny sizes, CPU)."""

import math
import os

import pytest
import torch

from dinof_diffusers.models import FlowPriorModel, FlowPriorOutput
from dinof_diffusers.models.flow_prior import squeeze2d, unsqueeze2d

SMALL = dict(sample_size=8, in_channels=3, num_levels=2, flow_depth=2, hidden_channels=8)


def randomize(model: FlowPriorModel, scale: float = 0.05, seed: int = 0) -> FlowPriorModel:
    """Non-trivial couplings (the last convolutions start at zero), base distributions and 1x1 convolutions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for level in model.levels:
            for p in (level.coupling_conv3_weight, level.coupling_conv3_bias, level.conv_log_s):
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            for p in (level.prior_loc, level.prior_loc_logs, level.prior_log_scale, level.prior_log_scale_logs):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_model(dtype=torch.float32, init_batch: int = 8, seed: int = 0, **config) -> FlowPriorModel:
    torch.manual_seed(seed)
    model = FlowPriorModel(**{**SMALL, **config}).to(dtype=dtype)
    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    x = 0.5 + 2.0 * torch.randn(init_batch, model.config.in_channels, h, w, dtype=dtype)
    model.log_prob(x)  # ActNorm initialisation
    return randomize(model, seed=seed)


def base_log_density(model: FlowPriorModel, latents) -> torch.Tensor:
    """The base densities, written out with torch.distributions."""
    total = 0.0
    for level, z in zip(model.levels, latents):
        mean = level.prior_loc * torch.exp(3 * level.prior_loc_logs)
        sigma = torch.exp(level.prior_log_scale * torch.exp(3 * level.prior_log_scale_logs))
        normal = torch.distributions.Normal(mean[None, :, None, None], sigma[None, :, None, None])
        total = total + normal.log_prob(z).sum(dim=(1, 2, 3))
    return total


# --------------------------------------------------------------------------------------------------------------------
# Invertibility and densities.


@pytest.mark.parametrize(
    "config",
    [
        dict(sample_size=8, in_channels=1, num_levels=2, flow_depth=2),
        dict(sample_size=(8, 16), in_channels=3, num_levels=3, flow_depth=2),
        dict(sample_size=16, in_channels=2, num_levels=1, flow_depth=3),
        dict(sample_size=8, in_channels=3, num_levels=2, flow_depth=2, coupling="additive"),
    ],
)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_decode_inverts_encode(config, dtype, atol):
    model = make_model(dtype=dtype, **config)
    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    x = 0.5 + 2.0 * torch.randn(5, model.config.in_channels, h, w, dtype=dtype)
    with torch.no_grad():
        latents = model.encode(x)
        assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes
        assert all(z.dtype == dtype for z in latents)
        torch.testing.assert_close(model.decode(latents), x, atol=atol, rtol=0)
        # and the other way round
        z = [torch.randn_like(z) for z in latents]
        for a, b in zip(model.encode(model.decode(z)), z):
            torch.testing.assert_close(a, b, atol=10 * atol, rtol=0)


def test_default_size_float32_roundtrip_does_not_drift():
    """The paper's size (L=3, K=16, 48 flow steps) in float32: the inverse stays close to the input."""
    torch.manual_seed(0)
    model = FlowPriorModel(hidden_channels=32)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        model.log_prob(x)
        randomize(model, scale=0.02)
        error = (model.decode(model.encode(x)) - x).abs().max().item()
    assert error < 2e-5, error


def test_squeeze_channel_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    y = squeeze2d(x)
    assert y.shape == (2, 12, 2, 3)
    for c in range(3):
        for dh in range(2):
            for dw in range(2):
                torch.testing.assert_close(y[:, 4 * c + 2 * dh + dw], x[:, c, dh::2, dw::2])
    torch.testing.assert_close(unsqueeze2d(y), x)


def _flat_latents(model, x):
    return torch.cat([z.reshape(-1) for z in model.encode(x.unsqueeze(0))])


@pytest.mark.parametrize(
    "config",
    [
        dict(sample_size=4, in_channels=1, num_levels=2, flow_depth=2),
        dict(sample_size=8, in_channels=1, num_levels=3, flow_depth=2, coupling="additive"),
    ],
)
def test_log_det_and_log_prob_match_autograd_jacobian(config):
    model = make_model(dtype=torch.float64, **config)
    size = model.config.sample_size
    x = 0.5 + torch.randn(model.config.in_channels, size, size, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: _flat_latents(model, v), x, vectorize=True)
    jacobian = jacobian.reshape(x.numel(), x.numel())
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    with torch.no_grad():
        out = model(x.unsqueeze(0))
        logdet = out.log_prob - base_log_density(model, out.latents)
        torch.testing.assert_close(logdet, log_abs_det.reshape(1), atol=1e-6, rtol=0)
        # log p(x) by the change of variables, independently of the model's own bookkeeping
        independent = base_log_density(model, model.encode(x.unsqueeze(0))) + log_abs_det
        torch.testing.assert_close(model.log_prob(x.unsqueeze(0)), independent, atol=1e-6, rtol=0)


def test_forward_output_and_bits_per_dim():
    model = make_model()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
        assert isinstance(out, FlowPriorOutput)
        assert out.log_prob.shape == (3,) and len(out.latents) == 2
        latents, log_prob = model(x, return_dict=False)
        torch.testing.assert_close(log_prob, out.log_prob)
        dim = 3 * 8 * 8
        bpd = model.bits_per_dim(x)
        torch.testing.assert_close(bpd, -out.log_prob / (dim * math.log(2)))
        torch.testing.assert_close(model.bits_per_dim(x, num_bits=8), bpd + 8)
        torch.testing.assert_close(model.bits_per_dim(x, num_bits=8, data_range=(-1.0, 1.0)), bpd + 7)


def test_gradients_flow_through_log_prob_and_sample():
    model = make_model()
    model.train()
    loss = -model.log_prob(torch.rand(4, 3, 8, 8)).mean() + model.sample(2).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.levels[0].conv_lower.grad.abs().sum() > 0
    assert model.levels[1].coupling_conv1_weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# Sampling.


def test_sample_is_reproducible_and_on_model_device_and_dtype():
    model = make_model(dtype=torch.float64)
    with torch.no_grad():
        a = model.sample(4, generator=torch.Generator().manual_seed(1))
        b = model.sample(4, generator=torch.Generator().manual_seed(1))
        c = model.sample(4, generator=torch.Generator().manual_seed(2))
        assert a.shape == (4, 3, 8, 8) and a.dtype == torch.float64 and a.device == model.device
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not torch.allclose(a, c)
        # a list of generators: one per sample
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        pair = model.sample(2, generator=gens)
        single = model.sample(1, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(pair[1:], single)
        # given noise
        noise = torch.randn(3, 3, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(
            model.sample(3, noise=noise, temperature=0.7), model.decode(model.noise_to_latents(noise, 0.7))
        )


def test_temperature_scales_latents():
    model = make_model()
    with torch.no_grad():
        for level in model.levels:
            level.prior_loc.zero_()
        noise = torch.randn(2, 3, 8, 8)
        at_one = model.noise_to_latents(noise, 1.0)
        for tau in (0.5, 2.0):
            for a, b in zip(model.noise_to_latents(noise, tau), at_one):
                torch.testing.assert_close(a, tau * b)
        # noise is cut in order into the latent sizes
        flat = noise.reshape(2, -1)
        sizes = [c * h * w for c, h, w in model.latent_shapes]
        mean, log_sigma = model.levels[1].prior_parameters()
        expected = flat[:, sizes[0] :].reshape(2, *model.latent_shapes[1]) * log_sigma.exp()
        torch.testing.assert_close(at_one[1], expected)


def test_latents_to_noise_inverts_noise_to_latents():
    model = make_model(dtype=torch.float64)
    with torch.no_grad():
        for size in ((8, 8), (8, 16)):
            noise = torch.randn(3, 3, *size, dtype=torch.float64)
            for tau in (1.0, 0.7):
                latents = model.noise_to_latents(noise, tau)
                back = model.latents_to_noise(latents, tau)
                assert back.shape == noise.shape and back.dtype == torch.float64
                torch.testing.assert_close(back, noise, rtol=1e-12, atol=1e-12)
                for a, b in zip(model.noise_to_latents(back, tau), latents):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # data -> encode -> latents_to_noise is the noise that sample(noise=...) maps back to the data
        x = 0.5 + 2.0 * torch.randn(2, 3, 8, 8, dtype=torch.float64)
        noise = model.latents_to_noise(model.encode(x))
        torch.testing.assert_close(model.sample(2, noise=noise), x, rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match="temperature"):
            model.latents_to_noise(model.encode(x), temperature=0)
        with pytest.raises(ValueError, match="latents"):
            model.latents_to_noise(model.encode(x)[:-1])
        with pytest.raises(ValueError, match=r"latents`\[1\]"):
            model.latents_to_noise([z if i != 1 else z[:1] for i, z in enumerate(model.encode(x))])


# --------------------------------------------------------------------------------------------------------------------
# ActNorm.


def test_actnorm_initialisation_normalises_and_happens_once():
    torch.manual_seed(0)
    model = FlowPriorModel(**SMALL)
    assert not any(level.actnorm_initialized.any() for level in model.levels)
    x = 3.0 + 2.0 * torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        model.log_prob(x)
        assert all(level.actnorm_initialized.all() for level in model.levels)
        # the first ActNorm of every level normalises its input over batch, height and width
        h = x
        for i in reversed(range(model.config.num_levels)):
            level = model.levels[i]
            h = squeeze2d(h)
            k = level.flow_depth - 1
            y = (h - level.actnorm_shift[k][None, :, None, None]) * torch.exp(-level.actnorm_log_scale[k])[
                None, :, None, None
            ]
            torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(h.shape[1]), atol=1e-5, rtol=0)
            torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(h.shape[1]), atol=1e-4, rtol=0)
            h, _ = level.density(h, h.new_zeros(h.shape[0]))
            h = h[:, : h.shape[1] // 2]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.log_prob(torch.randn(4, 3, 8, 8))
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_decode_before_initialisation_uses_identity_actnorm():
    torch.manual_seed(0)
    model = FlowPriorModel(**SMALL)
    with torch.no_grad():
        x = model.sample(2)
        assert torch.isfinite(x).all()
        assert not any(level.actnorm_initialized.any() for level in model.levels)
        assert all(torch.count_nonzero(level.actnorm_log_scale) == 0 for level in model.levels)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_save_and_reload_keeps_actnorm(tmp_path, low_cpu_mem_usage):
    model = make_model()
    model.save_pretrained(tmp_path)
    reloaded = FlowPriorModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    for key in ("sample_size", "in_channels", "num_levels", "flow_depth", "hidden_channels", "coupling"):
        assert reloaded.config[key] == model.config[key], key
    state = {k: v.clone() for k, v in reloaded.state_dict().items()}
    new_data = 10.0 + 5.0 * torch.randn(4, 3, 8, 8)  # would give very different ActNorm statistics
    with torch.no_grad():
        torch.testing.assert_close(reloaded.log_prob(new_data), model.log_prob(new_data), atol=0, rtol=0)
        torch.testing.assert_close(
            reloaded.sample(2, noise=torch.ones(2, 3, 8, 8)), model.sample(2, noise=torch.ones(2, 3, 8, 8))
        )
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_state_dict_resets_initialisation_state():
    model = make_model()
    fresh = FlowPriorModel(**SMALL)
    model.load_state_dict(fresh.state_dict())  # flags False again: the next batch initialises
    with torch.no_grad():
        model.log_prob(torch.randn(4, 3, 8, 8))
    assert all(level.actnorm_initialized.all() for level in model.levels)


def _distributed_worker(rank, world_size, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = FlowPriorModel(sample_size=4, in_channels=1, num_levels=1, flow_depth=2, hidden_channels=4)
        batch = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(10 + rank)) * (1 + rank) + rank
        with torch.no_grad():
            model.log_prob(batch)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_actnorm_initialisation_is_reduced_across_ranks(tmp_path):
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # the statistics are those of the two ranks' batches together
    batches = [
        torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(10 + r)) * (1 + r) + r for r in range(2)
    ]
    squeezed = squeeze2d(torch.cat(batches))
    torch.testing.assert_close(states[0]["levels.0.actnorm_shift"][1], squeezed.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(
        states[0]["levels.0.actnorm_log_scale"][1], torch.log(squeezed.std(dim=(0, 2, 3)) + 1e-6), atol=1e-5, rtol=0
    )


# --------------------------------------------------------------------------------------------------------------------
# The cache of W^-1.


def test_inverse_cache_never_serves_stale_weights():
    model = make_model(dtype=torch.float64).eval()
    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        first = model.sample(2, noise=noise)
        cached = model._sampling_cache
        assert cached is not None
        torch.testing.assert_close(model.sample(2, noise=noise), first, atol=0, rtol=0)
        assert model._sampling_cache is cached  # reused while nothing changed

        # an in-place update (what an optimiser step does)
        model.levels[0].conv_lower.add_(0.1 * torch.tril(torch.ones_like(model.levels[0].conv_lower), -1))
        second = model.sample(2, noise=noise)
        assert not torch.allclose(second, first)
        torch.testing.assert_close(model.decode(model.encode(second)), second, atol=1e-10, rtol=0)

        # a write through `.data`, which does not bump `_version` (diffusers' EMAModel.copy_to does this)
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters())
        model.levels[1].actnorm_log_scale.data.add_(0.2)
        model.levels[1].conv_log_s.data.add_(0.1)
        third = model.sample(2, noise=noise)
        assert not torch.allclose(third, second)
        ema.copy_to(model.parameters())
        torch.testing.assert_close(model.sample(2, noise=noise), second, atol=1e-12, rtol=0)

    # with gradients the cache is bypassed and the inverse is differentiable
    model.zero_grad()
    model.sample(2, noise=noise).sum().backward()
    assert model.levels[0].conv_upper.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(sample_size=12, num_levels=3), "sample_size"),
        (dict(sample_size=0), "sample_size"),
        (dict(sample_size=(8, 8, 8)), "sample_size"),
        (dict(in_channels=0), "in_channels"),
        (dict(num_levels=0), "num_levels"),
        (dict(flow_depth=-1), "flow_depth"),
        (dict(hidden_channels=0), "hidden_channels"),
        (dict(flow_depth=2.0), "flow_depth"),
        (dict(sample_size=float("inf")), "sample_size"),  # every setting is an integer: none can be non-finite
        (dict(hidden_channels=float("nan")), "hidden_channels"),
        (dict(coupling="spline"), "coupling"),
    ],
)
def test_bad_config_raises(config, match):
    with pytest.raises(ValueError, match=match):
        FlowPriorModel(**{**SMALL, **config})


def test_bad_coupling_names_allowed_values():
    with pytest.raises(ValueError, match="affine.*additive"):
        FlowPriorModel(**{**SMALL, "coupling": "spline"})


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 3, 10, 8), "num_levels"),  # 10 not divisible by 2 ** 2
        ((2, 3, 8, 6), "num_levels"),
        ((2, 1, 8, 8), "in_channels"),
        ((3, 8, 8), "sample"),
        ((1, 2, 3, 8, 8), "sample"),
    ],
)
def test_bad_sample_raises_before_computing(shape, match):
    model = FlowPriorModel(**SMALL)
    x = torch.randn(*shape)
    for fn in (model.log_prob, model.encode, model, model.bits_per_dim):
        with pytest.raises(ValueError, match=match):
            fn(x)
    assert not any(level.actnorm_initialized.any() for level in model.levels)


def test_bad_sampling_arguments_raise():
    model = make_model()
    for tau in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            model.sample(2, temperature=tau)
        with pytest.raises(ValueError, match="temperature"):
            model.noise_to_latents(torch.randn(2, 3, 8, 8), temperature=tau)
    for batch_size in (0, -3, 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            model.sample(batch_size)
    with pytest.raises(ValueError, match="noise"):
        model.sample(2, noise=torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="noise"):
        model.noise_to_latents(torch.randn(2, 3, 7, 8))
    with pytest.raises(ValueError, match="generator"):
        model.sample(3, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="num_bits"):
        model.bits_per_dim(torch.rand(2, 3, 8, 8), num_bits=0)
    with pytest.raises(ValueError, match="data_range"):
        model.bits_per_dim(torch.rand(2, 3, 8, 8), num_bits=8, data_range=(1.0, 0.0))
    latents = model.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        model.decode(latents[:1])
    with pytest.raises(ValueError, match="latents"):
        model.decode([latents[0], latents[1][:, :1]])
