"""DiNof: diffusion models with deterministic normalizing flow priors, for Hugging Face diffusers."""

__version__ = "0.1.0"

# Every component module is imported eagerly: diffusers resolves the custom component classes named in a saved
# model_index.json ("dinof_diffusers", "FlowPriorModel", ...) only from modules already in sys.modules.
from .models.flow_prior import FlowPriorModel, FlowPriorOutput  # noqa: E402
from .models.gaussian_prior import GaussianPriorModel, GaussianPriorOutput  # noqa: E402
from .models.ncsnpp import NCSNppModel, NCSNppOutput  # noqa: E402
from .pipelines.dinof.likelihood import DiNofLikelihoodOutput  # noqa: E402
from .pipelines.dinof.pipeline_dinof import DiNofPipeline, DiNofPipelineOutput  # noqa: E402
from .schedulers.scheduling_dinof import DiNofScheduler, DiNofSchedulerOutput  # noqa: E402

__all__ = [
    "DiNofLikelihoodOutput",
    "DiNofPipeline",
    "DiNofPipelineOutput",
    "DiNofScheduler",
    "DiNofSchedulerOutput",
    "FlowPriorModel",
    "FlowPriorOutput",
    "GaussianPriorModel",
    "GaussianPriorOutput",
    "NCSNppModel",
    "NCSNppOutput",
]
