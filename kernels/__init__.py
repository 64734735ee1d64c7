"""Attention and RoPE for phi4_jax: pure-JAX references, Pallas TPU and GPU kernels, and their dispatch.

Public entry points (the project's contract):

- `flash_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None, implementation=None,
  interpret=False)`
- `apply_rope(x, positions, *, theta, implementation=None, interpret=False)`
- `flash_attention_rope(q, k, v, positions, *, theta, ...)`: RoPE on q/k then attention (fused on TPU)
- `decode_attention(q, k_cache, v_cache, lengths, ...)`: a few new queries against a KV cache
- `paged_attention(q, k_pages, v_pages, block_tables, lengths, ...)`: the same against a paged KV cache (float or
  int8 pages with scales; `decode_attention_reference` takes an int8 cache's scales too)
- `sharded_flash_attention`, `sharded_apply_rope`, `sharded_decode_attention`, `sharded_paged_attention`: the same
  inside `shard_map` on a mesh (kernels.sharded), with context parallelism over the sequence axis
  (kernels.context_parallel)

Also, imported from its module: `kernels.cpu_native` (C++ kernels through XLA's FFI for the CPU serving engine's
decode step: a packed-panel matmul, paged attention read in place, greedy argmax; built with the machine's C++
compiler on first use, absent without one) and `kernels.dequant_matmul.dequant_matmul` (int8 / int4 weights times activations
for decode, a Pallas TPU kernel that dequantizes in VMEM; `phi4_jax.quant.tpu_kernel` routes to it, opt-in).

This package never imports `phi4_jax`: the model depends on the kernels, not the reverse.
"""

from kernels.attention_reference import attention_blockwise, attention_naive
from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.dispatch import (
    HARDWARE_RUNS,
    AttentionConfigError,
    HardwareRun,
    apply_rope,
    default_implementation,
    flash_attention,
    flash_attention_rope,
    is_hopper_gpu,
)
from kernels.paged_attention import paged_attention, paged_attention_reference
from kernels.rope_reference import apply_rope_reference
from kernels.sharded import (
    sharded_apply_rope,
    sharded_decode_attention,
    sharded_flash_attention,
    sharded_paged_attention,
)

__all__ = [
    "HARDWARE_RUNS",
    "AttentionConfigError",
    "HardwareRun",
    "apply_rope",
    "apply_rope_reference",
    "attention_blockwise",
    "attention_naive",
    "decode_attention",
    "decode_attention_reference",
    "default_implementation",
    "flash_attention",
    "flash_attention_rope",
    "is_hopper_gpu",
    "paged_attention",
    "paged_attention_reference",
    "sharded_apply_rope",
    "sharded_decode_attention",
    "sharded_flash_attention",
    "sharded_paged_attention",
]
