"""Checkpoints: this project's on-disk format, loading, and conversion from and to Hugging Face and llama.cpp GGUF.

- `store`: the checkpoint layout (config.json + an Orbax PyTree of params), atomic (fsynced, crash-safe)
  writes, TensorStore I/O.
- `load`: `restore_params` onto any shardings and dtype (quantized tensors kept or dequantized), and `load_model`
  (the public `phi4_jax.load_model`).
- `hf_mapping`: how each Hugging Face Phi3ForCausalLM tensor maps to our parameters, as row ranges ("pieces")
  with NumPy views both ways; both conversion directions and the in-memory helpers use it.
- `hf_files`: lazy readers of safetensors (sharded or single) and PyTorch ``.bin``/``.pt`` files.
- `hf_convert`: streaming conversion both ways (`convert_weights.py`).
- `rows`: a checkpoint (plain or holding quantized tensors) read back as HF tensor rows in bounded blocks, for
  ``--to-hf`` and ``--to-gguf``.
- `gguf_convert`: llama.cpp phi3 GGUF files in (dequantized, through `hf_convert`'s writer) and out, with the
  `gguf` package.
- `gguf_tokenizer`: phi-4's tokenizer and chat template as GGUF metadata (written out; an embedded one checked).
- `quantized_load`: `load_model(..., quantize=...)`'s loader (tensor by tensor into `phi4_jax.quant` weights), the
  checkpoint format for quantized tensors, `quantize_params` for in-memory models.
- `gguf_quantized`: GGUF Q8_0 / Q4_0 / Q4_K blocks re-blocked into quantized weights (``--keep-quantized``, and
  `load_model` of a ``.gguf`` file), and int8 / int4 groups of 32 back into Q8_0 / Q4_0 blocks (``--to-gguf``).

May import: `phi4_jax.model`, `phi4_jax.quant`, `phi4_jax.special_tokens` and `phi4_jax.tokenizer` (for GGUF
vocabularies), numpy, tensorstore, orbax, safetensors-format code of its own, the `gguf` package; never training,
data or inference code.
"""
