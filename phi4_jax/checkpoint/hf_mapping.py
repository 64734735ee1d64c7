"""How Hugging Face Phi3ForCausalLM tensors map to this project's parameters, one tensor at a time.

PyTorch `nn.Linear` weights are [out_features, in_features]; ours are [in, out] with heads split out.
Fused tensors are split: `qkv_proj` rows are q (Hq x D), then k (Hkv x D), then v (Hkv x D), heads
contiguous; `gate_up_proj` rows are gate, then up. Per-layer tensors go to row `i` of a stacked
[layers, ...] parameter (see `phi4_jax.model`).

`hf_pieces(name, config)` describes the mapping once, as row ranges of the HF tensor ("pieces") and how each
becomes our layout (`Piece.to_ours`) and back (`Piece.to_hf`), as NumPy views. The streaming converter
(`phi4_jax.checkpoint.hf_convert`) reads and writes piece by piece, in row blocks where a piece's rows run
along one of our axes; the in-memory helpers below (whole state dicts, for tests and small models) use the
same pieces.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Piece:
    """A block of consecutive rows [r0, r1) of one HF tensor that is (a layer of) one of our parameters.

    `shape` is our value's shape (one layer's, for stacked parameters). Our value is the rows themselves
    (`transposed=False`) or the transposed rows with the trailing axes split (`transposed=True`).
    `row_axis` is the axis of `shape` along which the HF rows run, when they run along a single axis (then
    any sub-block of rows is a slice of that axis, which is how the converter streams big tensors), else None.
    """
    hf_name: str
    r0: int
    r1: int
    path: tuple[str, ...]
    layer: int | None
    shape: tuple[int, ...]
    transposed: bool

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def row_axis(self) -> int | None:
        axis = len(self.shape) - 1 if self.transposed else 0
        return axis if self.shape[axis] == self.rows else None

    def block_shape(self, rows: int) -> tuple[int, ...]:
        """Our shape for `rows` of this piece's rows (a slice along `row_axis`; all rows if it is None)."""
        if rows == self.rows:
            return self.shape
        if self.row_axis is None:
            raise ValueError(f"rows of {self.hf_name} do not map onto one axis of {'/'.join(self.path)}")
        return self.shape[:self.row_axis] + (rows,) + self.shape[self.row_axis + 1:]

    def to_ours(self, hf_rows: np.ndarray) -> np.ndarray:
        """HF rows (all of this piece's, or a block of them along `row_axis`) -> our layout, as a view."""
        n = hf_rows.shape[0] if hf_rows.ndim else 1
        if self.transposed:
            return hf_rows.reshape(n, -1).T.reshape(self.block_shape(n))
        return hf_rows.reshape(self.block_shape(n))

    def to_hf(self, ours: np.ndarray, hf_trailing: tuple[int, ...]) -> np.ndarray:
        """Inverse of `to_ours`: our block -> HF rows [n, *hf_trailing], as a view where NumPy allows."""
        n = ours.shape[self.row_axis] if self.row_axis is not None else self.rows
        if self.transposed:
            return ours.reshape(-1, n).T.reshape((n, *hf_trailing))
        return ours.reshape((n, *hf_trailing))


def hf_pieces(name: str, config: Phi4Config) -> list[Piece]:
    """How HF tensor `name` splits into our parameters: its pieces in row order (they cover every row)."""
    c = config
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    if name == "model.embed_tokens.weight":
        return [Piece(name, 0, c.vocab_size, ("embed",), None, (c.vocab_size, d), False)]
    if name == "lm_head.weight":
        return [Piece(name, 0, c.vocab_size, ("lm_head",), None, (d, c.vocab_size), True)]
    if name == "model.norm.weight":
        return [Piece(name, 0, d, ("final_norm",), None, (d,), False)]
    m = _LAYER.match(name)
    if m is None or int(m.group(1)) >= c.num_layers:
        raise MappingError(f"unexpected tensor {name!r}: not part of a Phi3ForCausalLM with this config")
    i, rest = int(m.group(1)), m.group(2)

    def layer_piece(param, r0, r1, shape, transposed=True):
        return Piece(name, r0, r1, ("layers", param), i, shape, transposed)

    q, kv = c.q_size, c.kv_size
    if rest == "self_attn.qkv_proj.weight":
        return [layer_piece("q_proj", 0, q, (d, c.num_heads, hd)),
                layer_piece("k_proj", q, q + kv, (d, c.num_kv_heads, hd)),
                layer_piece("v_proj", q + kv, q + 2 * kv, (d, c.num_kv_heads, hd))]
    if rest == "self_attn.o_proj.weight":
        return [layer_piece("o_proj", 0, d, (c.num_heads, hd, d))]
    if rest == "mlp.gate_up_proj.weight":
        return [layer_piece("gate_proj", 0, f, (d, f)), layer_piece("up_proj", f, 2 * f, (d, f))]
    if rest == "mlp.down_proj.weight":
        return [layer_piece("down_proj", 0, d, (f, d))]
    if rest == "input_layernorm.weight":
        return [layer_piece("attn_norm", 0, d, (d,), transposed=False)]
    if rest == "post_attention_layernorm.weight":
        return [layer_piece("mlp_norm", 0, d, (d,), transposed=False)]
    raise MappingError(f"unexpected tensor {name!r}: not part of a Phi3ForCausalLM with this config")


def hf_to_params_pieces(name: str, tensor: np.ndarray, config: Phi4Config
                        ) -> list[tuple[tuple[str, ...], int | None, np.ndarray]]:
    """One whole HF tensor -> [(param path, layer index or None, array view)] in our layout (dtype unchanged)."""
    expected = hf_tensor_shapes(config).get(name)
    if expected is None:
        raise MappingError(f"unexpected tensor {name!r}: not part of a Phi3ForCausalLM with this config")
    if tuple(tensor.shape) != expected:
        raise MappingError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
    return [(p.path, p.layer, p.to_ours(tensor[p.r0:p.r1])) for p in hf_pieces(name, config)]


def params_to_hf_tensors(get: Callable[[tuple[str, ...], int | None], np.ndarray], config: Phi4Config
                         ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, tensor) one at a time, in memory. `get(path, layer)` returns our parameter (or its
    row `layer`). (The converter does not use this: it writes each piece straight into the output file.)"""
    for name, shape in hf_tensor_shapes(config).items():
        parts = [p.to_hf(np.asarray(get(p.path, p.layer)), shape[1:]) for p in hf_pieces(name, config)]
        yield name, np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))


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
