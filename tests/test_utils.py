import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinof_diffusers.data import load_digits_dataset
from dinof_diffusers.file_utils import atomic_write_path, write_json_atomically
from dinof_diffusers.image_utils import image_grid, save_image_atomically


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "result.json"
    write_json_atomically({"fid": 1.5}, target)
    with pytest.raises(RuntimeError):
        with atomic_write_path(target) as temporary_path:
            with open(temporary_path, "w") as handle:
                handle.write("{half a fi")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"fid": 1.5}
    assert sorted(os.listdir(tmp_path)) == ["result.json"]  # no temporary file left behind


def test_image_grid_tiles_and_upscales(tmp_path):
    images = torch.zeros(5, 1, 4, 4)
    images[2] = 1.0
    grid = image_grid(images, nrow=3, scale=2)
    # 3 columns and 2 rows of 8x8 tiles, with 2 pixels of padding around each.
    assert grid.mode == "L" and grid.size == (3 * 10 + 2, 2 * 10 + 2)
    array = np.asarray(grid)
    assert (array[2:10, 22:30] == 255).all() and (array[2:10, 2:10] == 0).all()
    assert image_grid(torch.rand(4, 3, 4, 4)).mode == "RGB"
    save_image_atomically(grid, tmp_path / "grid.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), array)
    with pytest.raises(ValueError, match="images"):
        image_grid(torch.rand(4, 4, 4))


def test_digits_dataset_is_the_embedded_data():
    dataset = load_digits_dataset(resolution=16)
    assert len(dataset) == 1797 and dataset.features["label"].num_classes == 10
    image = dataset[0]["image"]
    assert image.size == (16, 16) and image.mode == "L"
    assert max(np.asarray(load_digits_dataset()[0]["image"]).ravel()) <= 255
    with pytest.raises(ValueError, match="resolution"):
        load_digits_dataset(resolution=0)


def test_digits_split_is_fixed_disjoint_and_complete():
    from dinof_diffusers.data import digits_images, digits_labels, digits_split_indices

    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(train) == 1500 and len(test) == 297
    assert np.array_equal(np.union1d(train, test), np.arange(1797)) and len(np.intersect1d(train, test)) == 0
    # the split must never change between versions (train and evaluate share it): its checksum
    assert int(test.sum()) == int(digits_split_indices("test").sum()) == 256737
    assert np.array_equal(digits_images(split="test"), digits_images()[test])
    assert np.array_equal(digits_labels("train"), digits_labels()[train])
    assert len(load_digits_dataset(split="test")) == 297 and len(load_digits_dataset()) == 1797
    assert len(np.unique(digits_labels("test"))) == 10
    with pytest.raises(ValueError, match="split"):
        digits_images(split="validation")
