"""The natural-image patches data set: crops of scikit-learn's sample photos, train and test regions disjoint."""

import numpy as np
import pytest
from sklearn.datasets import load_sample_images

from dinof_diffusers.data import load_sample_patches, sample_patch_positions, sample_patches


def test_patches_are_seeded_crops_from_disjoint_regions():
    photos = load_sample_images().images
    width = photos[0].shape[1]
    train = sample_patch_positions("train", size=16, num_patches=5000)
    test = sample_patch_positions("test", size=16, num_patches=1000)
    assert train.shape == (5000, 3) and test.shape == (1000, 3)
    # training windows end left of column 480 (three quarters of 640), test windows start at or right of it
    assert train[:, 2].min() >= 0 and (train[:, 2] + 16).max() <= 3 * width // 4
    assert test[:, 2].min() >= 3 * width // 4 and (test[:, 2] + 16).max() <= width
    assert (train[:, 1] + 16).max() <= photos[0].shape[0] and (test[:, 1] + 16).max() <= photos[0].shape[0]
    # both photos, alternately; positions spread over the whole region
    assert np.array_equal(train[:, 0], np.arange(5000) % 2)
    assert train[:, 2].min() < 20 and train[:, 2].max() > 3 * width // 4 - 36
    # the pixels are the photos' own
    patches = sample_patches("test", size=16, num_patches=1000)
    assert patches.shape == (1000, 16, 16, 3) and patches.dtype == np.uint8
    photo, top, left = test[7]
    assert np.array_equal(patches[7], photos[photo][top : top + 16, left : left + 16])
    # deterministic; another seed, another draw; the defaults are 20,000 / 2,000
    assert np.array_equal(sample_patches("test", num_patches=1000), patches)
    assert not np.array_equal(sample_patches("test", num_patches=1000, seed=1), patches)
    assert len(sample_patch_positions("train")) == 20000 and len(sample_patch_positions("test")) == 2000


def test_dataset_has_an_image_column():
    dataset = load_sample_patches("train", size=8, num_patches=10)
    assert len(dataset) == 10 and dataset.column_names == ["image"]
    image = dataset[3]["image"]
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.array_equal(np.asarray(image), sample_patches("train", size=8, num_patches=10)[3])


@pytest.mark.parametrize(
    "kwargs,name",
    [({"split": "valid"}, "split"), ({"split": "test", "size": 161}, "size"), ({"num_patches": 0}, "num_patches")],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        sample_patches(**kwargs)
