"""`python -m phi4_jax.serve --checkpoint DIR`: the OpenAI-compatible server (see `phi4_jax.cli.serve`)."""

import sys

from phi4_jax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
