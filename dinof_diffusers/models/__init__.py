from .flow_prior import FlowPriorModel, FlowPriorOutput
from .gaussian_prior import GaussianPriorModel, GaussianPriorOutput, ImageMoments, estimate_image_moments
from .ncsnpp import NCSNppModel, NCSNppOutput
from .ncsnpp_configs import NCSNPP_PUBLISHED_CONFIGS, NCSNPP_PUBLISHED_PARAMETER_COUNTS

__all__ = [
    "FlowPriorModel",
    "FlowPriorOutput",
    "GaussianPriorModel",
    "GaussianPriorOutput",
    "ImageMoments",
    "estimate_image_moments",
    "NCSNPP_PUBLISHED_CONFIGS",
    "NCSNPP_PUBLISHED_PARAMETER_COUNTS",
    "NCSNppModel",
    "NCSNppOutput",
]
