"""Ahead-of-time memory plan of the full training step for a model, mesh, sequence length and batch.

    python -m phi4_jax.plan --model phi4-14b --mesh fsdp=8 --seq-len 16384 --global-batch 8

Compiles the real train step (the one `train.py` runs: AdamW, clipping, accumulation, chunked loss, remat)
with abstract arrays (`jax.ShapeDtypeStruct` + shardings; no weights allocated) and prints the per-device
memory XLA plans for it (`compiled.memory_analysis()`): arguments, outputs, aliased (donated) bytes,
temporaries. The last line is ``peak_bytes_per_device=N`` with N = arguments + outputs - aliased +
temporaries. When there are fewer real devices than the mesh needs, it simulates CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX starts its backend).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse_mesh_size(text: str) -> int:
    size = 1
    for part in filter(None, (p.strip() for p in text.split(","))):
        _, _, value = part.partition("=")
        try:
            n = int(value)
        except ValueError:
            return 0
        if n > 0:
            size *= n
    return size


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


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def plan(args) -> int:
    import jax
    import jax.numpy as jnp

    from phi4_jax import sharding
    from phi4_jax.config import get_preset
    from phi4_jax.optimizer import make_optimizer
    from phi4_jax.train_config import OptimizerConfig
    from phi4_jax.training import BATCH_KEYS, abstract_train_state, make_train_step, train_state_shardings

    changes = {"remat_policy": args.remat, "max_position_embeddings": max(args.seq_len, 1)}
    if args.rope_theta:
        changes["rope_theta"] = args.rope_theta
    config = get_preset(args.model, **changes)
    mesh_cfg = sharding.MeshConfig.parse(args.mesh)
    wanted = _parse_mesh_size(args.mesh)
    devices = jax.devices()
    if "=-1" not in args.mesh.replace(" ", "") and 0 < wanted < len(devices):
        devices = devices[:wanted]  # more devices than the mesh needs (e.g. XLA_FLAGS set elsewhere)
    mesh = sharding.build_mesh(mesh_cfg, devices=devices)
    sharding.validate_model_mesh(config, mesh)
    if args.global_batch % args.micro_batches:
        raise sharding.MeshError(f"--global-batch {args.global_batch} is not divisible by "
                                 f"--micro-batches {args.micro_batches}")
    sharding.validate_batch_mesh(mesh, args.global_batch // args.micro_batches, args.seq_len,
                                 what="micro-batch")
    tx, schedule = make_optimizer(OptimizerConfig(), config, total_steps=100_000)
    shardings = train_state_shardings(mesh, config, tx)
    step = make_train_step(config, tx, schedule, micro_batches=args.micro_batches,
                           loss_chunk=min(args.loss_chunk, args.seq_len), mesh=mesh, shardings=shardings)
    state = abstract_train_state(config, tx, shardings)
    batch = {k: jax.ShapeDtypeStruct((args.global_batch, args.seq_len), jnp.int32, sharding=shardings.batch)
             for k in BATCH_KEYS}
    print(f"model {args.model}: {config.num_params / 1e9:.2f}B params, {config.num_layers} layers | "
          f"mesh {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} devices | seq {args.seq_len} | "
          f"global batch {args.global_batch} x {args.micro_batches} micro-batches | remat {args.remat} | "
          f"loss chunk {min(args.loss_chunk, args.seq_len)}", flush=True)
    compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    args_b = int(mem.argument_size_in_bytes)
    out_b = int(mem.output_size_in_bytes)
    alias_b = int(mem.alias_size_in_bytes)
    temp_b = int(mem.temp_size_in_bytes)
    gen_b = int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
    peak = args_b + out_b - alias_b + temp_b
    print("per-device memory:")
    print(f"  arguments    {_gib(args_b)}  (train state shard + batch)")
    print(f"  outputs      {_gib(out_b)}")
    print(f"  aliased      {_gib(alias_b)}  (donated state reused for the outputs)")
    print(f"  temporaries  {_gib(temp_b)}  (activations, gradients, optimizer update)")
    if gen_b:
        print(f"  code         {_gib(gen_b)}")
    print(f"  peak         {_gib(peak)}")
    print(f"peak_bytes_per_device={peak}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    n = args.devices or _parse_mesh_size(args.mesh) or 8
    if "=-1" in args.mesh.replace(" ", "") and not args.devices:
        n = max(n, 8)
    _ensure_devices(n)
    from phi4_jax.config import ConfigError
    from phi4_jax.sharding import MeshError

    try:
        return plan(args)
    except (MeshError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
