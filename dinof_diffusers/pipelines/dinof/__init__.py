from .pipeline_dinof import DiNofPipeline, DiNofPipelineOutput

__all__ = ["DiNofPipeline", "DiNofPipelineOutput"]
