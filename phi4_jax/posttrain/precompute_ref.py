"""python -m phi4_jax.posttrain.precompute_ref --config CFG: a DPO run's reference log-probs, stored beside its data
(`phi4_jax.posttrain.reference`)."""

import sys

from phi4_jax.posttrain.reference import main

if __name__ == "__main__":
    sys.exit(main())
