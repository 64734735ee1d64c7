"""Chat with a converted Phi-4 checkpoint in the terminal: `python -m phi4_jax.chat --checkpoint DIR`.

The JAX counterpart of the model card's `llama-cli -m phi-4-q4.gguf -cnv -c 16384 -p "<system prompt>"`:
multi-turn chat in the phi-4 chat format, an optional system prompt (`--system`), a context of up to
16384 tokens (`--max-context`), tokens streamed as they are generated, and tokens/s after each answer
(on stderr). `--prompt "..."` answers once and exits, so it can be scripted. Ctrl-D or Ctrl-C at the
prompt exits; Ctrl-C during an answer stops that answer. `--quantize int8|int4` (and `--group-size`) loads the
weights quantized (`load_model(..., quantize=...)`) and `--kv-cache-dtype int8` keeps the KV cache in int8;
`--checkpoint` may also be a llama.cpp phi3 ``.gguf`` file, whose
Q8_0 / Q4_0 / Q4_K blocks run as they are. `--compile-cache [DIR]` keeps compiled programs on disk, so the next start
loads them instead of compiling (`phi4_jax.inference.compile_cache`).

The conversation's KV pages are kept between turns (`phi4_jax.inference.chat_session.ChatSession`, on the model's
serving engine, sized for --max-context): each answer prefills only the new tokens (the previous answer's tail and
the new user message), not the whole conversation. When the conversation outgrows the context, the oldest turns
(never the system prompt) are dropped and only what still matches (the system prompt) is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_USAGE = 2


class ChatError(Exception):
    """A problem the user must fix (bad checkpoint path, message too long for the context)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phi4_jax.chat", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (from convert_weights.py), or a llama.cpp phi3 .gguf file")
    p.add_argument("--system", default=None, help="system prompt (like llama-cli's -p)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--max-context", type=int, default=16384,
                   help="context length in tokens (default 16384; capped at the model's max_position_embeddings)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest answer in tokens (default 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_model_arguments(p)
    add_compile_cache_argument(p)
    args = p.parse_args(argv)
    if args.max_context < 2:
        p.error(f"--max-context must be at least 2, got {args.max_context}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    return args


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantize, --group-size and --no-tokenizer-check: how `load` reads the weights; --kv-cache-dtype:
    the KV cache's dtype (shared with `python -m phi4_jax.serve`)."""
    from phi4_jax.inference.kv_quant import KV_CACHE_DTYPES

    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="parameter/compute dtype (default: as stored in the checkpoint)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization while loading (int8 per channel, int4 in groups); see load_model")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group size along the input dimension (default: per channel for int8, 128 "
                        "for int4)")
    p.add_argument("--no-tokenizer-check", action="store_true",
                   help="load a .gguf checkpoint whose embedded tokenizer differs from phi-4's (load_model's "
                        "check_tokenizer=False); the model still runs with phi-4's tokenizer")
    p.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                   help="KV cache dtype (default: the compute dtype); int8 stores keys/values in int8 with a float32 "
                        "scale per token and kv head: about half the bytes of bfloat16")


def add_compile_cache_argument(p: argparse.ArgumentParser) -> None:
    """--compile-cache [DIR]: JAX's persistent compilation cache (shared with `python -m phi4_jax.serve`)."""
    from phi4_jax.inference.compile_cache import default_compile_cache_dir

    p.add_argument("--compile-cache", nargs="?", const=default_compile_cache_dir(), default=None, metavar="DIR",
                   help="keep compiled programs in DIR so the next start loads them instead of compiling (JAX's "
                        f"persistent compilation cache; off by default; no DIR: {default_compile_cache_dir()})")


def use_compile_cache_of(args) -> None:
    """Turns on the compilation cache `--compile-cache` names (before anything compiles); ChatError when the
    directory cannot be created or written."""
    if args.compile_cache is None:
        return
    from phi4_jax.inference.compile_cache import DEFAULT_MAX_BYTES, CompileCacheError, use_compile_cache

    try:
        use_compile_cache(args.compile_cache, max_bytes=DEFAULT_MAX_BYTES)
    except CompileCacheError as e:
        raise ChatError(str(e)) from None


def load(checkpoint: str, dtype: str | None, quantize: str | None = None, group_size: int | None = None,
         check_tokenizer: bool = True):
    """(model, tokenizer), with clear ChatErrors for a missing or broken checkpoint (`check_tokenizer`: a .gguf
    file's embedded tokenizer must be phi-4's, as `load_model` checks)."""
    gguf_file = checkpoint.lower().endswith(".gguf") and os.path.isfile(checkpoint)
    if not os.path.isdir(checkpoint) and not gguf_file:
        raise ChatError(f"checkpoint directory {checkpoint!r} does not exist "
                        "(convert one with: python convert_weights.py HF_DIR DST_DIR)")
    from phi4_jax.checkpoint.load import load_model
    from phi4_jax.checkpoint.store import CheckpointError
    from phi4_jax.model.config import ConfigError
    from phi4_jax.tokenizer import Tokenizer

    try:
        model = load_model(checkpoint, dtype=dtype, quantize=quantize, group_size=group_size,
                           check_tokenizer=check_tokenizer)
    except (CheckpointError, ConfigError) as e:
        raise ChatError(f"cannot load checkpoint {checkpoint!r}: {e}") from None
    tokenizer = Tokenizer()
    if model.config.vocab_size < tokenizer.n_vocab:
        raise ChatError(f"checkpoint {checkpoint!r} has vocab_size {model.config.vocab_size}, smaller than the "
                        f"phi-4 tokenizer's {tokenizer.n_vocab}: it is not a phi-4 chat model")
    return model, tokenizer


class Conversation:
    """The messages so far, and the token prompt for the next answer, trimmed to fit the context."""

    def __init__(self, tokenizer, system: str | None, max_context: int):
        self.tokenizer = tokenizer
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []
        self.max_context = max_context

    def prompt_for(self, user_text: str, min_new_tokens: int = 1) -> list[int]:
        """Adds the user message; returns the prompt ids, dropping the oldest turns if it does not fit."""
        self.turns.append({"role": "user", "content": user_text})
        while True:
            ids = self.tokenizer.encode_chat(self.system + self.turns, add_generation_prompt=True)
            if len(ids) + min_new_tokens <= self.max_context:
                return ids
            if len(self.turns) <= 1:
                self.turns.pop()
                raise ChatError(f"message too long: the prompt is {len(ids)} tokens but the context holds "
                                f"{self.max_context} (--max-context)")
            del self.turns[0]  # the oldest message (never the new one)
            if len(self.turns) > 1 and self.turns[0]["role"] == "assistant":
                del self.turns[0]  # and the answer to it

    def add_answer(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def drop_last_user(self) -> None:
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()


def new_session(model, tokenizer, args, max_context: int):
    """A `ChatSession` (KV cache kept between turns) with the command line's sampling settings."""
    from phi4_jax.inference.chat_session import ChatSession, chat_stop_tokens
    from phi4_jax.inference.errors import GenerationError

    try:
        return ChatSession(model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           stop_tokens=chat_stop_tokens(model.config, tokenizer), max_context=max_context,
                           cache_dtype=args.kv_cache_dtype)
    except GenerationError as e:
        raise ChatError(str(e)) from None


def answer(session, tokenizer, prompt_ids: list[int], args, max_context: int, out=None) -> tuple[str, dict]:
    """Streams one answer to `out` (stdout) through `session` (see `new_session`; the KV cache of earlier turns
    is reused); returns (text, stats: tokens, seconds, tokens/s, time to first token).

    Time to first token includes the prefill; tokens/s counts the tokens after the first over the time after it.
    """
    from phi4_jax.inference.chat_session import chat_stop_tokens, stream_text

    out = out or sys.stdout

    def write(piece):
        out.write(piece)
        out.flush()

    start = time.perf_counter()
    first_token_at = []

    def on_token(token):
        if not first_token_at:
            first_token_at.append(time.perf_counter() - start)

    budget = min(args.max_new_tokens, max_context - len(prompt_ids))
    new, text = stream_text(lambda callback: session.generate(prompt_ids, max_new_tokens=budget, callback=callback),
                            tokenizer, chat_stop_tokens(session.config, tokenizer), on_text=write, on_token=on_token)
    seconds = time.perf_counter() - start
    ttft = first_token_at[0] if first_token_at else seconds
    decode_time = seconds - ttft
    rate = (len(new) - 1) / decode_time if len(new) > 1 and decode_time > 0 else float("nan")
    return text, {"tokens": len(new), "seconds": seconds, "time_to_first_token": ttft, "tokens_per_s": rate}


def _report(stats: dict) -> None:
    print(f"\n[{stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s, "
          f"first token after {stats['time_to_first_token']:.2f}s]", file=sys.stderr, flush=True)


def run(args) -> int:
    use_compile_cache_of(args)
    model, tokenizer = load(args.checkpoint, args.dtype, args.quantize, args.group_size,
                            check_tokenizer=not args.no_tokenizer_check)
    max_context = min(args.max_context, model.config.max_position_embeddings)
    conversation = Conversation(tokenizer, args.system, max_context)
    session = new_session(model, tokenizer, args, max_context)

    if args.prompt is not None:
        ids = conversation.prompt_for(args.prompt)
        _, stats = answer(session, tokenizer, ids, args, max_context)
        _report(stats)
        return 0

    print(f"phi4_jax chat: {args.checkpoint} (context {max_context} tokens). "
          "Ctrl-D or Ctrl-C to exit; Ctrl-C during an answer stops it.", file=sys.stderr)
    while True:
        try:
            user = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not user.strip():
            continue
        try:
            ids = conversation.prompt_for(user)
        except ChatError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        try:
            text, stats = answer(session, tokenizer, ids, args, max_context)
        except KeyboardInterrupt:
            conversation.drop_last_user()
            print("\n[answer interrupted]", file=sys.stderr)
            continue
        conversation.add_answer(text)
        _report(stats)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
