"""`python -m phi4_jax.chat --checkpoint DIR`: chat in the terminal (see `phi4_jax.cli.chat`)."""

import sys

from phi4_jax.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
