from .published_configs import DINOF_PUBLISHED_SCHEDULER_CONFIGS
from .scheduling_dinof import DiNofScheduler, DiNofSchedulerOutput

__all__ = ["DINOF_PUBLISHED_SCHEDULER_CONFIGS", "DiNofScheduler", "DiNofSchedulerOutput"]
