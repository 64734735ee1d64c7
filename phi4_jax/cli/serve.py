"""Serve a converted Phi-4 checkpoint over an OpenAI-compatible HTTP API: `python -m phi4_jax.serve --checkpoint DIR`.

Loads the model, starts the continuous-batching engine (`phi4_jax.inference.batching`; every program is compiled
before the first request; echo + logprobs, lm-eval's log-likelihood requests, run in the same programs) and serves
`phi4_jax.serve.create_app` with uvicorn on --host/--port (127.0.0.1:8000 by default: only this machine can
connect unless you pass another host). Ctrl-C stops the server and the engine.
"""

from __future__ import annotations

import argparse
import os
import sys

from phi4_jax.cli.chat import ChatError, add_model_arguments, load

EXIT_USAGE = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phi4_jax.serve", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (from convert_weights.py) or a llama.cpp phi3 .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint's "
                                                          "directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (default 8)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens per request, prompt plus answer (default: the model's max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before the "
                                                           "server answers 429 (default 64)")
    add_model_arguments(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_context is not None and args.max_context < 2:
        p.error(f"--max-context must be at least 2, got {args.max_context}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load(args.checkpoint, args.dtype, args.quantize, args.group_size,
                                check_tokenizer=not args.no_tokenizer_check)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    import uvicorn

    from phi4_jax.inference.batching import ContinuousBatchingEngine
    from phi4_jax.serve.app import create_app

    max_context = min(args.max_context or model.config.max_position_embeddings, model.config.max_position_embeddings)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    engine = ContinuousBatchingEngine(model, max_batch=args.max_batch, max_context=max_context,
                                      prefill_chunk=128, max_queue=args.max_queue, cache_dtype=args.kv_cache_dtype)
    del model   # the engine holds what it runs on (on CPU, its per-layer copy: the stacked layers are freed)
    print("compiling the engine's programs ...", file=sys.stderr, flush=True)
    engine.start(progress=True)
    try:
        app = create_app(engine, tokenizer, name, max_context=max_context)
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
