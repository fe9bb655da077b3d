"""The training data: the data set of a run, its transforms, and reproducible augmentation."""

from typing import Callable, Dict, Tuple

import torch
from datasets import Dataset, load_dataset
from torchvision import transforms

from ..data import load_digits_dataset
from .run_config import RunConfig, TrainingError


def load_training_dataset(run: RunConfig) -> Tuple[Dataset, str]:
    """The training images as a `datasets.Dataset`, and a description of them for the model card."""
    if run.dataset_name is not None:
        dataset = load_dataset(run.dataset_name, run.dataset_config_name, cache_dir=run.cache_dir, split="train")
        description = run.dataset_name + (f" ({run.dataset_config_name})" if run.dataset_config_name else "")
    elif run.train_data_dir is not None:
        dataset = load_dataset("imagefolder", data_dir=run.train_data_dir, cache_dir=run.cache_dir, split="train")
        description = f"the images in {run.train_data_dir}"
    else:
        dataset = load_digits_dataset(resolution=run.resolution)
        description = "the scikit-learn handwritten digits (embedded, 1797 images)"
    if run.image_column not in dataset.column_names:
        raise TrainingError(
            f"--image_column {run.image_column!r} is not a column of the data set: {dataset.column_names}."
        )
    return dataset, description


def image_transforms(run: RunConfig, data_range: Tuple[float, float], augment: bool = True) -> Callable:
    """PIL image -> tensor (C, H, W) in `data_range`, with C = `run.num_channels`."""
    low, high = data_range
    steps = [
        transforms.Resize(run.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(run.resolution)
        if run.center_crop or not augment
        else transforms.RandomCrop(run.resolution),
    ]
    if run.random_flip and augment:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Lambda(lambda x: x * (high - low) + low)]
    compose = transforms.Compose(steps)
    mode = "L" if run.num_channels == 1 else "RGB"
    return lambda image: compose(image.convert(mode))


def reference_images(dataset: Dataset, run: RunConfig, data_range: Tuple[float, float]) -> torch.Tensor:
    """The first `run.num_sample_images` images (repeated if needed), without augmentation: (B, C, H, W).

    Their x(t*) starts the sample grids of a run without a flow prior.
    """
    plain = image_transforms(run, data_range, augment=False)
    return torch.stack([plain(dataset[i % len(dataset)][run.image_column]) for i in range(run.num_sample_images)])


class TrainingImages(torch.utils.data.Dataset):
    """The training images of a `datasets.Dataset`, transformed, with reproducible random augmentation.

    The random transforms of an image (crop, flip) draw from the global torch RNG inside `torch.random.fork_rng`,
    seeded from (seed, epoch, index): the augmentation of each image is fixed by its position in the run, and loading
    data never touches the training RNG. This matters for resuming: `accelerate`'s data loader fetches one batch ahead,
    so augmentation drawn from the training RNG would be drawn before a checkpoint in the original run and after it in
    the resumed one.

    Args:
        dataset (`datasets.Dataset`): the data.
        image_column (`str`): the column holding PIL images.
        transform (`Callable`): PIL image -> tensor; may use the global torch RNG.
        seed (`int`): the run's seed.
    """

    def __init__(self, dataset, image_column: str, transform, seed: int):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch; the next data loader iterator (and its workers) augment with it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image = self.dataset[int(index)][self.image_column]
        seed = hash((self.seed, self.epoch, int(index))) % (2**63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return {"input": self.transform(image)}
