"""`python -m phi4_jax.plan`: the ahead-of-time memory plan of the training step (see `phi4_jax.cli.plan`)."""

import sys

from phi4_jax.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
