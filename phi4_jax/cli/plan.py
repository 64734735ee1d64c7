"""`python -m phi4_jax.plan`: the ahead-of-time memory plan of the training step, from the command line.

    python -m phi4_jax.plan --model phi4-14b --mesh fsdp=8 --seq-len 16384 --global-batch 8
    python -m phi4_jax.plan --topology v5p:2x2x2 --model phi4-14b --mesh fsdp=8 --seq-len 16384 --global-batch 8
    python -m phi4_jax.plan --model phi4-14b --mesh fsdp=1 --seq-len 4096 --global-batch 1 --lora-rank 16  # LoRA SFT

See `phi4_jax.train.plan` for what is compiled and printed. Devices: with ``--topology`` the compile-only
devices of that TPU topology (the real TPU compiler from the `libtpu` wheel, on this CPU machine; JAX's own
backend stays the CPU); without it, when there are fewer real devices than the mesh needs, simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX starts its backend).

Exit status: 0 planned (and, for a TPU topology, fits); 2 bad input (mesh, model, topology, attention, no
libtpu); 3 does not fit: the TPU compiler refused the program for lack of HBM, or its planned peak (printed,
`peak_bytes_per_device` still last) exceeds the chip's HBM.
"""

from __future__ import annotations

import argparse
import os
import sys

from phi4_jax.train.plan import DoesNotFitError, PlanError, parse_mesh_size, plan


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
    p.add_argument("--topology", default=None,
                   help="compile for this TPU topology with the real TPU compiler, no TPU needed (libtpu; "
                        "e.g. v5p:2x2x2, v5p:4x4x4, v6e:2x4)")
    p.add_argument("--attention", default=None, choices=("xla", "pallas_tpu", "pallas_gpu", "cudnn"),
                   help="attention implementation to compile (default: what a run on those devices uses)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="plan LoRA SFT instead: adapters of this rank on q/k/v/o and gate/up/down, base frozen")
    p.add_argument("--lora-base-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the frozen base weights with --lora-rank (default bfloat16)")
    return p.parse_args(argv)


def _devices(args):
    """The devices to plan for: a TPU topology's compile-only devices, or None (JAX's, simulated if needed)."""
    if args.topology:
        if args.devices:
            raise PlanError("--devices simulates CPU devices; with --topology the topology sets the devices")
        # JAX's own backend stays the CPU (nothing runs); libtpu is loaded only to compile.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from phi4_jax.train.plan import tpu_topology_devices

        return tpu_topology_devices(args.topology)
    n = args.devices or parse_mesh_size(args.mesh) or 8
    if "=-1" in args.mesh.replace(" ", "") and not args.devices:
        n = max(n, 8)
    _ensure_devices(n)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    from kernels import AttentionConfigError
    from phi4_jax.model.config import ConfigError
    from phi4_jax.model.sharding import MeshError

    try:
        return plan(args, _devices(args), topology=args.topology)
    except DoesNotFitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (MeshError, ConfigError, PlanError, AttentionConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
