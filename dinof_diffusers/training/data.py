"""The training data: the data set of a run, its transforms, reproducible augmentation, and unreadable images.

An image that does not decode (a truncated or corrupt file) is named in a warning and replaced by the next readable
image of the data set, so that batches keep their size and their order (which a resumed run repeats); with
`--strict_images` the run checks every image before training and stops with the list of those that do not decode.
"""

import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
from datasets import Dataset, load_dataset
from datasets import Image as ImageFeature
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

from ..data import load_digits_dataset
from .run_config import RunConfig, TrainingError

logger = logging.getLogger(__name__)

# What PIL raises for a truncated, corrupt or unknown image file (UnidentifiedImageError is an OSError).
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# The metadata files with which `datasets`' imagefolder selects (and labels) the images of a folder.
IMAGEFOLDER_METADATA = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def load_training_dataset(run: RunConfig) -> Tuple[Dataset, str]:
    """The training images as a `datasets.Dataset`, and a description of them for the model card.

    For `--train_data_dir` it logs how many image files the folder holds and how many the data set uses (a
    metadata.csv lists the images it uses; the others are left out), with a warning when they differ.
    """
    if run.dataset_name is not None:
        dataset = load_dataset(run.dataset_name, run.dataset_config_name, cache_dir=run.cache_dir, split="train")
        description = run.dataset_name + (f" ({run.dataset_config_name})" if run.dataset_config_name else "")
    elif run.train_data_dir is not None:
        dataset = load_dataset("imagefolder", data_dir=run.train_data_dir, cache_dir=run.cache_dir, split="train")
        description = f"the images in {run.train_data_dir}"
        _log_imagefolder_size(run.train_data_dir, len(dataset))
    else:
        dataset = load_digits_dataset(resolution=run.resolution, split=run.digits_split)
        part = (
            "all of them"
            if run.digits_split == "all"
            else f"the {run.digits_split} part of the fixed 1,500 / 297 split"
        )
        description = f"the scikit-learn handwritten digits (embedded; {len(dataset)} images, {part})"
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


def _log_imagefolder_size(folder: str, num_used: int) -> None:
    """Logs how many image files `folder` holds and how many of them the data set uses."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    found = sum(os.path.splitext(name)[1].lower() in extensions for _, _, names in os.walk(folder) for name in names)
    metadata = [name for name in IMAGEFOLDER_METADATA if os.path.isfile(os.path.join(folder, name))]
    message = f"Found {found} image files in {folder}; the data set uses {num_used} of them"
    if found == num_used:
        logger.info("%s.", message)
    else:
        reason = f"the images listed in its {metadata[0]}" if metadata else "its train split"
        logger.warning("%s (%s); the other %d are not used.", message, reason, found - num_used)


class ImageReader:
    """The images of a data set column, read one by one; an unreadable one is replaced by the next readable one.

    Each unreadable image is named (its file, or its row) in one warning per process.

    Args:
        dataset (`datasets.Dataset`): the data.
        image_column (`str`): the column holding the images.
    """

    def __init__(self, dataset: Dataset, image_column: str):
        self.dataset = dataset
        self.image_column = image_column
        self.unreadable = set()
        self._undecoded = None

    def name(self, index: int) -> str:
        """The file of image `index` (for an image feature that has one), else its row."""
        if self._undecoded is None:  # the same rows with the file paths instead of the decoded images
            is_image = isinstance(self.dataset.features.get(self.image_column), ImageFeature)
            undecoded = ImageFeature(decode=False)
            self._undecoded = self.dataset.cast_column(self.image_column, undecoded) if is_image else False
        path = self._undecoded and (self._undecoded[int(index)][self.image_column] or {}).get("path")
        return path or f"row {index} of the data set"

    def read(self, index: int) -> Tuple[Optional[Image.Image], Optional[str]]:
        """`(image, None)`, or `(None, why it cannot be read)`."""
        try:
            image = self.dataset[int(index)][self.image_column]
            if isinstance(image, Image.Image):
                image.load()  # a lazily opened file decodes here
            return image, None
        except IMAGE_DECODE_ERRORS as error:
            return None, f"{type(error).__name__}: {error}"

    def __call__(self, index: int) -> Image.Image:
        """Image `index`, or the next readable one (cyclically) if it cannot be read."""
        for offset in range(len(self.dataset)):
            candidate = (int(index) + offset) % len(self.dataset)
            image, problem = self.read(candidate)
            if image is not None:
                return image
            if candidate not in self.unreadable:
                self.unreadable.add(candidate)
                logger.warning(
                    "Skipping the unreadable image %s (%s): the next readable image takes its place.",
                    self.name(candidate),
                    problem,
                )
        raise TrainingError(f"None of the {len(self.dataset)} images of the data set can be read.")

    def find_unreadable(self) -> List[str]:
        """Reads every image (with a progress bar); returns "<file>: <problem>" for those that cannot be read."""
        problems = []
        for index in tqdm(range(len(self.dataset)), desc="Checking the images", unit="image"):
            problem = self.read(index)[1]
            if problem is not None:
                problems.append(f"{self.name(index)}: {problem}")
        return problems


def check_images(dataset: Dataset, image_column: str) -> None:
    """`--strict_images`: raises `TrainingError` listing every image of the data set that cannot be read."""
    problems = ImageReader(dataset, image_column).find_unreadable()
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise TrainingError(
            f"{len(problems)} of the {len(dataset)} training images cannot be read (--strict_images):\n  "
            + "\n  ".join(shown)
        )


def reference_images(read: ImageReader, run: RunConfig, data_range: Tuple[float, float]) -> torch.Tensor:
    """The first `run.num_sample_images` images of `read` (repeated if needed), without augmentation: (B, C, H, W).

    Their x(t*) starts the sample grids of a run without a flow prior.
    """
    plain = image_transforms(run, data_range, augment=False)
    return torch.stack([plain(read(i % len(read.dataset))) for i in range(run.num_sample_images)])


class TrainingImages(torch.utils.data.Dataset):
    """The training images of a `datasets.Dataset`, transformed, with reproducible random augmentation.

    The random transforms of an image (crop, flip) draw from the global torch RNG inside `torch.random.fork_rng`,
    seeded from (seed, epoch, index): the augmentation of each image is fixed by its position in the run, and loading
    data never touches the training RNG. This matters for resuming: `accelerate`'s data loader fetches one batch ahead,
    so augmentation drawn from the training RNG would be drawn before a checkpoint in the original run and after it in
    the resumed one.

    Args:
        dataset (`datasets.Dataset`): the data.
        image_column (`str`): the column holding PIL images (see `ImageReader` for unreadable ones).
        transform (`Callable`): PIL image -> tensor; may use the global torch RNG.
        seed (`int`): the run's seed.
    """

    def __init__(self, dataset, image_column: str, transform, seed: int):
        self.dataset = dataset
        self.read = ImageReader(dataset, image_column)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch; the next data loader iterator (and its workers) augment with it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image = self.read(index)  # an unreadable image: the next readable one, named in a warning
        seed = hash((self.seed, self.epoch, int(index))) % (2**63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return {"input": self.transform(image)}
