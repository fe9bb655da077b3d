"""DiNof: diffusion models with deterministic normalizing flow priors, for Hugging Face diffusers.

Importing the package also registers its public classes on the `diffusers` module (`diffusers.DiNofPipeline`, ...),
where `DiffusionPipeline.from_pretrained` looks pipeline classes up: after `import dinof_diffusers`, a folder saved by
`DiNofPipeline.save_pretrained` loads with `DiffusionPipeline.from_pretrained(folder)` as well. Names diffusers itself
defines are never replaced.
"""

__version__ = "0.1.0"

import diffusers  # noqa: E402

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

for _public_class in (DiNofPipeline, DiNofScheduler, FlowPriorModel, GaussianPriorModel, NCSNppModel):
    _registered = getattr(diffusers, _public_class.__name__, None)
    if _registered is None or _registered.__module__.startswith(f"{__name__}."):
        setattr(diffusers, _public_class.__name__, _public_class)
