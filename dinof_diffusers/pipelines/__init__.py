from .dinof import DiNofPipeline, DiNofPipelineOutput

__all__ = ["DiNofPipeline", "DiNofPipelineOutput"]
