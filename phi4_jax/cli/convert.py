#!/usr/bin/env python
"""Convert Phi-4 weights between Hugging Face / PyTorch and this project's Orbax checkpoint.

    python convert_weights.py SRC_HF_DIR DST_DIR            # HF Phi3ForCausalLM dir -> phi4_jax checkpoint
    python convert_weights.py --to-hf SRC_DIR DST_HF_DIR    # phi4_jax checkpoint -> safetensors + config.json
    python convert_weights.py SRC.gguf DST_DIR              # llama.cpp phi3 GGUF -> phi4_jax checkpoint
    python convert_weights.py SRC.gguf DST_DIR --keep-quantized   # Q8_0 / Q4_0 / Q4_K stay int8 / int4
    python convert_weights.py --to-gguf SRC_DIR DST.gguf [--type f32|f16|bf16|q8_0|q4_0]   # -> llama.cpp GGUF

--to-hf and --to-gguf also read --keep-quantized checkpoints (dequantized; for --to-gguf q8_0 / q4_0, int8 / int4
groups of 32 are written back as Q8_0 / Q4_0 blocks as they are).

Conversion streams piece by piece (beyond the interpreter, peak memory is a fraction of the largest tensor,
for any shard layout), runs JAX on the CPU (unless JAX_PLATFORMS says otherwise), validates the source before
writing, and writes the output atomically. Errors print one line, `error: ...`, and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from phi4_jax.model.config import DTYPES

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # phi4_jax.checkpoint.gguf_convert.GGUF_TYPES (not imported: jax-free)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert Phi-4 weights: Hugging Face Phi3ForCausalLM or llama.cpp GGUF <-> phi4_jax Orbax "
                    "checkpoint.")
    parser.add_argument("src", help="source: HF checkpoint directory or phi3 .gguf file (phi4_jax checkpoint "
                                    "with --to-hf / --to-gguf)")
    parser.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite); "
                                    "a .gguf file with --to-gguf")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--to-hf", action="store_true",
                           help="convert a phi4_jax checkpoint back to Hugging Face safetensors")
    direction.add_argument("--to-gguf", action="store_true",
                           help="convert a phi4_jax checkpoint to a llama.cpp phi3 GGUF file")
    parser.add_argument("--type", choices=GGUF_TYPES, default="f16", dest="gguf_type",
                        help="weight type written by --to-gguf (default f16; 1-D norms stay f32; with q4_0 the "
                             "output layer is q8_0)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="--to-gguf: write weights only, without phi-4's tokenizer and chat template "
                             "(needed for a model whose vocabulary is not phi-4's 100352 tokens)")
    parser.add_argument("--no-tokenizer-check", action="store_true",
                        help="reading a GGUF: convert it even if its embedded tokenizer is not phi-4's")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="output parameter dtype (default: keep the source dtype; float32 from GGUF)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--keep-quantized", action="store_true",
                        help="GGUF in: keep Q8_0 / Q4_0 / Q4_K weights quantized (int8 / int4 groups of 32; "
                             "load_model runs them as they are); other types dequantize to --dtype")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard written by --to-hf (default 5GB)")
    parser.add_argument("--compression", choices=["zstd", "none"], default="zstd",
                        help="compression of the Orbax arrays (default zstd, as Orbax does)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    if "JAX_PLATFORMS" not in os.environ:  # conversion needs no accelerator: do not load (or probe) one
        import jax
        jax.config.update("jax_platforms", "cpu")
    from phi4_jax.checkpoint.gguf_convert import checkpoint_to_gguf, gguf_to_checkpoint
    from phi4_jax.checkpoint.hf_convert import checkpoint_to_hf, hf_to_checkpoint
    from phi4_jax.checkpoint.hf_files import ConversionError

    try:
        if args.keep_quantized and (args.to_gguf or args.to_hf):
            raise ConversionError("--keep-quantized applies to reading a .gguf source, not to "
                                  f"{'--to-gguf' if args.to_gguf else '--to-hf'}")
        if args.to_gguf:
            out = checkpoint_to_gguf(args.src, args.dst, gguf_type=args.gguf_type, overwrite=args.overwrite,
                                     progress=not args.no_progress, tokenizer=not args.no_tokenizer)
        elif args.to_hf:
            out = checkpoint_to_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                   max_shard_size=args.max_shard_size, progress=not args.no_progress)
        elif args.keep_quantized:
            if not args.src.lower().endswith(".gguf"):
                raise ConversionError("--keep-quantized applies to a .gguf source only")
            from phi4_jax.checkpoint.gguf_quantized import gguf_to_quantized_checkpoint
            out = gguf_to_quantized_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                               compression=None if args.compression == "none" else args.compression,
                                               progress=not args.no_progress,
                                               check_tokenizer=not args.no_tokenizer_check)
        elif args.src.lower().endswith(".gguf"):
            out = gguf_to_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                     compression=None if args.compression == "none" else args.compression,
                                     progress=not args.no_progress, check_tokenizer=not args.no_tokenizer_check)
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
