#!/usr/bin/env python
"""Convert Phi-4 weights between Hugging Face / PyTorch and this project's Orbax checkpoint.

    python convert_weights.py SRC_HF_DIR DST_DIR            # HF Phi3ForCausalLM dir -> phi4_jax checkpoint
    python convert_weights.py --to-hf SRC_DIR DST_HF_DIR    # phi4_jax checkpoint -> safetensors + config.json

Conversion streams piece by piece (beyond the interpreter, peak memory is a fraction of the largest tensor,
for any shard layout), runs JAX on the CPU (unless JAX_PLATFORMS says otherwise), validates the source before
writing, and writes the output atomically. Errors print one line, `error: ...`, and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from phi4_jax.model.config import DTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert Phi-4 weights: Hugging Face Phi3ForCausalLM <-> phi4_jax Orbax checkpoint.")
    parser.add_argument("src", help="source directory (HF checkpoint, or phi4_jax checkpoint with --to-hf)")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--to-hf", action="store_true",
                        help="convert a phi4_jax checkpoint back to Hugging Face safetensors")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="output parameter dtype (default: keep the source dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard written by --to-hf (default 5GB)")
    parser.add_argument("--compression", choices=["zstd", "none"], default="zstd",
                        help="compression of the Orbax arrays (default zstd, as Orbax does)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    if "JAX_PLATFORMS" not in os.environ:  # conversion needs no accelerator: do not load (or probe) one
        import jax
        jax.config.update("jax_platforms", "cpu")
    from phi4_jax.checkpoint.hf_convert import checkpoint_to_hf, hf_to_checkpoint
    from phi4_jax.checkpoint.hf_files import ConversionError

    try:
        if args.to_hf:
            out = checkpoint_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                   max_shard_size=args.max_shard_size, progress=not args.no_progress)
        else:
            out = hf_to_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                   compression=None if args.compression == "none" else args.compression,
                                   progress=not args.no_progress)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. permission denied or disk full while writing
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
