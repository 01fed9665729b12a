"""``torchrun --nproc-per-node N -m ckpt.trainer ...``"""

import os
import sys

from .train import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: native libraries' static destructors (gloo, awscrt) racing at
    # exit can abort a process whose work is done (docs/ckpt.md)
    os._exit(code)
