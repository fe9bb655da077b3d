from .dinof import DiNofLikelihoodOutput, DiNofPipeline, DiNofPipelineOutput

__all__ = ["DiNofLikelihoodOutput", "DiNofPipeline", "DiNofPipelineOutput"]
