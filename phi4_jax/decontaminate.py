"""`python -m phi4_jax.decontaminate`: 13/7-gram overlap removal against evaluation sets (see
`phi4_jax.cli.decontaminate`)."""

import sys

from phi4_jax.cli.decontaminate import main

if __name__ == "__main__":
    sys.exit(main())
