"""Weight-only quantization for inference: int8 and int4 weights that the model's matmuls dequantize on the fly.

- `weights`: `QuantizedWeight` (a pytree weight object for `phi4_jax.model.linear`), quantizing a float matrix
  (`quantize_matrix`, NumPy, per output channel or in groups along the input dimension), int4 packing, which of
  our parameters are quantized and how (`QuantizeOptions`), `quantized_model`, which builds a `Phi4ForCausalLM`
  around a parameter tree holding quantized weights, and `abstract_quantized_params` (shapes only, for AOT plans).

- `tpu_kernel`: opt-in routing of decode-sized products to the Pallas TPU dequantize-matmul kernel
  (`kernels.dequant_matmul`), `use_dequant_kernel(params, max_rows=...)`.

Loading a checkpoint quantized (tensor by tensor), and `quantize_params` for an in-memory model, live in
`phi4_jax.checkpoint.quantized_load`; llama.cpp's Q8_0 / Q4_0 / Q4_K blocks re-blocked into `QuantizedWeight`
layout in `phi4_jax.checkpoint.gguf_quantized`.

May import: `phi4_jax.model`, `kernels`, jax, flax, numpy. Nothing else in `phi4_jax`.
"""
