"""Ahead-of-time memory plan of the full training step for a model, mesh, sequence length and batch.

Compiles the real train step (the one `train.py` runs: AdamW, clipping, accumulation, chunked loss, remat)
with abstract arrays (`jax.ShapeDtypeStruct` + shardings; no weights allocated) and prints the per-device
memory XLA plans for it (`compiled.memory_analysis()`): arguments, outputs, aliased (donated) bytes,
temporaries. The last line is ``peak_bytes_per_device=N`` with N = arguments + outputs - aliased +
temporaries.
"""

from __future__ import annotations




def parse_mesh_size(text: str) -> int:
    """The product of the positive sizes in a mesh spec like "data=2,fsdp=4" (0 if a size is not a number)."""
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


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def plan(args) -> int:
    import jax
    import jax.numpy as jnp

    from phi4_jax.model import sharding
    from phi4_jax.model.config import get_preset
    from phi4_jax.train.optimizer import make_optimizer
    from phi4_jax.train.config import OptimizerConfig
    from phi4_jax.train.step import BATCH_KEYS, abstract_train_state, make_train_step, train_state_shardings

    changes = {"remat_policy": args.remat, "max_position_embeddings": max(args.seq_len, 1)}
    if args.rope_theta:
        changes["rope_theta"] = args.rope_theta
    config = get_preset(args.model, **changes)
    mesh_cfg = sharding.MeshConfig.parse(args.mesh)
    wanted = parse_mesh_size(args.mesh)
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
