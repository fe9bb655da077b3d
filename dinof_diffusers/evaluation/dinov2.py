"""DINOv2 features for torch-fidelity through `transformers` (FD-DINOv2 beside Inception FID).

Stein et al. (NeurIPS 2023, "Exposing flaws of generative model evaluation metrics") showed that the Fréchet distance
in DINOv2 ViT-L/14 features tracks human judgement far better than Inception FID; EDM2 reports it as FD-DINOv2.
torch-fidelity 0.4 registers `dinov2-vit-l-14`, which loads through `torch.hub` from GitHub: no Hub cache, no offline
use. This module registers the same network under its own names, loaded with `transformers.Dinov2Model` from the
Hugging Face Hub (cached; offline once cached, `HF_HUB_OFFLINE=1`), or from a local folder:

    name                  default model id
    dinov2-hf-vit-s-14    facebook/dinov2-small   (384 features)
    dinov2-hf-vit-b-14    facebook/dinov2-base    (768)
    dinov2-hf-vit-l-14    facebook/dinov2-large   (1024; the FD-DINOv2 of Stein et al. and EDM2)
    dinov2-hf-vit-g-14    facebook/dinov2-giant   (1536)

Another model id or folder is passed as torch-fidelity's own `feature_extractor_weights_path` keyword (e.g.
`compute_metrics(..., feature_extractor="dinov2-hf-vit-l-14", feature_extractor_weights_path="path/or/id")`).

The feature (key "dinov2") is the class token after the final LayerNorm (`Dinov2Model`'s `pooler_output`), which is
what the torch.hub model returns (its head is the identity) and what Stein et al.'s dgm-eval and torch-fidelity use.
Preprocessing follows Stein et al.: images resized to 224 x 224 with bicubic interpolation (antialiased, the PIL
kernel, which their `torchvision.transforms.Resize` applies to PIL images), then ImageNet normalisation. torch-fidelity's
own `dinov2-vit-*` extractors resize with TensorFlow-1 style bilinear interpolation instead, so their numbers differ
slightly from these. Greyscale inputs are repeated to three channels (torch-fidelity's image folders already arrive
as RGB).

Note: torch-fidelity caches the features of *registered* inputs (e.g. "cifar10-train") under the extractor's name;
after changing `feature_extractor_weights_path` for the same name, clear that cache (`cache_root`).
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torch_fidelity.helpers import vassert

from .feature_extractor import Uint8ImageFeatureExtractor

DINOV2_MODEL_IDS = {
    "dinov2-hf-vit-s-14": "facebook/dinov2-small",
    "dinov2-hf-vit-b-14": "facebook/dinov2-base",
    "dinov2-hf-vit-l-14": "facebook/dinov2-large",
    "dinov2-hf-vit-g-14": "facebook/dinov2-giant",
}
DINOV2_FEATURE_EXTRACTOR_NAME = "dinov2-hf-vit-l-14"
DINOV2_FEATURE_KEY = "dinov2"
DINOV2_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_dinov2(images: torch.Tensor, size: int = DINOV2_INPUT_SIZE) -> torch.Tensor:
    """uint8 images of any size to DINOv2's input: RGB, size x size (bicubic, antialiased), ImageNet-normalised.

    Args:
        images: `torch.Tensor` uint8 of shape (B, C, H, W), C in {1, 3, 4} (grey is repeated, alpha dropped).
        size: the side length (224 for the published FD-DINOv2).

    Returns:
        `torch.Tensor` of shape (B, 3, size, size), float32.
    """
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
        raise ValueError("`images` must be a uint8 tensor of shape (B, C, H, W).")
    channels = images.shape[1]
    if channels not in (1, 3, 4):
        raise ValueError(f"`images` must have 1, 3 or 4 channels, got {channels}.")
    x = images[:, :3].float() if channels != 1 else images.float().expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 255.0)  # bicubic overshoots; PIL clips to the 8-bit range
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def load_dinov2_model(model_id: str = DINOV2_MODEL_IDS[DINOV2_FEATURE_EXTRACTOR_NAME]):
    """`transformers.Dinov2Model.from_pretrained(model_id)` (a Hub id, cached, or a local folder), in eval mode."""
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(model_id).eval()


class FeatureExtractorDinov2HF(Uint8ImageFeatureExtractor):
    """torch-fidelity feature extractor on `transformers.Dinov2Model` (registered as "dinov2-hf-vit-{s,b,l,g}-14").

    Args:
        name: the registered name (it picks the default model id).
        features_list: requested features, `("dinov2",)`.
        feature_extractor_weights_path: a Hub model id or a local folder saved with `save_pretrained`; default the
            name's model id (see the module docstring).
        feature_extractor_internal_dtype: `"float32"` (default) or `"float64"`.
        **kwargs: the remaining `torch_fidelity.calculate_metrics` keywords (ignored).
    """

    FEATURE_LAYERS = {metric: DINOV2_FEATURE_KEY for metric in ("isc", "fid", "kid", "prc")}

    def __init__(
        self, name, features_list, feature_extractor_weights_path=None, feature_extractor_internal_dtype=None, **kwargs
    ):
        super().__init__(name, features_list)
        vassert(name in DINOV2_MODEL_IDS, f"Model {name} not found; available models = {list(DINOV2_MODEL_IDS)}")
        vassert(
            feature_extractor_internal_dtype in (None, "float32", "float64"),
            "`feature_extractor_internal_dtype` must be 'float32' or 'float64'",
        )
        self.internal_dtype = torch.float64 if feature_extractor_internal_dtype == "float64" else torch.float32
        self.model = load_dinov2_model(feature_extractor_weights_path or DINOV2_MODEL_IDS[name]).to(
            self.internal_dtype
        )
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """`"dinov2"`: the class token after the final LayerNorm, (B, hidden_size)."""
        pixels = preprocess_dinov2(x).to(self.internal_dtype)
        return {DINOV2_FEATURE_KEY: self.model(pixel_values=pixels).pooler_output}

    @staticmethod
    def get_provided_features_list():
        return (DINOV2_FEATURE_KEY,)


def register_dinov2_feature_extractors() -> str:
    """Registers `FeatureExtractorDinov2HF` under every name of `DINOV2_MODEL_IDS` (idempotent); returns the ViT-L/14
    name, "dinov2-hf-vit-l-14"."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    for name in DINOV2_MODEL_IDS:
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, FeatureExtractorDinov2HF)
    return DINOV2_FEATURE_EXTRACTOR_NAME
