from .flow_prior import FlowPriorModel, FlowPriorOutput

__all__ = ["FlowPriorModel", "FlowPriorOutput"]
