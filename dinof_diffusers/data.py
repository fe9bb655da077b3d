"""The embedded default data set: scikit-learn's handwritten digits as a `datasets.Dataset`.

scikit-learn ships the 1,797 8x8 digits (UCI optical recognition of handwritten digits, 16 grey levels) inside its
wheel, so this data set needs no download and runs through exactly the code path a Hub data set takes.
"""

from functools import lru_cache
from typing import Optional

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

DIGITS_NUM_IMAGES = 1797


@lru_cache(maxsize=1)
def _sklearn_digits():
    """scikit-learn's digits, read from its wheel once per process (images and labels are asked for together)."""
    from sklearn.datasets import load_digits

    return load_digits()


def digits_images(resolution: Optional[int] = None) -> np.ndarray:
    """The digits as uint8 greyscale arrays.

    Args:
        resolution: side length to resize to (bilinear); `None` keeps the native 8x8.

    Returns:
        `np.ndarray` of shape (1797, resolution, resolution), dtype uint8, ink bright on a dark background.
    """
    if resolution is not None and resolution < 1:
        raise ValueError(f"`resolution` must be a positive integer or None, got {resolution}.")
    # 16 grey levels (0..16) mapped onto the full 8-bit range.
    images = np.round(_sklearn_digits().images * (255.0 / 16.0)).astype(np.uint8)
    if resolution is None or resolution == images.shape[-1]:
        return images
    resized = [
        np.asarray(PILImage.fromarray(image).resize((resolution, resolution), PILImage.BILINEAR)) for image in images
    ]
    return np.stack(resized)


def digits_labels() -> np.ndarray:
    """The class (0-9) of each digit, shape (1797,), int64."""
    return _sklearn_digits().target.astype(np.int64)


def load_digits_dataset(resolution: Optional[int] = None) -> Dataset:
    """The digits as a `datasets.Dataset` with an `image` (PIL, mode "L") and a `label` column.

    Args:
        resolution: side length of the stored images; `None` keeps the native 8x8 (the training transforms
            resize anyway, like for any other data set).
    """
    features = Features({"image": Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])})
    images = digits_images(resolution)
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(image) for image in images], "label": digits_labels().tolist()},
        features=features,
    )
