"""The Phi-4 model: its configuration, the decoder, and the sharding rules that lay it out on a mesh.

- `config`: `Phi4Config` (the architecture as data, presets, Hugging Face config.json in both styles).
- `decoder`: parameter specs with logical axes, the pure forward functions, and the Flax NNX `Phi4ForCausalLM`.
- `sharding`: the one rules table (logical axis -> mesh axes), mesh building, `constrain`, mesh validation.

May import: `kernels`, jax, flax, numpy, `phi4_jax.special_tokens` and `phi4_jax.checks`. Nothing else in `phi4_jax` (everything
else builds on this package).
"""
