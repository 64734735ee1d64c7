"""`python -m phi4_jax.plan`: the ahead-of-time memory plan of the training step, from the command line.

    python -m phi4_jax.plan --model phi4-14b --mesh fsdp=8 --seq-len 16384 --global-batch 8

See `phi4_jax.train.plan` for what is compiled and printed. When there are fewer real devices than the mesh
needs, it simulates CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX starts
its backend).
"""

from __future__ import annotations

import argparse
import os
import sys
from phi4_jax.train.plan import parse_mesh_size, plan


def _ensure_devices(n: int) -> None:
    """Simulate n CPU devices unless the backend is already up (then the real device count is used)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()
    if not os.environ.get("JAX_PLATFORMS"):
        # No accelerator claimed: plan on the simulated CPU devices.
        os.environ["JAX_PLATFORMS"] = "cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m phi4_jax.plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phi4-14b", help="model preset (phi4-14b, phi4-1.5b, demo, tiny)")
    p.add_argument("--mesh", default="fsdp=8", help="mesh sizes, e.g. fsdp=8 or data=4,fsdp=16,tensor=1")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--remat", default="full", help="remat policy (none, full, dots, dots_no_batch, attention_out)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per lm_head/loss chunk")
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--devices", type=int, default=None,
                   help="simulated device count (default: the mesh size, or 8 with a -1 axis)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    n = args.devices or parse_mesh_size(args.mesh) or 8
    if "=-1" in args.mesh.replace(" ", "") and not args.devices:
        n = max(n, 8)
    _ensure_devices(n)
    from phi4_jax.model.config import ConfigError
    from phi4_jax.model.sharding import MeshError

    try:
        return plan(args)
    except (MeshError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
