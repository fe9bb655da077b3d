"""The flow-gain diagnostic: the exact mixture marginal against brute force, the headroom estimates on Gaussian data
(where the true headroom is zero), paired differences and standard errors."""

import math

import pytest
import torch

from dinof_diffusers import DiNofScheduler, FlowPriorModel, GaussianPriorModel
from dinof_diffusers.evaluation.flow_gain import (
    diffuse_images,
    flow_gain,
    images_to_tensor,
    mean_estimate,
    mixture_log_prob,
)
from dinof_diffusers.models.gaussian_prior import estimate_image_moments


def test_mixture_log_prob_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    components = torch.rand(23, 1, 2, 3, generator=generator, dtype=torch.float64)
    points = torch.rand(11, 1, 2, 3, generator=generator, dtype=torch.float64)
    for mean_coeff, std in ((1.0, 0.3), (0.8, 0.02)):
        got = mixture_log_prob(
            points, components, mean_coeff, std, point_batch_size=4, component_batch_size=5, show_progress=False
        )
        expected = []
        for x in points.reshape(11, -1):
            terms = [
                torch.distributions.Normal(mean_coeff * c, std).log_prob(x).sum() for c in components.reshape(23, -1)
            ]
            expected.append(torch.logsumexp(torch.stack(terms), 0) - math.log(23))
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-12, atol=1e-9)


def test_paired_estimate_averages_draws_per_image():
    values = torch.tensor([[1.0, 2.0, 6.0], [3.0, 4.0, 2.0]], dtype=torch.float64)  # (draws, images)
    estimate = mean_estimate(values, num_dims=4)
    per_image = torch.tensor([2.0, 3.0, 4.0])
    assert estimate.nats == pytest.approx(3.0) and estimate.num_images == 3 and estimate.num_draws == 2
    assert estimate.nats_se == pytest.approx(per_image.std().item() / math.sqrt(3))
    assert estimate.bits_per_dim == pytest.approx(3.0 / (4 * math.log(2)))
    assert estimate.bits_per_dim_se == pytest.approx(estimate.nats_se / (4 * math.log(2)))


def test_diffused_points_are_seeded_draws_of_the_marginal():
    scheduler = DiNofScheduler(sde_type="vp", prediction_type="epsilon", flow_start=0.3)
    images = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    points = diffuse_images(images, scheduler, num_draws=3, seed=7)
    assert points.shape == (3, 5, 1, 2, 2) and points.dtype == torch.float64
    assert torch.equal(points, diffuse_images(images, scheduler, num_draws=3, seed=7))
    noise = torch.randn(3, 5, 1, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a, s = scheduler.marginal_mean_std(torch.tensor([0.3], dtype=torch.float64))
    torch.testing.assert_close(points, a * images + s * noise)
    uint8 = torch.randint(0, 256, (2, 3, 3), dtype=torch.uint8).numpy()
    torch.testing.assert_close(
        images_to_tensor(uint8, (-1.0, 1.0))[:, 0], torch.from_numpy(uint8).double() / 127.5 - 1.0
    )


def gaussian_data(seed, n, dim=4):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * 0.1
    mean = torch.full((dim,), 0.5, dtype=torch.float64)

    def draw(count):
        return (mean + torch.randn(count, dim, generator=generator, dtype=torch.float64) @ mixing.T).reshape(
            count, 1, 2, dim // 2
        )

    return draw(n), draw(n), mean, mixing @ mixing.T


def test_headroom_brackets_zero_on_gaussian_data():
    """Gaussian data: x(t) is Gaussian and the true headroom is 0. The training-set estimate is the KL divergence of
    the training images' mixture from its moment-matched Gaussian (>= 0), the held-out one a kernel density estimate's
    loss (<= 0); at N = 1,000 and t = 0.35 both are within a few standard errors of 0, with the right signs (measured
    over ten data seeds: +0.9 to +5.0 and -1.0 to -4.6 standard errors)."""
    train, test, mean, cov = gaussian_data(seed=3, n=1000)
    scheduler = DiNofScheduler(sde_type="ve", sigma_max=10.0, flow_start=0.35)
    moments = estimate_image_moments(train, show_progress=False)  # Gaussian data overshoots [0, 1]: no fit's check
    diagonal = GaussianPriorModel.from_moments(moments, scheduler, covariance="diagonal", dtype=torch.float64)
    result = flow_gain(train, test, scheduler, flow_prior=diagonal, num_draws=4, seed=0, show_progress=False)
    up, low = result.headroom_train, result.headroom_test
    assert 0 < up.nats < 6 * up.nats_se and 0 > low.nats > -6 * low.nats_se
    assert up.num_images == 1000 and up.num_draws == 4 and result.num_dims == 4

    # the fitted Gaussian recovers x(t)'s true moments a mu and a^2 Sigma + s^2 I (within sampling error)
    a, s = result.mean_coeff, result.std
    full = GaussianPriorModel.from_moments(moments, scheduler, dtype=torch.float64)
    true_cov = a * a * cov + s * s * torch.eye(4, dtype=torch.float64)
    std = torch.sqrt(torch.diagonal(true_cov))
    assert ((full.mean - a * mean).abs() / std).max() < 4.0 / math.sqrt(1000)
    se = torch.sqrt((torch.outer(std**2, std**2) + true_cov**2) / 1000)
    assert ((full.covariance_matrix() - true_cov).abs() / se).max() < 5.0

    # every difference is paired over the same points: here the "flow" is the diagonal Gaussian
    test_diffs = result.differences["test"]
    gain = test_diffs["gaussian_full - flow"]
    assert gain.nats == pytest.approx(-test_diffs["gaussian_diagonal - gaussian_full"].nats, rel=1e-9)
    nll = result.nll["test"]
    assert gain.bits_per_dim == pytest.approx(nll["gaussian_full"].bits_per_dim - nll["flow"].bits_per_dim)
    assert result.flow_share == pytest.approx(gain.nats / up.nats)
    assert set(result.to_dict()) >= {"nll", "differences", "headroom_train", "headroom_test", "flow_share"}

    with pytest.raises(ValueError, match="`t`"):
        flow_gain(train, test, scheduler, t=0.2, flow_prior=diagonal, show_progress=False)


def test_with_a_flow_prior():
    train, test, _, _ = gaussian_data(seed=0, n=60)
    scheduler = DiNofScheduler(sde_type="ve", sigma_max=10.0, flow_start=0.6)
    torch.manual_seed(0)
    flow = FlowPriorModel(sample_size=2, in_channels=1, num_levels=1, flow_depth=1, hidden_channels=4).eval()
    result = flow_gain(train, test, scheduler, flow_prior=flow, num_draws=2, show_progress=False)
    x = diffuse_images(test, scheduler, num_draws=2, seed=1)  # the held-out points use seed + 1
    with torch.no_grad():
        expected = -flow.log_prob(x.reshape(-1, 1, 2, 2).float()).double().mean()
    assert result.nll["test"]["flow"].nats == pytest.approx(expected.item(), rel=1e-5)
    assert math.isfinite(result.flow_share) and math.isfinite(result.flow_share_se)
