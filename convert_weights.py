#!/usr/bin/env python
"""Convert Phi-4 weights between Hugging Face / PyTorch and this project's Orbax checkpoint.

    python convert_weights.py SRC_HF_DIR DST_DIR            # HF Phi3ForCausalLM dir -> phi4_jax checkpoint
    python convert_weights.py --to-hf SRC_DIR DST_HF_DIR    # phi4_jax checkpoint -> safetensors + config.json

The command line lives in `phi4_jax.cli.convert`.
"""

import sys

from phi4_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
