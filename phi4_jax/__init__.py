"""phi4_jax: Microsoft's Phi-4 (14B) in JAX / Flax NNX: model, tokenizer, conversion, training, generation.

Public names: `load_model`, `Tokenizer`, `generate`, `Phi4Config`, `Phi4ForCausalLM`, `get_preset`, `forward`.
Subpackages, by concern: `model`, `checkpoint`, `data`, `train`, `inference`, `serve`, `cli` (see each one's
docstring); `tokenizer`, `special_tokens` and `checks` (shared argument checks) sit beside them.
"""

from phi4_jax.model.config import PRESETS, ConfigError, Phi4Config, get_preset
from phi4_jax.model.decoder import Phi4ForCausalLM, abstract_model, forward, model_from_params

__all__ = [
    "ConfigError",
    "PRESETS",
    "Phi4Config",
    "Phi4ForCausalLM",
    "abstract_model",
    "forward",
    "get_preset",
    "model_from_params",
]


def __getattr__(name):
    # Heavier pieces load on first use so `import phi4_jax` stays light.
    if name == "Tokenizer":
        from phi4_jax.tokenizer import Tokenizer
        return Tokenizer
    if name == "load_model":
        from phi4_jax.checkpoint.load import load_model
        return load_model
    if name == "generate":
        from phi4_jax.inference.engine import generate
        return generate
    raise AttributeError(f"module 'phi4_jax' has no attribute {name!r}")
