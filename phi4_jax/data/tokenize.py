"""`python -m phi4_jax.data.tokenize`: pre-tokenize a corpus into shards (see `phi4_jax.cli.tokenize`)."""

import sys

from phi4_jax.cli.tokenize import main

if __name__ == "__main__":
    sys.exit(main())
