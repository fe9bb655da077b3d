"""Published checkpoints -> diffusers folders.

- `flow`: the DiNof flow prior (normflows `MultiscaleFlow`) -> a `FlowPriorModel` folder; console script
  `dinof-convert-flow`.
- `checkpoint`: a whole DiNof checkpoint (score network + flow) or a score_sde_pytorch one (score network) -> a
  `DiNofPipeline` folder; console script `dinof-convert-checkpoint`.
"""

from .checkpoint import convert_checkpoint as convert_pipeline_checkpoint
from .checkpoint import infer_published_config
from .flow import apply_ema, convert_checkpoint, flow_state_dict_from_checkpoint, load_checkpoint

__all__ = [
    "apply_ema",
    "convert_checkpoint",
    "convert_pipeline_checkpoint",
    "flow_state_dict_from_checkpoint",
    "infer_published_config",
    "load_checkpoint",
]
