"""DiNof: diffusion models with deterministic normalizing flow priors, for Hugging Face diffusers."""

__version__ = "0.1.0"

# Imported eagerly: diffusers resolves the custom component classes named in a saved model_index.json
# ("dinof_diffusers.schedulers.scheduling_dinof", ...) only from modules already in sys.modules.
from .pipelines.dinof.pipeline_dinof import DiNofPipeline, DiNofPipelineOutput  # noqa: E402
from .schedulers.scheduling_dinof import DiNofScheduler, DiNofSchedulerOutput  # noqa: E402

__all__ = ["DiNofPipeline", "DiNofPipelineOutput", "DiNofScheduler", "DiNofSchedulerOutput"]
