"""JAX's persistent compilation cache for the serving and chat CLIs (`--compile-cache DIR`).

`use_compile_cache(path)` points JAX at a cache directory before anything compiles, so a restarted server or chat
loads its compiled programs from disk instead of compiling them again. Every program is cached, however small or
quick to compile (the thresholds are lowered to zero: on the CPU backend most engine programs compile in a second or
two, under JAX's default one-second threshold, and they are what a restart pays for).

Off unless asked for: JAX treats the cache directory as trusted code (whoever can write it can make this process run
what they put there), its entries are keyed by jax/jaxlib version, backend and flags so old ones pile up, and it is
unbounded by default; so the user chooses the directory. `--compile-cache` with no value takes
`default_compile_cache_dir()` (under the user's cache directory, $XDG_CACHE_HOME or ~/.cache), size-capped at
DEFAULT_MAX_BYTES (least recently used entries are evicted).
"""

from __future__ import annotations

import os
import tempfile

DEFAULT_MAX_BYTES = 4 << 30   # a few hundred of the 14B model's programs; the CPU engine's are ~1 MB each


class CompileCacheError(Exception):
    """A compilation cache directory that cannot be used (not a directory, cannot be created or written)."""


def default_compile_cache_dir() -> str:
    """$XDG_CACHE_HOME/phi4_jax/jax_compile (default ~/.cache/phi4_jax/jax_compile)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "phi4_jax", "jax_compile")


def _check_writable(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CompileCacheError(f"compile cache {path!r} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".phi4_jax_write_check"):
            pass
    except OSError as e:
        raise CompileCacheError(f"compile cache directory {path!r} cannot be written: "
                                f"{e.strerror or e.__class__.__name__}") from None
    return path


def use_compile_cache(path: str, max_bytes: int | None = None) -> str:
    """Turns on JAX's persistent compilation cache in `path` (created if missing) for this process, caching every
    program; `max_bytes` caps its size (None: unbounded). Returns the absolute path. Raises CompileCacheError (one
    line) when the directory cannot be created or written; nothing is changed then. Call it before the first
    compilation: JAX opens its cache once per process."""
    path = _check_writable(path)
    import jax

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)   # no size floor, and none set for us
    jax.config.update("jax_compilation_cache_max_size", -1 if max_bytes is None else int(max_bytes))
    jax.config.update("jax_compilation_cache_dir", path)
    return path
