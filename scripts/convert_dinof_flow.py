"""Convert a published DiNof flow checkpoint to a diffusers `FlowPriorModel` folder.

    python scripts/convert_dinof_flow.py --checkpoint checkpoint_26.pth --output_dir dinof-cifar10-flow

Same as the console script `dinof-convert-flow`; see `dinof_diffusers.conversion.flow` for the options.
"""

import sys

from dinof_diffusers.conversion.flow import main

if __name__ == "__main__":
    sys.exit(main())
