"""Sample grids and atomic image writes, shared by the training, sampling and evaluation scripts."""

import os
from typing import List, Optional, Union

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from .file_utils import atomic_write_path
from .validation import check_positive_int


def image_grid(
    images: Union[torch.Tensor, np.ndarray, List[Image.Image]], nrow: Optional[int] = None, scale: int = 1
) -> Image.Image:
    """Tiles a batch of images into one picture.

    Args:
        images: a tensor (B, C, H, W) or array (B, H, W, C) with values in [0, 1], or a list of PIL images.
        nrow: images per row; defaults to the square root of the batch size, rounded up.
        scale: integer nearest-neighbour upscaling, so that small samples (8x8 digits) are visible.

    Returns:
        The grid as a PIL image (mode "L" for one channel, "RGB" otherwise).
    """
    if isinstance(images, list):
        images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        if images.ndim == 3:
            images = images[..., None]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    if images.ndim != 4:
        raise ValueError(f"`images` must be a batch of shape (B, C, H, W), got shape {tuple(images.shape)}.")
    check_positive_int(scale, "scale")
    batch_size, channels = images.shape[:2]
    nrow = nrow or int(np.ceil(np.sqrt(batch_size)))
    images = images.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=0.5)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def save_image_atomically(image: Image.Image, path: Union[str, os.PathLike]) -> None:
    """Writes `image` to `path` through a temporary file in the same folder, so no reader sees half a file."""
    with atomic_write_path(path) as temporary_path:
        image.save(temporary_path)


def save_figure_atomically(figure, path: Union[str, os.PathLike], dpi: int = 110) -> None:
    """Writes a matplotlib figure as a PNG to `path` atomically (as `save_image_atomically`), then closes it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write_path(path) as temporary_path:
            figure.savefig(temporary_path, dpi=dpi, format="png")
    finally:
        plt.close(figure)
