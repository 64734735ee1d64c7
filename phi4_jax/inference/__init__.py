"""Inference: the KV cache, sampling, the generation engine, and multi-turn chat sessions.

- `kv_cache`: `KVCache` and the forward passes that fill and read it (`prefill`, `extend`, `decode_step`).
- `sampling`: per-row greedy / temperature / top-k / top-p sampling with reproducible per-sequence keys.
- `engine`: `generate` (the public `phi4_jax.generate`) on the model's shared serving engine (`shared_engine`), and the
  argument checks generation shares.
- `chat_session`: `ChatSession` (the conversation's KV pages kept between turns), `TextStreamer`, text-level helpers.
- `kv_quant`: the int8 KV cache's number format (`quantize_kv`) and the one check of a `cache_dtype`.
- `paged_cache`: the paged KV cache (`PagedKV`, `paged_extend`) and its allocator with prefix caching (`PagePool`).
- `paged_layers`: the paged cache and the weights in a per-layer layout, for the engine on the CPU backend.
- `cpu_weights`: that layout's weight class (`MatrixWeight`: panels for `kernels.cpu_native`'s matmul where it
  builds, else 2-D matrices with the lm_head also transposed), plugged in through `model.linear`.
- `batching`: the engine, `ContinuousBatchingEngine` (continuous batching, chunked prefill, streams), the one decode
  path: the server runs it on a background thread, `generate` / `ChatSession` / PTS on the caller's.
- `compile_ahead`: compiling a jitted function's programs ahead of time (lowered, compiled on a thread pool,
  nothing run), what the engine's `warmup` uses.
- `compile_cache`: `use_compile_cache`, JAX's persistent compilation cache for the serve and chat CLIs.
- `errors`: `GenerationError`, `ContextLengthError`, `QueueFullError`, `EngineError`.

May import: `phi4_jax.model`, `phi4_jax.special_tokens`, `phi4_jax.checks`, `kernels`. Not training or data code.
"""
