"""The paged KV cache: a pool of fixed-size pages on the device, its host-side allocator with prefix caching,
and the forward pass that reads and writes it (`paged_extend`).

Device layout (`PagedKV`): k, v ``[layers, num_pages, page_size, kv_heads, head_dim]``. A sequence's token at
position p lives in page ``block_table[p // page_size]``, row ``p % page_size``. Page 0 is the null page: it is
never handed out, and unused block-table entries point at it (it is read only by masked-out positions).

An int8 pool (`init_pages(..., dtype="int8")`) stores int8 k/v pages plus float32 scale pages k_scale, v_scale
``[layers, num_pages, kv_heads, page_size]`` (one scale per token and kv head, `kv_quant`): `paged_extend`
quantizes each new key/value as it writes it, and `kernels.paged_attention` applies the scales after its dots.
`page_bytes` counts the scales, so a byte budget holds 1.94x the tokens of a bf16 pool (3.9x float32).

Host side (`PagePool`): a free list, a reference count per page, and the prefix cache. A full page of a prompt is
named by a chain hash of token ids (`page_digests`: sha256 of the previous page's digest and this page's ids, so a
digest names the whole prefix up to the page's end). Pages are shared read-only by every request whose prompt
starts with the same prefix (a sequence only writes positions after its shared prefix, into its own pages).
A cached page whose count drops to 0 stays cached but becomes evictable (least recently used first) when a new
page is needed and the free list is empty.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from phi4_jax.inference.kv_cache import decode_implementation
from phi4_jax.inference.kv_quant import SCALE_DTYPE, is_int8, quantize_kv
from phi4_jax.model import sharding
from phi4_jax.model.config import Phi4Config
from phi4_jax.model.decoder import decoder_block, embed_tokens, logits_from_hidden, rms_norm, rope

PAGE_AXES = ("layers", "kv_pages", "page_rows", "kv_heads", "head_dim")
SCALE_AXES = ("layers", "kv_pages", "kv_heads", "page_rows")
NULL_PAGE = 0


class PagedKV(NamedTuple):
    """Keys and values of every layer in pages, and their scales when the pages are int8 (else None); see the
    module docstring for the layout."""
    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


def page_bytes(config: Phi4Config, page_size: int, dtype=None) -> int:
    """Bytes of one page of k and v over all layers (with an int8 pool's scales)."""
    dtype = jnp.dtype(dtype or config.compute_dtype)
    per_token = config.num_kv_heads * (config.head_dim * dtype.itemsize
                                       + (jnp.dtype(SCALE_DTYPE).itemsize if is_int8(dtype) else 0))
    return 2 * config.num_layers * page_size * per_token


def init_pages(config: Phi4Config, num_pages: int, page_size: int, dtype=None) -> PagedKV:
    """A zeroed page pool, int8 with scale pages for dtype "int8" (call inside jit / an activation_sharding
    context to get it sharded)."""
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.compute_dtype)
    zeros = lambda shape, dtype, axes: sharding.constrain(jnp.zeros(shape, dtype), axes)  # noqa: E731
    pages = PagedKV(zeros(shape, dtype, PAGE_AXES), zeros(shape, dtype, PAGE_AXES))
    if is_int8(dtype):
        scale_shape = (config.num_layers, num_pages, config.num_kv_heads, page_size)
        pages = pages._replace(k_scale=zeros(scale_shape, SCALE_DTYPE, SCALE_AXES),
                               v_scale=zeros(scale_shape, SCALE_DTYPE, SCALE_AXES))
    return pages


def write_pages(pages: PagedKV, layer, page, row, k, v) -> PagedKV:
    """Layer `layer`'s pool with keys/values k, v [B, T, Hkv, D] written at (page, row) [B, T] (entries with
    page == num_pages are dropped); an int8 pool gets them quantized (`kv_quant.quantize_kv`) with their scales."""
    if pages.k_scale is None:
        return PagedKV(pages.k.at[layer, page, row].set(k.astype(pages.k.dtype), mode="drop"),
                       pages.v.at[layer, page, row].set(v.astype(pages.v.dtype), mode="drop"))
    (k_codes, k_scale), (v_codes, v_scale) = quantize_kv(k), quantize_kv(v)
    at_scale = (layer, page, slice(None), row)        # [B, T] indices around the heads axis: values [B, T, Hkv]
    return PagedKV(pages.k.at[layer, page, row].set(k_codes, mode="drop"),
                   pages.v.at[layer, page, row].set(v_codes, mode="drop"),
                   pages.k_scale.at[at_scale].set(k_scale, mode="drop"),
                   pages.v_scale.at[at_scale].set(v_scale, mode="drop"))


def paged_implementation(config: Phi4Config) -> str | None:
    """`kernels.paged_attention`'s implementation: the Pallas GPU (Triton) kernel for attention_impl "pallas_gpu";
    otherwise as `kv_cache.decode_implementation` chooses for the dense cache (the Pallas TPU kernel for
    "pallas_tpu", the kernels' own default for None, else XLA). On a mesh a Pallas kernel runs in shard_map
    (`attend_pages`)."""
    if config.attention_impl == "pallas_gpu":
        return "pallas_gpu"
    return decode_implementation(config)


def paged_write_targets(tokens, start, n_new, block_tables, page_size: int, num_pages: int):
    """(positions, page, row), each [B, T], of right-padded new tokens [B, T] fed after start[b] positions: token t
    of sequence b sits at position start[b] + t, in page block_tables[b, position // page_size], row position %
    page_size; padding (t >= n_new[b]) gets page num_pages, out of range, so a scatter with mode="drop" skips it."""
    t = tokens.shape[1]
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]            # [B, T]
    real = jnp.arange(t, dtype=jnp.int32)[None] < n_new[:, None]
    page = jnp.take_along_axis(block_tables, positions // page_size, axis=1, mode="clip")
    return positions, jnp.where(real, page, num_pages), positions % page_size


def attend_pages(q, pool: PagedKV, block_tables, lengths, layer, config: Phi4Config):
    """`kernels.paged_attention` over the pool (with its scales when it is int8) at `paged_implementation(config)`:
    on an active mesh through `kernels.sharded_paged_attention` (kv heads split as the rules table lays out the
    pool) where `sharding.sharded_paged_args` says so, else a plain call."""
    implementation = paged_implementation(config)
    kwargs = {"k_scales": pool.k_scale, "v_scales": pool.v_scale, "layer": layer, "implementation": implementation,
              "interpret": config.kernel_interpret}
    shard = sharding.sharded_paged_args(implementation, PAGE_AXES)
    if shard is not None:
        return kernels.sharded_paged_attention(q, pool.k, pool.v, block_tables, lengths, **kwargs, **shard)
    return kernels.paged_attention(q, pool.k, pool.v, block_tables, lengths, **kwargs)


def paged_extend(params, pages: PagedKV, tokens, start, n_new, block_tables, config: Phi4Config,
                 return_hidden: bool = False):
    """Feeds tokens [B, T] after each sequence's first start[b] positions; returns (pages, logits [B, vocab]).

    Sequence b has n_new[b] real tokens (right-padded to T) at positions start[b] + t, whose keys/values are
    written into its pages (block_tables [B, W]; quantized with their scales in an int8 pool, `write_pages`);
    padding is not written. Queries attend with `kernels.paged_attention` (causal among the new tokens;
    implementation and mesh: `attend_pages`). The float32 logits are those at each sequence's last real new token
    (meaningless where n_new[b] = 0); with `return_hidden`, (pages, logits, every position's final-normed hidden
    state [B, T, E]). The layer math is the model's own `decoder_block`.
    """
    b, t = tokens.shape
    num_pages, page_size = pages.k.shape[1], pages.k.shape[2]
    q_dtype = config.compute_dtype if pages.k_scale is not None else pages.k.dtype
    positions, page, row = paged_write_targets(tokens, start, n_new, block_tables, page_size, num_pages)
    attend_lengths = start + t                                                     # query t sits at start + t
    x = embed_tokens(params, tokens, config)

    def body(carry, xs):
        x, pool = carry
        layer, i = xs

        def attend(q, k, v):
            q = rope(q, positions, config)
            k = rope(k, positions, config)
            new = write_pages(pool, i, page, row, k, v)
            out = attend_pages(q.astype(q_dtype), new, block_tables, attend_lengths, i, config)
            return out, new

        x, pool = decoder_block(layer, x, config, attend)
        return (x, pool), None

    layer_index = jnp.arange(config.num_layers)
    (x, pool), _ = jax.lax.scan(body, (x, pages), (params["layers"], layer_index))
    last = jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, None], axis=1)[:, 0]   # [B, E]
    h = rms_norm(last, params["final_norm"], config.rms_norm_eps)
    pages = PagedKV(sharding.constrain(pool.k, PAGE_AXES), sharding.constrain(pool.v, PAGE_AXES))
    if pool.k_scale is not None:
        pages = pages._replace(k_scale=sharding.constrain(pool.k_scale, SCALE_AXES),
                               v_scale=sharding.constrain(pool.v_scale, SCALE_AXES))
    logits = logits_from_hidden(params, h, config)
    if return_hidden:   # also every position's final-normed hidden state [B, T, E] (prompt logprobs)
        return pages, logits, rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return pages, logits


# ----------------------------------------------------------------------------- the host-side allocator

def page_digests(token_ids: Sequence[int], page_size: int, n_pages: int) -> list[bytes]:
    """Chain digests of the first n_pages full pages of token_ids (digest i names tokens 0 .. (i+1)*page_size-1)."""
    digests, prev = [], b""
    for i in range(n_pages):
        ids = np.asarray(token_ids[i * page_size:(i + 1) * page_size], np.int64)
        prev = hashlib.sha256(prev + ids.tobytes()).digest()
        digests.append(prev)
    return digests


class PagePool:
    """Page allocation with reference counts and a prefix cache (see the module docstring). Not thread-safe: the
    engine calls it under its own lock."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.free: deque[int] = deque(range(1, num_pages))          # page 0 is the null page
        self.refcount = np.zeros(num_pages, np.int64)
        self.digest_of: dict[int, bytes] = {}
        self.page_of: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()      # cached pages nobody holds, oldest first

    @property
    def pages_total(self) -> int:
        return self.num_pages - 1

    @property
    def pages_in_use(self) -> int:
        """Pages held by at least one request."""
        return self.pages_total - len(self.free) - len(self.evictable)

    @property
    def pages_cached(self) -> int:
        return len(self.page_of)

    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def _hold(self, page: int) -> None:
        if self.refcount[page] == 0:
            self.evictable.pop(page, None)
        self.refcount[page] += 1

    def match_prefix(self, digests: Sequence[bytes]) -> list[int]:
        """Takes a reference on the cached pages of the longest cached prefix of `digests`; returns them."""
        pages = []
        for digest in digests:
            page = self.page_of.get(digest)
            if page is None:
                break
            self._hold(page)
            pages.append(page)
        return pages

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (evicting least recently used cached pages when the free list runs out), or None (and
        nothing taken) when fewer than n are available."""
        if n > self.available():
            return None
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.evictable.popitem(last=False)
                del self.page_of[self.digest_of.pop(page)]
            self.refcount[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference from each page; a page nobody holds goes back to the free list, or, when it is in
        the prefix cache, to the evictable end of the LRU."""
        for page in pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if page in self.digest_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)

    def register(self, page: int, digest: bytes) -> None:
        """Puts a full page whose keys/values are written into the prefix cache under `digest` (a no-op when that
        prefix is cached already or the page is)."""
        if digest not in self.page_of and page not in self.digest_of:
            self.page_of[digest] = page
            self.digest_of[page] = digest

    def unregister(self, page: int) -> None:
        """Takes a page out of the prefix cache (its holder is about to overwrite part of it)."""
        digest = self.digest_of.pop(page, None)
        if digest is not None:
            del self.page_of[digest]
