"""Train phi4_jax models: `python train.py` runs the built-in CPU demo (configs/demo.toml).

    python train.py [--config PATH] [--workdir DIR] [--steps N] [--save-every N] [--set SECTION.KEY=VALUE ...]

The command line lives in `phi4_jax.cli.train`.
"""

import sys

from phi4_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
