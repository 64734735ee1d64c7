"""Native CPU kernels for the serving engine's decode step: C++ through XLA's FFI (`jax.ffi`), built on first use.

Why: on the CPU backend a decode step is a few hundred small ops (products of 1-8 rows, a paged attention) and
XLA:CPU pays for each: its dots of a few rows reach a fraction of what the cores do, its bfloat16 dots of few rows
are slower than its float32 ones, and its paged attention must first gather every sequence's pages into a copy
(BENCHMARKS.md's Decode section has the profiles). The kernels here do those products and that attention directly:

- `packed_matmul(x, panels, n)`: y [M, n] float32 = x [M, K] . W for a weight packed once by `pack_matrix` into
  64-column panels [P, K, 64] (float32 or bfloat16 bits), each panel streamed contiguously once per 8 rows, the
  rows' sums in registers, panels split among the threads (matmul.cc);
- `paged_attention(q, k_pages, v_pages, block_tables, lengths, sm_scale=None)`: `kernels.paged_attention`'s
  contract read in place from the pages (no gathered copy), float32 or bfloat16-bits pages (paged_attention.cc);
- `argmax(x)`: jnp.argmax(x, axis=-1) of float32 [B, V] logits, the greedy token (XLA:CPU's argmax reads a 100K
  vocabulary at ~1 GB/s) (argmax.cc);
- `sampling_filter(x, top_k, top_p)`: the sampled rows' top-k and nucleus restriction of float32 [B, V] logits
  (`phi4_jax.inference.sampling`'s `top_k_mask` and `top_p_mask` definitions and threshold searches, each row's
  passes over its own cached copy instead of XLA's 31-32 reductions over [B, V]) (sampling_filter.cc).

Build: the first `load()` compiles every ``*.cc`` here with the system C++ compiler (``$CXX`` or g++/c++),
``-O3 -march=native`` against jaxlib's FFI headers (`jax.ffi.include_dir()`), into one shared library cached under
``$XDG_CACHE_HOME/phi4_jax/cpu_kernels/<key>/`` (default ~/.cache), the key hashing the sources, the compiler's
version, the flags, jax's and jaxlib's versions, the FFI header and this CPU's feature flags, so a changed source
or another machine builds its own (a few seconds, once); where that directory cannot be written, a per-user one
under the temporary directory. The library is written to a temporary file and renamed, so concurrent first uses
(pytest workers) never load a partial file. The kernels use XLA's own intra-op thread pool.

Nothing is required: when no compiler is found, the build fails, the CPU is not x86-64 or aarch64, or
``PHI4_JAX_NATIVE_CPU=0`` is set, `available()` is False, `unavailable_reason()`
says why (logged once as a warning, except when disabled on purpose), and callers keep their XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "phi4_cpu_kernels.so"
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")
DISABLE_ENV = "PHI4_JAX_NATIVE_CPU"
PANEL = 64                      # columns per packed panel (matmul.cc's kPanel)
# FFI target name -> the handler symbol the library exports.
TARGETS = {"phi4_cpu_packed_matmul": "Phi4CpuPackedMatmul",
           "phi4_cpu_paged_attention": "Phi4CpuPagedAttention",
           "phi4_cpu_argmax": "Phi4CpuArgmax",
           "phi4_cpu_sampling_filter": "Phi4CpuSamplingFilter"}

_lock = threading.Lock()
_state: dict = {}               # "ok": bool, "reason": str | None, "path": Path | None, "targets": set[str]


class NativeKernelError(RuntimeError):
    """A native CPU kernel called while the library is unavailable, or called with arguments it cannot take."""


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cc")) + sorted(SOURCE_DIR.glob("*.h"))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_root() -> Path:
    """$XDG_CACHE_HOME/phi4_jax/cpu_kernels (default ~/.cache/phi4_jax/cpu_kernels)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "phi4_jax" / "cpu_kernels"


def _build_key(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    h = hashlib.sha256()
    ffi_header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "ffi.h"
    header = ffi_header.read_bytes() if ffi_header.exists() else b""
    for part in (version, " ".join(CXX_FLAGS), jax.ffi.include_dir(), jax.__version__,
                 getattr(jaxlib, "__version__", ""), _cpu_flags(), platform.machine()):
        h.update(part.encode() + b"\0")
    h.update(header)
    for src in _sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _build() -> Path:
    """The shared library's path, compiled if not cached (raises NativeKernelError with the compiler's output)."""
    cxx = _compiler()
    if cxx is None:
        raise NativeKernelError("no C++ compiler found ($CXX, g++, c++ or clang++)")
    key = _build_key(cxx)
    roots = [cache_root(), Path(tempfile.gettempdir()) / f"phi4_jax-{os.getuid()}" / "cpu_kernels"]
    for root in roots:
        if (root / key / LIBRARY_NAME).exists():
            return root / key / LIBRARY_NAME
    errors = []
    for root in roots:    # the user's cache directory, else (read-only home) a per-user temporary one
        target_dir = root / key
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            if os.access(target_dir, os.W_OK):
                break
            errors.append(f"{target_dir}: not writable")
        except OSError as e:
            errors.append(f"{target_dir}: {e}")
    else:
        raise NativeKernelError(f"no writable kernel cache directory: {'; '.join(errors)}")
    lib = target_dir / LIBRARY_NAME
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target_dir)
    os.close(fd)
    cmd = [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, sorted(SOURCE_DIR.glob("*.cc"))), "-o", tmp]
    log.info("building the native CPU kernels: %s", " ".join(cmd))
    # once per machine and source, ~10-20 s on 2 cores: say so rather than pause silently
    print(f"phi4_jax: building the native CPU kernels into {target_dir} (once) ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        Path(tmp).unlink(missing_ok=True)
        raise NativeKernelError(f"the C++ compiler could not run: {e}") from e
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise NativeKernelError(f"compiling the native CPU kernels failed ({' '.join(cmd)}):\n{tail}")
    os.replace(tmp, lib)
    return lib


def disabled_on_purpose() -> bool:
    """Whether ``PHI4_JAX_NATIVE_CPU`` turns the kernels off (0, false, no, off)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def load() -> bool:
    """Builds (once per source/compiler/CPU, cached on disk) and registers the kernels; True when they can be used.
    Thread-safe; later calls return the first call's answer."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        _state.update(ok=False, reason=None, path=None, targets=set())
        if disabled_on_purpose():
            _state["reason"] = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
            return False
        if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
            _state["reason"] = f"no native CPU kernels for {platform.machine()}"
            log.warning("native CPU kernels unavailable (%s); using XLA's ops", _state["reason"])
            return False
        try:
            path = _build()
            lib = ctypes.cdll.LoadLibrary(str(path))
            for name, symbol in TARGETS.items():
                if hasattr(lib, symbol):
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                    _state["targets"].add(name)
        except (NativeKernelError, OSError, subprocess.SubprocessError) as e:
            _state["reason"] = str(e)
            log.warning("native CPU kernels unavailable; using XLA's ops: %s", e)
            return False
        _state.update(ok=True, path=path)
        return True


def available(target: str | None = None) -> bool:
    """Whether the kernels (or the one FFI `target`) can be used in this process (builds them on first call)."""
    return load() and (target is None or target in _state["targets"])


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    load()
    return _state["reason"]


def library_path() -> Path | None:
    """The loaded shared library (None when unavailable)."""
    load()
    return _state["path"]


def _require(target: str) -> None:
    if not available(target):
        raise NativeKernelError(f"native CPU kernel {target!r} unavailable: "
                                f"{unavailable_reason() or 'not in the built library'}")


def pack_matrix(w):
    """W [K, N] (float32, or bfloat16) -> panels [ceil(N / 64), K, 64] for `packed_matmul`: float32 stays float32,
    bfloat16 becomes its uint16 bits. Columns past N are zero. Traceable (runs under jit)."""
    if w.ndim != 2:
        raise NativeKernelError(f"pack_matrix takes a [K, N] matrix, got shape {tuple(w.shape)}")
    dtype = jnp.dtype(w.dtype)
    if dtype == jnp.bfloat16:
        w = jax.lax.bitcast_convert_type(w, jnp.uint16)
    elif dtype != jnp.float32:
        raise NativeKernelError(f"pack_matrix takes float32 or bfloat16 weights, got {dtype}")
    k, n = w.shape
    p = -(-n // PANEL)
    w = jnp.pad(w, ((0, 0), (0, p * PANEL - n)))
    return jnp.transpose(w.reshape(k, p, PANEL), (1, 0, 2))


def packed_matmul(x, panels, n: int):
    """x [M, K] float32 . W -> [M, n] float32, for W packed by `pack_matrix` (float32 or bfloat16 bits); every
    product and sum in float32 (bfloat16 weights widened exactly)."""
    _require("phi4_cpu_packed_matmul")
    if x.ndim != 2 or panels.ndim != 3 or panels.shape[1] != x.shape[1] or panels.shape[2] != PANEL:
        raise NativeKernelError(f"packed_matmul: x must be [M, K] and panels [P, K, {PANEL}]; got x "
                                f"{tuple(x.shape)}, panels {tuple(panels.shape)}")
    if panels.shape[0] != -(-n // PANEL):
        raise NativeKernelError(f"packed_matmul: {panels.shape[0]} panels do not hold {n} columns")
    if jnp.dtype(panels.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.uint16)):
        raise NativeKernelError(f"packed_matmul: panels must be float32 or uint16 (bfloat16 bits), got "
                                f"{panels.dtype}")
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call("phi4_cpu_packed_matmul", out)(x.astype(jnp.float32), panels)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale=None):
    """`kernels.paged_attention`'s contract for one layer's pool, read in place (paged_attention.cc): q [B, T, Hq, D]
    (any float dtype, read as float32), k_pages and v_pages [num_pages, page_size, Hkv, D] float32 or uint16
    (bfloat16 bits), block_tables [B, W] and lengths [B] integer (int32 in the kernel) -> [B, T, Hq, D] float32.
    Softmax and sums in float32; D must be a multiple of 16. Page ids outside the pool are clamped into it; a row
    that sees no position (lengths[b] < T, outside the contract) comes out as zeros."""
    _require("phi4_cpu_paged_attention")
    shapes = (f"q {tuple(q.shape)}, k_pages {tuple(k_pages.shape)}, v_pages {tuple(v_pages.shape)}, "
              f"block_tables {tuple(block_tables.shape)}, lengths {tuple(lengths.shape)}")
    if q.ndim != 4 or k_pages.ndim != 4:
        raise NativeKernelError(f"paged_attention: q must be [batch, new_tokens, heads, head_dim] and the pages "
                                f"[num_pages, page_size, kv_heads, head_dim]; got {shapes}")
    if tuple(k_pages.shape) != tuple(v_pages.shape) or jnp.dtype(k_pages.dtype) != jnp.dtype(v_pages.dtype):
        raise NativeKernelError(f"paged_attention: k_pages and v_pages differ: {k_pages.dtype}"
                                f"{list(k_pages.shape)} vs {v_pages.dtype}{list(v_pages.shape)}")
    if jnp.dtype(k_pages.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.uint16)):
        raise NativeKernelError(f"paged_attention: pages must be float32 or uint16 (bfloat16 bits: "
                                f"jax.lax.bitcast_convert_type(pages, jnp.uint16)), got {k_pages.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise NativeKernelError(f"paged_attention: q must be a float array, got {q.dtype}")
    b, _, hq, d = q.shape
    num_pages, page_size, hkv, kd = k_pages.shape
    if kd != d:
        raise NativeKernelError(f"paged_attention: q and the pages disagree in head_dim: {shapes}")
    if d % 16:
        raise NativeKernelError(f"paged_attention: head_dim must be a multiple of 16, got {d}")
    if hkv < 1 or hq % hkv:
        raise NativeKernelError(f"paged_attention: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if num_pages < 1 or page_size < 1:
        raise NativeKernelError(f"paged_attention: the page pool is empty: k_pages {tuple(k_pages.shape)}")
    for name, a, want in (("block_tables", block_tables, 2), ("lengths", lengths, 1)):
        if a.ndim != want or a.shape[0] != b or not jnp.issubdtype(a.dtype, jnp.integer):
            raise NativeKernelError(f"paged_attention: {name} must be integer with {want} dims and batch {b} "
                                    f"first, got {a.dtype}{list(a.shape)}")
    if block_tables.shape[1] < 1:
        raise NativeKernelError(f"paged_attention: block_tables must hold at least one page per sequence, got "
                                f"{list(block_tables.shape)}")
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    out = jax.ShapeDtypeStruct(tuple(q.shape), jnp.float32)
    return jax.ffi.ffi_call("phi4_cpu_paged_attention", out)(
        q.astype(jnp.float32), k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        sm_scale=np.float32(scale))


def argmax(x):
    """jnp.argmax(x, axis=-1).astype(int32) for float32 x [B, V] (the first index of the largest value, or of the
    first NaN in a row that has one)."""
    _require("phi4_cpu_argmax")
    if x.ndim != 2 or x.shape[1] < 1 or jnp.dtype(x.dtype) != jnp.float32:
        raise NativeKernelError(f"argmax takes float32 [B, V] with V >= 1, got {x.dtype}{list(x.shape)}")
    return jax.ffi.ffi_call("phi4_cpu_argmax", jax.ShapeDtypeStruct(x.shape[:1], jnp.int32),
                            vmap_method="sequential")(x)


def sampling_filter(x, top_k, top_p):
    """float32 logits x [B, V] with each row b restricted to its top_k[b] largest values (0 or >= V: all; ties with
    the k-th largest kept) and then to the nucleus of mass top_p[b] of the rest (>= 1: all); other entries -inf.
    `sampling.top_k_mask`'s answer exactly; `sampling.top_p_mask`'s up to rounding-level ties with top_p (its own
    float32 softmax and sums), except a row holding +inf, kept whole here (XLA's softmax makes it NaN)."""
    _require("phi4_cpu_sampling_filter")
    if x.ndim != 2 or x.shape[1] < 1 or jnp.dtype(x.dtype) != jnp.float32:
        raise NativeKernelError(f"sampling_filter takes float32 [B, V] with V >= 1, got {x.dtype}{list(x.shape)}")
    rows = x.shape[:1]
    if tuple(jnp.shape(top_k)) != rows or tuple(jnp.shape(top_p)) != rows:
        raise NativeKernelError(f"sampling_filter takes top_k and top_p of shape {rows}, got "
                                f"{tuple(jnp.shape(top_k))} and {tuple(jnp.shape(top_p))}")
    return jax.ffi.ffi_call("phi4_cpu_sampling_filter", jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            vmap_method="sequential")(
        x, jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))


__all__ = ["NativeKernelError", "PANEL", "argmax", "available", "cache_root", "disabled_on_purpose", "library_path",
           "load", "pack_matrix", "packed_matmul", "paged_attention", "sampling_filter", "unavailable_reason"]
