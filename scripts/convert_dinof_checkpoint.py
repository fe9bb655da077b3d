"""Convert a published DiNof checkpoint (score network + flow) or a score_sde_pytorch checkpoint to a DiNofPipeline.

    python scripts/convert_dinof_checkpoint.py --checkpoint checkpoint_26.pth --output_dir dinof-cifar10-ve

Same as the console script `dinof-convert-checkpoint`; see `dinof_diffusers.conversion.checkpoint` for the options.
"""

import sys

from dinof_diffusers.conversion.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
