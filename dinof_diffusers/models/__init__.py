from .flow_prior import FlowPriorModel, FlowPriorOutput
from .gaussian_prior import GaussianPriorModel, GaussianPriorOutput, ImageMoments, estimate_image_moments

__all__ = [
    "FlowPriorModel",
    "FlowPriorOutput",
    "GaussianPriorModel",
    "GaussianPriorOutput",
    "ImageMoments",
    "estimate_image_moments",
]
