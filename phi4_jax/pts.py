"""`python -m phi4_jax.pts`: Pivotal Token Search, problems -> DPO pairs (see `phi4_jax.cli.pts`)."""

import sys

from phi4_jax.cli.pts import main

if __name__ == "__main__":
    sys.exit(main())
