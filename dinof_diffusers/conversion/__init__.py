"""Published checkpoints -> diffusers folders.

- `flow`: the DiNof flow prior (normflows `MultiscaleFlow`) -> a `FlowPriorModel` folder; console script
  `dinof-convert-flow`.
"""

from .flow import apply_ema, convert_checkpoint, flow_state_dict_from_checkpoint, load_checkpoint

__all__ = ["apply_ema", "convert_checkpoint", "flow_state_dict_from_checkpoint", "load_checkpoint"]
