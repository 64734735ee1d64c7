"""Model configuration: the Phi-4 architecture as data.

`Phi4Config` holds the architecture (what a Hugging Face `config.json` describes) plus the runtime
choices that do not change the math (dtypes, remat policy, attention implementation). Presets:

- ``phi4-14b``: microsoft/phi-4 exactly (see PHI4.md).
- ``tiny``: a few-layer model for tests.
- ``demo``: the small model that ``python train.py`` trains on a CPU.

`Phi4Config.from_hf_dict` reads a transformers ``Phi3Config`` dict in both styles (top-level ``rope_theta``
as published for phi-4, and transformers 5's ``rope_parameters``) and refuses configs this port would
silently mis-model (partial rotary, rope scaling, sliding window, biases, tied embeddings, other activations).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from phi4_jax.checks import check_integer

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention_out")
# Fields of Phi4Config that choose how the model runs, not what it computes (the rest is the architecture).
RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "remat_policy", "attention_impl", "scan_layers", "fuse_rope",
                  "kernel_interpret")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "pallas_gpu", "pallas_tpu", "cudnn")
# The floating dtypes of parameters, compute and caches: name -> NumPy dtype (the one table of them).
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


class ConfigError(ValueError):
    """A configuration that this port cannot model faithfully, or that is malformed."""


@dataclasses.dataclass(frozen=True)
class Phi4Config:
    # --- architecture (what config.json describes) ---
    vocab_size: int = 100352
    hidden_size: int = 5120
    intermediate_size: int = 17920
    num_layers: int = 40
    num_heads: int = 40
    num_kv_heads: int = 10
    head_dim: int = 128
    rope_theta: float = 250000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 16384
    bos_token_id: int = 100257
    eos_token_id: int = 100265
    pad_token_id: int = 100349
    # --- runtime choices (do not change the math) ---
    param_dtype: str = "float32"      # dtype of stored parameters (fp32 master weights, or bf16 for inference)
    compute_dtype: str = "bfloat16"   # dtype of matmuls; softmax, norms, RoPE angles and loss stay fp32
    remat_policy: str = "full"        # one of REMAT_POLICIES; applied to each scanned decoder layer
    attention_impl: str | None = None  # kernels.flash_attention implementation; None = best for backend
    scan_layers: bool = True          # scan over layers (compile time independent of depth)
    fuse_rope: bool = True            # RoPE fused into the attention kernel (kernels.flash_attention_rope)
    kernel_interpret: bool = False    # run Pallas attention kernels in interpret mode (CPU testing)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            check_integer(getattr(self, name), f"config field {name!r}", ConfigError)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention_impl!r}")

    # ------------------------------------------------------------------ derived
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * d
        return 2 * v * d + self.num_layers * per_layer + d

    def replace(self, **changes: Any) -> "Phi4Config":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Phi4Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown config field(s): {sorted(unknown)}")
        return cls(**data)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_dict(cls, hf: dict, **runtime: Any) -> "Phi4Config":
        """Builds a config from a transformers Phi3 `config.json` dict, refusing what we cannot model."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type != "phi3" and "Phi3ForCausalLM" not in archs:
            raise ConfigError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs!r}; "
                "phi4_jax ports Phi3ForCausalLM (model_type 'phi3') checkpoints such as microsoft/phi-4")
        if archs and "Phi3ForCausalLM" not in archs:
            raise ConfigError(f"unsupported architectures {archs!r}: expected Phi3ForCausalLM")

        def get(key, default=None, required=True):
            if key in hf and hf[key] is not None:
                return hf[key]
            if required and default is None:
                raise ConfigError(f"config.json is missing required field {key!r}")
            return default

        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        kv_heads = int(get("num_key_value_heads", heads, required=False))
        if hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
        if hf.get("head_dim") not in (None, head_dim):
            raise ConfigError(
                f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {head_dim}; "
                "Phi-3/Phi-4 checkpoints derive head_dim from hidden_size")

        rope_parameters = hf.get("rope_parameters") or {}
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in (None, "default"):
                raise ConfigError(
                    f"rope_scaling of type {kind!r} (e.g. longrope / su scaling) is not supported; "
                    "phi-4 uses plain RoPE (rope_scaling null)")
        kind = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"rope_parameters.rope_type {kind!r} is not supported; phi-4 uses 'default'")

        def rope_field(key, default):
            # Top level (transformers 4 / phi-4's config.json) or rope_parameters (transformers 5); null = unset.
            found = {v for v in (hf.get(key), rope_parameters.get(key)) if v is not None}
            if len(found) > 1:
                raise ConfigError(f"conflicting {key}: {hf[key]} at the top level but "
                                  f"{rope_parameters[key]} in rope_parameters")
            return found.pop() if found else default

        partial = rope_field("partial_rotary_factor", 1.0)
        if float(partial) != 1.0:
            raise ConfigError(
                f"partial_rotary_factor {partial} is not supported: phi-4 rotates all head dimensions")
        theta = rope_field("rope_theta", 10000.0)  # default: transformers' Phi3Config default
        if hf.get("sliding_window") is not None:
            raise ConfigError(
                f"sliding_window={hf['sliding_window']} is not supported: phi-4 uses full causal attention "
                "(sliding_window null)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ConfigError(f"{key}=true is not supported: phi-4 has no biases")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings=true is not supported: phi-4 has an untied lm_head")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {act!r} is not supported: phi-4 uses silu (SwiGLU)")

        def token_id(key, default):
            value = hf.get(key, default)
            if isinstance(value, list):
                value = value[0] if value else default
            return int(value) if value is not None else default

        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=token_id("bos_token_id", 100257),
            eos_token_id=token_id("eos_token_id", 100265),
            pad_token_id=token_id("pad_token_id", 100349),
            **runtime,
        )

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, **runtime: Any) -> "Phi4Config":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {os.fspath(path)!r}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{os.fspath(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)!r} does not hold a JSON object")
        return cls.from_hf_dict(data, **runtime)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict:
        """A transformers Phi3 config.json dict (phi-4's published style: top-level rope_theta)."""
        return {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "embd_pdrop": 0.0,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "pad_token_id": self.pad_token_id,
            "resid_pdrop": 0.0,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


PRESETS: dict[str, Phi4Config] = {
    # microsoft/phi-4, exactly (PHI4.md).
    "phi4-14b": Phi4Config(),
    # ~1.5B parameters, phi-4 shaped (head_dim 128, 4:1 GQA): the one-GPU MFU model.
    "phi4-1.5b": Phi4Config(hidden_size=2048, intermediate_size=7168, num_layers=24, num_heads=16,
                            num_kv_heads=4, max_position_embeddings=4096),
    # The CPU demo that `python train.py` trains.
    "demo": Phi4Config(vocab_size=100352, hidden_size=128, intermediate_size=384, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
                       max_position_embeddings=4096, compute_dtype="float32", remat_policy="none"),
    # Tests: tiny and fast to compile.
    "tiny": Phi4Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=16384,
                       compute_dtype="float32", remat_policy="none"),
}


def get_preset(name: str, **changes: Any) -> Phi4Config:
    try:
        config = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return config.replace(**changes) if changes else config
