"""python -m phi4_jax.posttrain.merge_lora WORKDIR DST: a LoRA run's adapters merged into its base weights, written
as a plain checkpoint (`phi4_jax.posttrain.lora.write_merged_checkpoint`)."""

import sys

from phi4_jax.posttrain.lora import merge_main

if __name__ == "__main__":
    sys.exit(merge_main())
