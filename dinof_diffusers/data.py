"""The embedded default data set: scikit-learn's handwritten digits as a `datasets.Dataset`.

scikit-learn ships the 1,797 8x8 digits (UCI optical recognition of handwritten digits, 16 grey levels) inside its
wheel, so this data set needs no download and runs through exactly the code path a Hub data set takes.

A fixed split keeps held-out digits for evaluation (likelihoods, sample quality): a permutation of the 1,797 indices
by `numpy.random.default_rng(DIGITS_SPLIT_SEED)`, whose first 1,500 are "train" and the other 297 "test"; each split
keeps the data set's order. Every caller gets the same split.
"""

from functools import lru_cache
from typing import Optional

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from .validation import check_choice, check_positive_int

DIGITS_NUM_IMAGES = 1797
DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_TEST = DIGITS_NUM_IMAGES - DIGITS_NUM_TRAIN
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("all", "train", "test")


@lru_cache(maxsize=1)
def _sklearn_digits():
    """scikit-learn's digits, read from its wheel once per process (images and labels are asked for together)."""
    from sklearn.datasets import load_digits

    return load_digits()


def digits_split_indices(split: str = "all") -> np.ndarray:
    """The indices of a split of the digits, increasing.

    Args:
        split: "all" (1,797), "train" (1,500) or "test" (297); train and test are disjoint and cover all.

    Returns:
        `np.ndarray` of int64.
    """
    check_choice(split, "split", DIGITS_SPLITS)
    if split == "all":
        return np.arange(DIGITS_NUM_IMAGES, dtype=np.int64)
    permutation = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(DIGITS_NUM_IMAGES)
    chosen = permutation[:DIGITS_NUM_TRAIN] if split == "train" else permutation[DIGITS_NUM_TRAIN:]
    return np.sort(chosen).astype(np.int64)


def digits_images(resolution: Optional[int] = None, split: str = "all") -> np.ndarray:
    """The digits as uint8 greyscale arrays.

    Args:
        resolution: side length to resize to (bilinear); `None` keeps the native 8x8.
        split: "all" (default), "train" or "test" (see `digits_split_indices`).

    Returns:
        `np.ndarray` of shape (num_images, resolution, resolution), dtype uint8, ink bright on a dark background.
    """
    check_positive_int(resolution, "resolution", allow_none=True)
    indices = digits_split_indices(split)
    # 16 grey levels (0..16) mapped onto the full 8-bit range.
    images = np.round(_sklearn_digits().images[indices] * (255.0 / 16.0)).astype(np.uint8)
    if resolution is None or resolution == images.shape[-1]:
        return images
    resized = [
        np.asarray(PILImage.fromarray(image).resize((resolution, resolution), PILImage.BILINEAR)) for image in images
    ]
    return np.stack(resized)


def digits_labels(split: str = "all") -> np.ndarray:
    """The class (0-9) of each digit of a split, shape (num_images,), int64."""
    return _sklearn_digits().target[digits_split_indices(split)].astype(np.int64)


def load_digits_dataset(resolution: Optional[int] = None, split: str = "all") -> Dataset:
    """The digits as a `datasets.Dataset` with an `image` (PIL, mode "L") and a `label` column.

    Args:
        resolution: side length of the stored images; `None` keeps the native 8x8 (the training transforms
            resize anyway, like for any other data set).
        split: "all" (default), "train" or "test" (see `digits_split_indices`).
    """
    features = Features({"image": Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])})
    images = digits_images(resolution, split=split)
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(image) for image in images], "label": digits_labels(split).tolist()},
        features=features,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Natural-image patches: random crops of scikit-learn's two sample photographs (also shipped in its wheel).
# ----------------------------------------------------------------------------------------------------------------------

PATCH_SPLITS = ("train", "test")
# Training crops lie in the left three quarters of each photograph, test crops in the right quarter: disjoint pixels.
PATCH_TRAIN_FRACTION = 0.75
DEFAULT_NUM_PATCHES = {"train": 20000, "test": 2000}


@lru_cache(maxsize=1)
def _sklearn_sample_photos() -> tuple:
    """scikit-learn's sample photographs (china.jpg, flower.jpg), uint8 (427, 640, 3) each."""
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def _check_patch_args(split: str, size: int, num_patches: Optional[int]) -> int:
    check_choice(split, "split", PATCH_SPLITS)
    height, width = _sklearn_sample_photos()[0].shape[:2]
    region_width = int(width * PATCH_TRAIN_FRACTION) if split == "train" else width - int(width * PATCH_TRAIN_FRACTION)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(height, region_width):
        raise ValueError(f"`size` must be an integer in [1, {min(height, region_width)}], got {size!r}.")
    check_positive_int(num_patches, "num_patches", allow_none=True)
    return DEFAULT_NUM_PATCHES[split] if num_patches is None else num_patches


def sample_patch_positions(
    split: str = "train", size: int = 16, num_patches: Optional[int] = None, seed: int = 0
) -> np.ndarray:
    """Where `sample_patches` crops: one row (photo, top, left) per patch.

    Patch k comes from photo k % 2; its top-left corner is uniform over the positions whose size x size window lies
    inside the split's region: columns [0, 480) of the 640-wide photos for "train", [480, 640) for "test". The
    positions depend only on (split, size, num_patches, seed), through a NumPy generator seeded with (seed, split).

    Returns:
        `np.ndarray` of shape (num_patches, 3), int64.
    """
    num_patches = _check_patch_args(split, size, num_patches)
    height, width = _sklearn_sample_photos()[0].shape[:2]
    boundary = int(width * PATCH_TRAIN_FRACTION)
    left_low, left_high = (0, boundary - size) if split == "train" else (boundary, width - size)
    rng = np.random.default_rng([seed, PATCH_SPLITS.index(split)])
    photo = np.arange(num_patches) % 2
    top = rng.integers(0, height - size, size=num_patches, endpoint=True)
    left = rng.integers(left_low, left_high, size=num_patches, endpoint=True)
    return np.stack([photo, top, left], axis=1).astype(np.int64)


def sample_patches(
    split: str = "train", size: int = 16, num_patches: Optional[int] = None, seed: int = 0
) -> np.ndarray:
    """Random size x size RGB crops of scikit-learn's two sample photographs, disjoint between the splits.

    Args:
        split: "train" (crops from the left three quarters of both photos) or "test" (from the right quarter).
        size: the side length of the square patches.
        num_patches: default 20,000 for "train" and 2,000 for "test".
        seed: the seed of the crop positions (see `sample_patch_positions`).

    Returns:
        `np.ndarray` of shape (num_patches, size, size, 3), uint8.
    """
    photos = _sklearn_sample_photos()
    positions = sample_patch_positions(split, size, num_patches, seed)
    return np.stack([photos[p][top : top + size, left : left + size] for p, top, left in positions])


def load_sample_patches(
    split: str = "train", size: int = 16, num_patches: Optional[int] = None, seed: int = 0
) -> Dataset:
    """Natural-image patches (`sample_patches`) as a `datasets.Dataset` with an `image` column (PIL, mode "RGB").

    A second natural-image data set that ships with scikit-learn (nothing is downloaded), for experiments where the
    digits are too simple: 20,000 training and 2,000 test 16x16 patches by default.
    """
    features = Features({"image": Image()})
    patches = sample_patches(split, size, num_patches, seed)
    return Dataset.from_dict({"image": [PILImage.fromarray(patch) for patch in patches]}, features=features)
