"""How Hugging Face Phi3ForCausalLM tensors map to this project's parameters, one tensor at a time.

PyTorch `nn.Linear` weights are [out_features, in_features]; ours are [in, out] with heads split out.
Fused tensors are split: `qkv_proj` rows are q (Hq x D), then k (Hkv x D), then v (Hkv x D), heads
contiguous; `gate_up_proj` rows are gate, then up. Per-layer tensors go to row `i` of a stacked
[layers, ...] parameter (see `phi4_jax.model`).

Everything here is NumPy on single tensors, so the converter can stream a checkpoint that does not fit in
memory, and the reverse direction rebuilds each HF tensor from one layer's slices.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import numpy as np

from phi4_jax.model.config import Phi4Config

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class MappingError(ValueError):
    """A tensor name or shape that does not belong to a Phi3ForCausalLM checkpoint of this config."""


def hf_tensor_shapes(config: Phi4Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Phi3ForCausalLM checkpoint of this config holds, with its PyTorch shape."""
    c = config
    d, f = c.hidden_size, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.qkv_proj.weight"] = (c.q_size + 2 * c.kv_size, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, c.q_size)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


def hf_to_params_pieces(name: str, tensor: np.ndarray, config: Phi4Config
                        ) -> list[tuple[tuple[str, ...], int | None, np.ndarray]]:
    """One HF tensor -> [(param path, layer index or None, array)] in our layout (dtype unchanged)."""
    c = config
    expected = hf_tensor_shapes(config).get(name)
    if expected is None:
        raise MappingError(f"unexpected tensor {name!r}: not part of a Phi3ForCausalLM with this config")
    if tuple(tensor.shape) != expected:
        raise MappingError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
    d, hd = c.hidden_size, c.head_dim
    if name == "model.embed_tokens.weight":
        return [(("embed",), None, tensor)]
    if name == "model.norm.weight":
        return [(("final_norm",), None, tensor)]
    if name == "lm_head.weight":
        return [(("lm_head",), None, tensor.T)]
    layer, rest = _LAYER.match(name).groups()
    i = int(layer)
    if rest == "self_attn.qkv_proj.weight":
        q, k, v = np.split(tensor, [c.q_size, c.q_size + c.kv_size], axis=0)
        return [(("layers", "q_proj"), i, q.T.reshape(d, c.num_heads, hd)),
                (("layers", "k_proj"), i, k.T.reshape(d, c.num_kv_heads, hd)),
                (("layers", "v_proj"), i, v.T.reshape(d, c.num_kv_heads, hd))]
    if rest == "self_attn.o_proj.weight":
        return [(("layers", "o_proj"), i, tensor.T.reshape(c.num_heads, hd, d))]
    if rest == "mlp.gate_up_proj.weight":
        gate, up = np.split(tensor, 2, axis=0)
        return [(("layers", "gate_proj"), i, gate.T), (("layers", "up_proj"), i, up.T)]
    if rest == "mlp.down_proj.weight":
        return [(("layers", "down_proj"), i, tensor.T)]
    if rest == "input_layernorm.weight":
        return [(("layers", "attn_norm"), i, tensor)]
    if rest == "post_attention_layernorm.weight":
        return [(("layers", "mlp_norm"), i, tensor)]
    raise MappingError(f"unexpected tensor {name!r}")  # unreachable: shapes table covers every name


def params_to_hf_tensors(get: Callable[[tuple[str, ...], int | None], np.ndarray], config: Phi4Config
                         ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, tensor) one at a time. `get(path, layer)` returns our parameter (or its row `layer`)."""
    c = config
    d = c.hidden_size
    yield "model.embed_tokens.weight", np.asarray(get(("embed",), None))
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        q = np.asarray(get(("layers", "q_proj"), i)).reshape(d, c.q_size).T
        k = np.asarray(get(("layers", "k_proj"), i)).reshape(d, c.kv_size).T
        v = np.asarray(get(("layers", "v_proj"), i)).reshape(d, c.kv_size).T
        yield p + "self_attn.qkv_proj.weight", np.ascontiguousarray(np.concatenate([q, k, v], axis=0))
        o = np.asarray(get(("layers", "o_proj"), i)).reshape(c.q_size, d).T
        yield p + "self_attn.o_proj.weight", np.ascontiguousarray(o)
        gate = np.asarray(get(("layers", "gate_proj"), i)).T
        up = np.asarray(get(("layers", "up_proj"), i)).T
        yield p + "mlp.gate_up_proj.weight", np.ascontiguousarray(np.concatenate([gate, up], axis=0))
        yield p + "mlp.down_proj.weight", np.ascontiguousarray(np.asarray(get(("layers", "down_proj"), i)).T)
        yield p + "input_layernorm.weight", np.asarray(get(("layers", "attn_norm"), i))
        yield p + "post_attention_layernorm.weight", np.asarray(get(("layers", "mlp_norm"), i))
    yield "model.norm.weight", np.asarray(get(("final_norm",), None))
    yield "lm_head.weight", np.ascontiguousarray(np.asarray(get(("lm_head",), None)).T)


def params_from_hf_state_dict(state_dict: dict[str, np.ndarray], config: Phi4Config, dtype=None) -> dict:
    """In-memory conversion of a whole HF state dict (NumPy arrays) to our nested params dict."""
    missing = sorted(set(hf_tensor_shapes(config)) - set(state_dict))
    if missing:
        raise MappingError(f"missing tensor(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    stacked: dict[tuple[str, ...], list] = {}
    params: dict = {"layers": {}}
    for name, tensor in state_dict.items():
        for path, layer, arr in hf_to_params_pieces(name, np.asarray(tensor), config):
            arr = arr if dtype is None else arr.astype(dtype)
            if layer is None:
                params[path[0]] = np.ascontiguousarray(arr)
            else:
                stacked.setdefault(path, [None] * config.num_layers)[layer] = arr
    for path, rows in stacked.items():
        params["layers"][path[1]] = np.stack(rows)
    return params


def hf_state_dict_from_params(params: dict, config: Phi4Config) -> dict[str, np.ndarray]:
    """In-memory inverse of `params_from_hf_state_dict`."""
    def get(path, layer):
        node = params
        for key in path:
            node = node[key]
        return node if layer is None else node[layer]
    return dict(params_to_hf_tensors(get, config))
