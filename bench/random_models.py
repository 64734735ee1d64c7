"""Random phi-4-shaped model pairs for the CPU benchmarks: the same float32 weights in transformers and in JAX."""

from __future__ import annotations

# name: (hidden, layers, heads, kv_heads, intermediate, vocab)
SIZES = {
    "87m": (384, 6, 6, 2, 1152, 100352),
    "87m-8k": (384, 6, 6, 2, 1152, 8192),   # the same layers with an 8K vocabulary: decode is layer-bound
    "tiny": (64, 2, 4, 2, 160, 4096),
}


def random_model_pair(size: str, dtype: str = "float32"):
    """(transformers Phi3ForCausalLM in eval mode, our params as jax arrays, our Phi4Config): the same random
    weights, made in float32 and, for `dtype` "bfloat16", rounded to bfloat16 on both sides (transformers' weights
    and ours; our config then computes in bfloat16)."""
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from phi4_jax.checkpoint.hf_mapping import params_from_hf_state_dict
    from phi4_jax.model.config import Phi4Config

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    hf_config = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.05)
    torch.manual_seed(0)
    hf = Phi3ForCausalLM(hf_config).eval()
    config = Phi4Config.from_hf_dict(hf_config.to_dict(), param_dtype=dtype, compute_dtype=dtype,
                                     remat_policy="none")
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(lambda w: jnp.asarray(w).astype(dtype), params_from_hf_state_dict(state, config))
    return hf.to(getattr(torch, dtype)), params, config
