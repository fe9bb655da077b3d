from .likelihood import DiNofLikelihoodOutput
from .pipeline_dinof import DiNofPipeline, DiNofPipelineOutput

__all__ = ["DiNofLikelihoodOutput", "DiNofPipeline", "DiNofPipelineOutput"]
