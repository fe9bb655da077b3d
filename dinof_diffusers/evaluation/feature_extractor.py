"""What the package's torch-fidelity feature extractors share: a batch of uint8 images in, float32 features out."""

from abc import abstractmethod
from typing import Dict, Tuple

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert


class Uint8ImageFeatureExtractor(FeatureExtractorBase):
    """A torch-fidelity feature extractor of uint8 images (B, C, H, W), C in {1, 3, 4}, any H and W.

    Subclasses compute every feature they provide in `features` and name, in `FEATURE_LAYERS`, the feature each
    metric uses; torch-fidelity gets the requested ones, in the order of `features_list`, as float32.
    """

    FEATURE_LAYERS: Dict[str, str] = {}  # metric ("isc", "fid", "kid", "prc") -> feature name
    DUMMY_INPUT_SIZE = 4  # the side length of `get_dummy_input_for_compile`

    @abstractmethod
    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every provided feature of a batch x (B, C, H, W) uint8, each (B, F)."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The requested features of a batch x (B, C, H, W) uint8: a tuple of float32 (B, F) tensors."""
        vassert(
            torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8"
        )
        features = self.features(x)
        return tuple(features[name].to(torch.float32) for name in self.features_list)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return cls.FEATURE_LAYERS[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @classmethod
    def get_dummy_input_for_compile(cls):
        return (torch.rand([1, 3, cls.DUMMY_INPUT_SIZE, cls.DUMMY_INPUT_SIZE]) * 255).to(torch.uint8)
