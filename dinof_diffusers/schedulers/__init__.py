from .scheduling_dinof import DiNofScheduler, DiNofSchedulerOutput

__all__ = ["DiNofScheduler", "DiNofSchedulerOutput"]
