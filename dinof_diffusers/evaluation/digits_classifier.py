"""An offline feature extractor for torch-fidelity: a small CNN trained on the embedded scikit-learn digits.

torch-fidelity's default feature extractor (Inception-v3) downloads its weights, which is impossible offline and
meaningless on 8x8 greyscale digits anyway. This module trains (once per machine, in seconds on a CPU) a small
convolutional classifier on the embedded digits (`dinof_diffusers.data.digits_images`), caches its weights on disk,
and registers it with torch-fidelity as the feature extractor `"dinof-digits"`. Every torch-fidelity metric then runs
through torch-fidelity's own code path with this network in place of Inception:

- FID, KID and precision/recall use the penultimate-layer activations (feature key `"128"`, the analogue of
  Inception's `"2048"` pool features).
- The Inception score (ISC) uses the classifier's logits without the bias (feature key `"logits_unbiased"`, as for
  Inception). We call it the **classifier-confidence score**: exp(E_x KL(p(y|x) || p(y))) with p(y|x) the digit
  classifier's softmax. It lies in [1, 10]; it is high when every sample is classified confidently *and* the ten
  digits are equally represented.

Inputs of any resolution with 1, 3 (or 4) channels are accepted: they are converted to grey (ITU-R 601 luma, as
PIL's `convert("L")`) and resized (bilinear, antialiased) to the classifier's 16x16 input resolution. The classifier
is trained on the digits at 8x8, 16x16 and 32x32 so that its features hardly depend on the resolution the samples
come in. It is trained on the "train" part of the digits' fixed 1,500 / 297 split (`dinof_diffusers.data.
digits_split_indices`), the images DiNof models are trained on by default; its held-out accuracy is measured on the
297 "test" digits.

The cache directory is `$DINOF_CACHE_DIR` if set, else `$XDG_CACHE_HOME/dinof_diffusers` (by default
`~/.cache/dinof_diffusers`).
"""

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import digits_images, digits_labels, digits_split_indices
from ..file_utils import atomic_write_path
from .feature_extractor import Uint8ImageFeatureExtractor

DIGITS_FEATURE_EXTRACTOR_NAME = "dinof-digits"
# Feature keys provided to torch-fidelity: penultimate activations, logits without / with the bias.
DIGITS_FEATURE_KEY = "128"
DIGITS_FEATURES = (DIGITS_FEATURE_KEY, "logits_unbiased", "logits")

CLASSIFIER_RESOLUTION = 16
# Resolutions the training images are rendered at before the classifier's own resize.
TRAINING_RESOLUTIONS = (8, 16, 32)
# Bump when the architecture, the training recipe or the training images change: it is part of the cache file name.
# Version 2: trained on the 1,500 "train" digits of the data set's split (version 1: its own 80 / 20 split).
CLASSIFIER_VERSION = 2

_LUMA = (0.299, 0.587, 0.114)


def default_cache_dir() -> Path:
    """The directory for cached weights and reference images (see the module docstring)."""
    if os.environ.get("DINOF_CACHE_DIR"):
        return Path(os.environ["DINOF_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "dinof_diffusers"


def default_classifier_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where the trained classifier's weights are cached."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"digits_classifier_v{CLASSIFIER_VERSION}_r{CLASSIFIER_RESOLUTION}.pt"


def preprocess_images(images: torch.Tensor, resolution: int = CLASSIFIER_RESOLUTION) -> torch.Tensor:
    """Brings images of any size and channel count to the classifier's input.

    Args:
        images: `torch.Tensor` of shape (B, C, H, W) with C in {1, 3, 4} (an alpha channel is dropped); uint8 in
            [0, 255] or floating point in [0, 1].
        resolution: the side length to resize to.

    Returns:
        `torch.Tensor` of shape (B, 1, resolution, resolution), float32, in [-1, 1].
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"Expected images of shape (B, C, H, W) with C in (1, 3, 4), got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    else:
        images = images.float()
    if images.shape[1] == 4:
        images = images[:, :3]
    if images.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        images = (images * weights).sum(dim=1, keepdim=True)
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return images.clamp(0.0, 1.0) * 2.0 - 1.0


class DigitsClassifier(nn.Module):
    """A small CNN for 16x16 greyscale digits.

    conv3x3(1 -> 16) -> ReLU -> maxpool -> conv3x3(16 -> 32) -> ReLU -> maxpool -> linear(512 -> 128) -> ReLU
    (the features) -> linear(128 -> 10) (the logits).

    Args:
        resolution: input side length (a multiple of 4).
        feature_dim: width of the penultimate layer.
        num_classes: number of classes.
    """

    def __init__(self, resolution: int = CLASSIFIER_RESOLUTION, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        if resolution % 4 != 0:
            raise ValueError(f"`resolution` must be a multiple of 4, got {resolution}.")
        self.resolution = resolution
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * (resolution // 4) ** 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        # Multiplies the features handed to torch-fidelity so that their mean square is 1 on the training images
        # (set after training): KID's polynomial kernel then sees inputs of the same order as Inception's.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations.

        Args:
            x: `torch.Tensor` (B, 1, R, R), the output of `preprocess_images`.

        Returns:
            `torch.Tensor` (B, feature_dim).
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of preprocessed images x (B, 1, R, R)."""
        return self.fc2(self.features(x))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted classes (B,) of raw images (B, C, H, W) (uint8 or float in [0, 1], any size)."""
        predictions = []
        for start in range(0, images.shape[0], batch_size):
            batch = preprocess_images(images[start : start + batch_size], self.resolution)
            predictions.append(self(batch.to(self.fc2.weight.device)).argmax(dim=1).cpu())
        return torch.cat(predictions)


def _digits_tensor(resolution: int) -> torch.Tensor:
    """The digits rendered at `resolution` (PIL bilinear, like `digits_images`), as uint8 (N, 1, r, r)."""
    return torch.from_numpy(digits_images(resolution)).unsqueeze(1)


def evaluate_digits_classifier(
    model: DigitsClassifier, indices: Optional[np.ndarray] = None, resolution: int = CLASSIFIER_RESOLUTION
) -> float:
    """Accuracy of `model` on the digits at `indices` (default: the "test" split), rendered at `resolution`."""
    if indices is None:
        indices = digits_split_indices("test")
    images = _digits_tensor(resolution)[torch.from_numpy(indices)]
    labels = torch.from_numpy(digits_labels()[indices])
    was_training = model.training
    model.eval()
    accuracy = (model.predict(images) == labels).float().mean().item()
    model.train(was_training)
    return accuracy


def train_digits_classifier(
    seed: int = 0, num_epochs: int = 8, batch_size: int = 64, learning_rate: float = 3e-3
) -> Tuple[DigitsClassifier, Dict[str, float]]:
    """Trains the classifier on the "train" split of the digits (1,500 images), deterministically.

    The global RNG state and the number of torch threads are restored afterwards; training runs on one CPU thread
    with a private `torch.Generator`, so the weights do not depend on the machine's thread count.

    Args:
        seed: seed of the initialisation, the shuffling and the augmentation.
        num_epochs: passes over the training images (the split, rendered at every `TRAINING_RESOLUTIONS`).
        batch_size: minibatch size.
        learning_rate: Adam's learning rate (cosine-annealed to zero).

    Returns:
        `(model, info)`: the classifier in eval mode, and a dict with `held_out_accuracy` (on the 297 "test" digits,
        the minimum over `TRAINING_RESOLUTIONS`), `held_out_accuracy_r{r}` per resolution, `train_seconds`.
    """
    start = time.perf_counter()
    train_indices, held_out_indices = digits_split_indices("train"), digits_split_indices("test")
    labels = torch.from_numpy(digits_labels())
    # Every training image goes through the same preprocessing the feature extractor applies.
    inputs = torch.cat(
        [preprocess_images(_digits_tensor(r)[torch.from_numpy(train_indices)]) for r in TRAINING_RESOLUTIONS]
    )
    targets = labels[torch.from_numpy(train_indices)].repeat(len(TRAINING_RESOLUTIONS))

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        steps_per_epoch = -(-len(inputs) // batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_epochs * steps_per_epoch)
        model.train()
        for _ in range(num_epochs):
            permutation = torch.randperm(len(inputs), generator=generator)
            for step in range(steps_per_epoch):
                batch_indices = permutation[step * batch_size : (step + 1) * batch_size]
                batch = _random_shift(inputs[batch_indices], generator)
                loss = F.cross_entropy(model(batch), targets[batch_indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        model.eval()
        with torch.no_grad():
            model.feature_scale.fill_(model.features(inputs).pow(2).mean().rsqrt().item())
        info = {
            f"held_out_accuracy_r{r}": evaluate_digits_classifier(model, held_out_indices, r)
            for r in TRAINING_RESOLUTIONS
        }
    finally:
        torch.set_num_threads(num_threads)
    info["held_out_accuracy"] = min(info.values())
    info["train_seconds"] = time.perf_counter() - start
    model.requires_grad_(False)
    return model, info


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translates each image (B, 1, R, R) by up to `max_shift` pixels per axis, filling with the background (-1)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_write_path(path) as temporary_path:
        torch.save(obj, temporary_path)


def load_digits_classifier(
    path: Optional[Union[str, os.PathLike]] = None, train_if_missing: bool = True, verbose: bool = False
) -> DigitsClassifier:
    """Loads the cached classifier, training and caching it first if needed.

    Args:
        path: the weights file; default `default_classifier_path()`. Written atomically (temp file + rename), so
            concurrent processes at worst both train and one of the identical results wins.
        train_if_missing: train when the file does not exist (or cannot be read); otherwise raise.
        verbose: print the training summary.

    Returns:
        `DigitsClassifier` in eval mode, without gradients.
    """
    path = Path(path) if path is not None else default_classifier_path()
    if path.exists():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            model = DigitsClassifier(resolution=int(checkpoint["resolution"]))
            model.load_state_dict(checkpoint["state_dict"])
            model.eval().requires_grad_(False)
            return model
        except Exception as error:  # a corrupt or foreign file: retrain below
            if not train_if_missing:
                raise
            print(f"Could not load the digits classifier from {path} ({error}); retraining it.")
    elif not train_if_missing:
        raise FileNotFoundError(f"No digits classifier at {path}.")
    model, info = train_digits_classifier()
    checkpoint = {
        "resolution": model.resolution,
        "state_dict": model.state_dict(),
        "info": json.dumps(info),
        "version": CLASSIFIER_VERSION,
    }
    _atomic_torch_save(checkpoint, path)
    if verbose:
        print(f"Trained the digits classifier in {info['train_seconds']:.1f} s: {info}; cached at {path}.")
    return model


def digits_classifier_info(path: Optional[Union[str, os.PathLike]] = None) -> Dict[str, float]:
    """The training summary stored with the cached classifier (training it first if needed)."""
    path = Path(path) if path is not None else default_classifier_path()
    load_digits_classifier(path)
    return json.loads(torch.load(path, map_location="cpu", weights_only=True)["info"])


class FeatureExtractorDigits(Uint8ImageFeatureExtractor):
    """torch-fidelity feature extractor built on `DigitsClassifier` (registered as `"dinof-digits"`).

    Args:
        name: the registered name.
        features_list: requested features, a subset of `("128", "logits_unbiased", "logits")`.
        feature_extractor_weights_path: the classifier's weights file (torch-fidelity's own keyword); `None` uses the
            cache (training on first use).
        **kwargs: the remaining `torch_fidelity.calculate_metrics` keywords (ignored).
    """

    FEATURE_LAYERS = {
        "isc": "logits_unbiased",
        "fid": DIGITS_FEATURE_KEY,
        "kid": DIGITS_FEATURE_KEY,
        "prc": DIGITS_FEATURE_KEY,
    }
    DUMMY_INPUT_SIZE = CLASSIFIER_RESOLUTION

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digits_classifier(feature_extractor_weights_path, verbose=bool(kwargs.get("verbose")))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """`"128"`: the penultimate features (B, 128); `"logits_unbiased"`, `"logits"`: (B, 10)."""
        features = self.classifier.features(preprocess_images(x, self.classifier.resolution))
        fc = self.classifier.fc2
        return {
            DIGITS_FEATURE_KEY: features * self.classifier.feature_scale,
            "logits_unbiased": F.linear(features, fc.weight),
            "logits": fc(features),
        }

    @staticmethod
    def get_provided_features_list():
        return DIGITS_FEATURES


def register_digits_feature_extractor() -> str:
    """Registers `FeatureExtractorDigits` with torch-fidelity (idempotent) and returns its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DIGITS_FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_FEATURE_EXTRACTOR_NAME, FeatureExtractorDigits)
    return DIGITS_FEATURE_EXTRACTOR_NAME
