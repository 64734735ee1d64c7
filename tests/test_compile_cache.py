"""Start-up compiling: `compile_ahead` (programs compiled concurrently without running) and `--compile-cache` (JAX's
persistent compilation cache) for `python -m phi4_jax.chat` / `python -m phi4_jax.serve`.

The cache is tested through the real chat CLI in subprocesses (JAX opens its cache once per process, so a second
start must be a new process): the second start with the same cache directory compiles nothing (JAX's own persistent-
cache miss log lines and the cache's entries, counted) and answers what transformers' greedy generate answers.
(That the engine's warmed-up programs are the ones its requests run: tests/test_batching.py's no-recompilation tests.)
"""

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_events import BACKEND_COMPILE, recorded_compiles
from test_chat_cli import ENV, ROOT, SYSTEM, make_chat_checkpoint

import phi4_jax
from phi4_jax.inference.compile_ahead import compile_ahead

PROMPT = "Hello! Who are you?"
NEW = 16
MISS = "PERSISTENT COMPILATION CACHE MISS"      # JAX's log line for a compile the cache did not hold


def test_compile_ahead_compiles_on_threads_without_running_and_later_calls_reuse_it():
    """Three shapes of a function that donates its input: compiled off the caller's thread, the donated array is
    untouched (nothing ran), and calling the function afterwards with those shapes compiles nothing."""

    def add_and_double(pool, x):
        return pool + x.sum(), x * 2

    step = jax.jit(add_and_double, donate_argnums=0)
    pool = jnp.zeros((4,), jnp.float32)
    inputs = [np.ones((n, 3), np.float32) for n in (1, 2, 4)]
    threads = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE and "add_and_double" in kwargs.get("fun_name", ""):
            threads.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        compiled = compile_ahead(step, [((pool, x), {}) for x in inputs], workers=2)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiled) == 3 and len(threads) == 3
    assert all(name.startswith("compile") for name in threads), threads     # the pool's threads, not this one
    assert not pool.is_deleted()                                            # nothing ran (no donation happened)
    with recorded_compiles() as compiles:
        for x in inputs:
            pool, doubled = step(pool, x)
            np.testing.assert_array_equal(doubled, 2 * x)
    assert compiles == []
    np.testing.assert_allclose(pool, np.full(4, 3 + 6 + 12, np.float32))


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile_cache")
    return make_chat_checkpoint(root), root / "hf"


def transformers_answer(hf_dir) -> str:
    """The chat CLI's answer as transformers' greedy generate gives it: the new tokens up to <|im_end|>, decoded."""
    import torch
    from transformers import Phi3ForCausalLM

    tokenizer = phi4_jax.Tokenizer()
    prompt = tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
                                   add_generation_prompt=True)
    hf = Phi3ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=100265,
                          pad_token_id=100349)
    new = out[0, len(prompt):].tolist()
    return tokenizer.decode(new[:new.index(100265)] if 100265 in new else new)


def chat_with_cache(checkpoint, cache_dir):
    proc = subprocess.run([sys.executable, "-m", "phi4_jax.chat", "--checkpoint", str(checkpoint), "--system",
                           SYSTEM, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--compile-cache",
                           str(cache_dir)], cwd=ROOT, env={**ENV, "JAX_EXPLAIN_CACHE_MISSES": "1"},
                          capture_output=True, timeout=300)
    stdout, stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, stderr


def cache_entries(cache_dir) -> set[str]:
    return {name for name in os.listdir(cache_dir) if name.endswith("-cache")}


def test_second_start_with_the_cache_compiles_nothing_and_answers_like_transformers(chat_checkpoint, tmp_path):
    checkpoint, hf_dir = chat_checkpoint
    cache_dir = tmp_path / "cache"
    first, log = chat_with_cache(checkpoint, cache_dir)
    entries = cache_entries(cache_dir)
    assert log.count(MISS) > 0 and len(entries) == log.count(MISS)   # each compile written to the cache
    second, log = chat_with_cache(checkpoint, cache_dir)
    assert log.count(MISS) == 0, log[-3000:]                           # nothing compiled ...
    assert cache_entries(cache_dir) == entries                         # ... so nothing new written
    want = transformers_answer(hf_dir)
    assert want and first == want and second == want


@pytest.mark.parametrize("cli", ["chat", "serve"])
def test_unusable_compile_cache_is_a_one_line_error(cli, tmp_path, capsys):
    from phi4_jax.cli import chat, serve

    main = {"chat": chat.main, "serve": serve.main}[cli]
    (tmp_path / "file").write_text("")
    for cache, problem in [(tmp_path / "file", "is not a directory"), (tmp_path / "file" / "sub", "cannot be written")]:
        assert main(["--checkpoint", str(tmp_path), "--compile-cache", str(cache)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: compile cache") and problem in err and str(cache) in err
        assert len(err.strip().splitlines()) == 1
    assert jax.config.jax_compilation_cache_dir is None      # nothing was changed
