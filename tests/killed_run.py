"""`python train.py` in a subprocess, optionally SIGKILLed by itself as it starts a given step: the tests of exact
resume after a real kill (tests/test_gcs_workdir.py, tests/test_posttrain_resume.py) run it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py's main, with the jitted step wrapped so that the process SIGKILLs itself as it starts step K (argv[1]):
# steps 1..K-1 ran and their due checkpoints were started (the last possibly still being written), nothing ran
# past that.
_KILLED_AT_STEP = """
import os, signal, sys
from phi4_jax.train import loop
kill_at, real = int(sys.argv.pop(1)), loop.make_train_step
def make(*args, **kwargs):
    step, calls = real(*args, **kwargs), [0]
    def wrapped(state, batch):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(state, batch)
    return wrapped
loop.make_train_step = make
from phi4_jax.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def run_train(args: list[str], env: dict | None = None, *, kill_at_step: int | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py ARGS` from the repository root with `env` added to this environment (output captured);
    with `kill_at_step`, SIGKILLed as that step starts (its returncode is then -9)."""
    cmd = ["-c", _KILLED_AT_STEP, str(kill_at_step)] if kill_at_step else ["train.py"]
    return subprocess.run([sys.executable, *cmd, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
