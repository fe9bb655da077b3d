"""Sample quality with bootstrap intervals: a Fréchet distance in a fixed feature space, and a memorisation check.

For comparing priors at equal NFE on small data sets, where a few hundred samples a row is all a CPU affords and a
single number hides how much it moves from one draw of samples to the next:

- the Fréchet distance (FD) between Gaussians fitted to the features of the samples and of the training images
  (torch-fidelity's `fid_features_to_statistics` / `fid_statistics_to_metric`), in a fixed feature space: `"pca"`,
  the top principal components of the training images' pixels (offline, for any data; a linear space, so it sees
  the first two moments of pixel projections only), or any torch-fidelity feature extractor, e.g. `"dinof-digits"`
  (the digit classifier's features: FID on the digits) or `"dinov2-hf-vit-l-14"` (FD-DINOv2);
- the nearest-neighbour distance: the RMS pixel distance (over [0, 1] pixel values) of every sample to its nearest
  training image, against the same for the held-out images. A model that reproduces its training images puts its
  samples nearer to them than held-out images are: `nn_ratio` = mean sample distance / mean held-out distance falls
  well below 1;
- bootstrap intervals over the samples (resampled with replacement, the reference fixed): value +- 1.96 bootstrap
  standard deviations. Not the percentile interval: an FD of a resample (about 63 % distinct samples) is biased
  upwards, so that its percentiles often miss the FD of the samples themselves; the spread is what carries over.
- paired differences: the rows of a study share their start noise and generator sample by sample (sample i of every
  prior comes from the same seeds), so the difference of two rows' FDs is bootstrapped with the same resampled
  indices for both, which cancels much of the noise they share.
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..validation import check_int, check_positive_int
from .digits_classifier import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    default_classifier_path,
    register_digits_feature_extractor,
)
from .dinov2 import register_dinov2_feature_extractors

PCA_FEATURES = "pca"
DEFAULT_PCA_COMPONENTS = 32
DEFAULT_BOOTSTRAP = 200
Z_95 = 1.959963984540054  # the 97.5 % normal quantile


def uint8_images_to_tensor(images) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) as a uint8 tensor (N, C, H, W)."""
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[0] == 0:
        raise ValueError(
            f"`images` must be uint8 (N, H, W) or (N, H, W, C) with N >= 1, got {array.dtype} {array.shape}."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.unsqueeze(1) if array.ndim == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, D) in [0, 1]."""
    return images.reshape(images.shape[0], -1).float() / 255.0


@dataclass
class Interval:
    """A statistic of the samples and its bootstrap interval.

    Args:
        value (`float`): the statistic of all samples.
        low (`float`), high (`float`): value -+ 1.96 `se` (NaN without resamples).
        se (`float`): the standard deviation of the statistic over the bootstrap resamples.
    """

    value: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    se: float = float("nan")

    @classmethod
    def from_resamples(cls, value: float, resampled) -> "Interval":
        if len(resampled) < 2:
            return cls(value)
        se = float(np.std(resampled, ddof=1))
        return cls(value, value - Z_95 * se, value + Z_95 * se, se)


@dataclass
class SampleQuality:
    """The quality of one set of samples (see the module docstring).

    Args:
        fd (`Interval`): the Fréchet distance to the training images in `features`.
        nn_distance (`Interval`): the mean RMS pixel distance of a sample to its nearest training image.
        nn_ratio (`Interval`): `nn_distance` / the held-out images' mean nearest-training-image distance.
        features (`str`): the feature space.
        num_samples (`int`), num_bootstrap (`int`): the samples and the bootstrap resamples.
    """

    fd: Interval = None
    nn_distance: Interval = None
    nn_ratio: Interval = None
    features: str = ""
    num_samples: int = 0
    num_bootstrap: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class QualityReference:
    """What samples are compared with: the training images' features and pixels, and the held-out images'
    nearest-neighbour distances. Built once per data set, then `score` any number of sample sets.

    Args:
        train_images: uint8 training images (N, H, W) or (N, H, W, C): the FD's reference and the neighbours.
        test_images: uint8 held-out images of the same shape: the nearest-neighbour baseline.
        features (`str`, defaults to `"pca"`): `"pca"` or a torch-fidelity feature extractor name.
        num_components (`int`, defaults to 32): principal components for `"pca"`.
        batch_size (`int`, defaults to 256): feature extraction and neighbour search batch.
        extractor_kwargs: further keywords of the torch-fidelity extractor (e.g. `feature_extractor_weights_path`).
    """

    def __init__(
        self,
        train_images,
        test_images,
        features: str = PCA_FEATURES,
        num_components: int = DEFAULT_PCA_COMPONENTS,
        batch_size: int = 256,
        **extractor_kwargs,
    ):
        check_positive_int(num_components, "num_components")
        check_positive_int(batch_size, "batch_size")
        self.train = uint8_images_to_tensor(train_images)
        test = uint8_images_to_tensor(test_images)
        if self.train.shape[1:] != test.shape[1:] or self.train.shape[0] < 2:
            raise ValueError(
                f"`train_images` (at least 2) and `test_images` must share a shape, got {tuple(self.train.shape)} and "
                f"{tuple(test.shape)}."
            )
        self.features, self.batch_size = features, batch_size
        self._train_pixels = _pixels(self.train)
        if features == PCA_FEATURES:
            pixels = self._train_pixels.double()
            self._pca_mean = pixels.mean(0)
            # the principal axes: eigenvectors of the pixel covariance (fixed by the training images)
            eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(pixels.T))
            k = min(num_components, pixels.shape[1])
            self._pca_basis = eigenvectors[:, eigenvalues.argsort(descending=True)[:k]]
        else:
            self._extractor = _feature_extractor(features, **extractor_kwargs)
        self.train_features = self.extract(self.train)
        self.reference_statistics = _statistics(self.train_features)
        self.test_nn = self.nearest_neighbour_distances(test)

    def extract(self, images: torch.Tensor) -> np.ndarray:
        """Features (N, F), float64, of uint8 images (N, C, H, W)."""
        if self.features == PCA_FEATURES:
            return ((_pixels(images).double() - self._pca_mean) @ self._pca_basis).numpy()
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                (features,) = self._extractor(images[start : start + self.batch_size])
                out.append(features.double())
        return torch.cat(out).numpy()

    def nearest_neighbour_distances(self, images: torch.Tensor) -> np.ndarray:
        """The RMS pixel distance (pixels in [0, 1]) of each uint8 image (N, C, H, W) to its nearest training image."""
        pixels, train = _pixels(images), self._train_pixels
        train_sq = (train * train).sum(1)
        out = []
        for start in range(0, pixels.shape[0], self.batch_size):
            block = pixels[start : start + self.batch_size]
            # the nearest one by |x|^2 + |y|^2 - 2 x.y, its distance then exactly (the expansion's cancellation would
            # blur an exact copy's 0 to ~1e-3)
            squared = (block * block).sum(1, keepdim=True) + train_sq - 2.0 * block @ train.T
            nearest = squared.argmin(1)
            exact = ((block.double() - train[nearest].double()) ** 2).mean(1)
            out.append(exact.sqrt())
        return torch.cat(out).numpy()

    def score(
        self, images, num_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0, show_progress: bool = False
    ) -> SampleQuality:
        """The FD and the nearest-neighbour distances of uint8 samples, with bootstrap intervals.

        Args:
            images: uint8 samples (N, H, W) or (N, H, W, C) (N >= 2), or a uint8 tensor (N, C, H, W).
            num_bootstrap (`int`, defaults to 200): resamples of the samples; 0 for no intervals.
            seed (`int`): seed of the resampling.
            show_progress (`bool`): a progress bar over the resamples.

        Returns:
            [`SampleQuality`].
        """
        images = self._check_samples(images)
        check_int(num_bootstrap, "num_bootstrap", minimum=0)
        features = self.extract(images)
        nn = self.nearest_neighbour_distances(images)
        nn_ratio = nn / float(self.test_nn.mean())
        resampled = {"fd": [], "nn": [], "ratio": []}
        for index in tqdm(
            self._resamples(len(images), num_bootstrap, seed), desc="bootstrap", disable=not show_progress
        ):
            resampled["fd"].append(self._fd(features[index]))
            resampled["nn"].append(float(nn[index].mean()))
            resampled["ratio"].append(float(nn_ratio[index].mean()))
        return SampleQuality(
            fd=Interval.from_resamples(self._fd(features), resampled["fd"]),
            nn_distance=Interval.from_resamples(float(nn.mean()), resampled["nn"]),
            nn_ratio=Interval.from_resamples(float(nn_ratio.mean()), resampled["ratio"]),
            features=self.features,
            num_samples=len(images),
            num_bootstrap=num_bootstrap,
        )

    def paired_fd_difference(
        self, images_a, images_b, num_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0
    ) -> Interval:
        """FD(a) - FD(b) of two equally long sets of samples paired by index, bootstrapped with shared indices.

        Args:
            images_a, images_b: uint8 samples as for `score`, sample i of each drawn from the same seeds.
            num_bootstrap (`int`), seed (`int`): as for `score`.

        Returns:
            [`Interval`]; negative values mean that `images_a` lie nearer the training images.
        """
        images_a, images_b = self._check_samples(images_a), self._check_samples(images_b)
        if len(images_a) != len(images_b):
            raise ValueError(f"Paired samples must be equally many, got {len(images_a)} and {len(images_b)}.")
        check_int(num_bootstrap, "num_bootstrap", minimum=0)
        a, b = self.extract(images_a), self.extract(images_b)
        resampled = [self._fd(a[i]) - self._fd(b[i]) for i in self._resamples(len(a), num_bootstrap, seed)]
        return Interval.from_resamples(self._fd(a) - self._fd(b), resampled)

    def _check_samples(self, images) -> torch.Tensor:
        images = images if isinstance(images, torch.Tensor) else uint8_images_to_tensor(images)
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != tuple(self.train.shape[1:]) or len(images) < 2:
            raise ValueError(
                f"`images` must be at least 2 uint8 images of shape {tuple(self.train.shape[1:])}, got "
                f"{images.dtype} {tuple(images.shape)}."
            )
        return images

    @staticmethod
    def _resamples(num_samples: int, num_bootstrap: int, seed: int):
        rng = np.random.default_rng(seed)
        return [rng.integers(0, num_samples, num_samples) for _ in range(num_bootstrap)]

    def _fd(self, features: np.ndarray) -> float:
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        return float(fid_statistics_to_metric(_statistics(features), self.reference_statistics, False)[KEY_METRIC_FID])


def _statistics(features: np.ndarray) -> Dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.asarray(features, dtype=np.float64)))


def _feature_extractor(name: str, **kwargs):
    """A torch-fidelity feature extractor (CPU) returning the features its FID uses."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    register_digits_feature_extractor()
    register_dinov2_feature_extractors()
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f"`features` must be {PCA_FEATURES!r} or a torch-fidelity feature extractor "
            f"({sorted(FEATURE_EXTRACTORS_REGISTRY)}), got {name!r}."
        )
    if name == DIGITS_FEATURE_EXTRACTOR_NAME:
        kwargs.setdefault("feature_extractor_weights_path", str(default_classifier_path()))
    layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    return create_feature_extractor(name, [layer], cuda=False, verbose=False, **kwargs)


def format_interval(interval: Optional[Dict[str, float]], digits: int = 2) -> str:
    """`value ± 1.96 se` of an `Interval` (as a dict, e.g. read from JSON); `-` for none."""
    if not interval or interval.get("value") is None or not math.isfinite(interval["value"]):
        return "-"
    text = f"{interval['value']:.{digits}f}"
    if math.isfinite(interval.get("se", float("nan"))):
        text += f" ± {Z_95 * interval['se']:.{digits}f}"
    return text
