"""Training MFU of a ~1.5B Phi-4-shaped model (preset "phi4-1.5b") at sequence length 4096 on one device.

    python bench/train_mfu.py --json OUT.json                    # on an H100/H200
    python bench/train_mfu.py --smoke --json OUT.json            # tiny model on CPU, same code path
    python bench/train_mfu.py --candidates dots:4 none:2 --peak-tflops 989.4

The train step is the project's own (`phi4_jax.train.step.make_train_step`: fp32 master weights, bf16
compute, AdamW, chunked fp32 loss) on a one-device mesh, fed random token ids (one document per row).
Each candidate "REMAT:BATCH" is compiled ahead of time; the first whose compiled peak memory fits the
device's memory limit is run (on a CPU, the first). After `--warmup` steps, `--steps` steps are timed one by
one (each ended by `block_until_ready`) and the median step time is used:

    MFU = model FLOPs per step / (median step time * peak FLOP/s of the device)

Model FLOPs per token (`phi4_jax.train.mfu.training_flops_per_token`) = 6 x matmul parameters + causal
attention 6 * L * Hq * D * S; remat recomputation is not counted (it is overhead, not model work).
Peak: `--peak-tflops`, else the device kind (H100/H200 SXM bf16 dense 989.4 TFLOP/s, H100 PCIe 756,
H100 NVL 835.5; others from `phi4_jax.train.mfu.PEAK_FLOPS`); unknown (a CPU) leaves MFU empty.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench._report import write_json  # noqa: E402
from phi4_jax.model import sharding  # noqa: E402
from phi4_jax.model.config import get_preset  # noqa: E402
from phi4_jax.train.config import OptimizerConfig  # noqa: E402
from phi4_jax.train.mfu import peak_flops_per_device, training_flops_per_token  # noqa: E402
from phi4_jax.train.optimizer import make_optimizer  # noqa: E402
from phi4_jax.train.step import (  # noqa: E402
    BATCH_KEYS,
    abstract_train_state,
    create_train_state,
    make_train_step,
    train_state_shardings,
)

# Dense bf16 tensor-core peaks (NVIDIA data sheets), most specific name first.
GPU_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835.5e12), ("H200", 989.4e12), ("H100", 989.4e12),
                  ("H800", 989.4e12))


class MFUBenchError(RuntimeError):
    """No candidate configuration fits, or an argument is malformed."""


def peak_flops(device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = getattr(device, "device_kind", "") or ""
    for name, flops in GPU_PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return peak_flops_per_device(device)


def parse_candidate(text: str) -> tuple[str, int]:
    remat, sep, batch = text.partition(":")
    if not sep or not batch.isdigit() or int(batch) < 1:
        raise MFUBenchError(f"candidate {text!r} must look like REMAT:BATCH, e.g. dots:4")
    return remat, int(batch)


def random_batch(batch: int, seq: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def compiled_peak_bytes(compiled) -> int | None:
    try:
        mem = compiled.memory_analysis()
        return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                   + mem.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 (not every backend reports memory)
        return None


def device_memory_limit(device) -> int | None:
    try:
        return int((device.memory_stats() or {}).get("bytes_limit")) or None
    except Exception:  # noqa: BLE001
        return None


def run(args) -> dict:
    device = jax.devices()[0]
    mesh = sharding.build_mesh(sharding.MeshConfig(fsdp=1), devices=[device])
    limit = device_memory_limit(device)
    tried = []
    for remat, batch in [parse_candidate(c) for c in args.candidates]:
        config = get_preset(args.model, remat_policy=remat, max_position_embeddings=max(args.seq, 1),
                            **({"attention_impl": args.attention} if args.attention else {}),
                            **({"compute_dtype": "bfloat16"} if args.smoke else {}))
        tx, schedule = make_optimizer(OptimizerConfig(warmup_steps=10), config, total_steps=1000)
        shardings = train_state_shardings(mesh, config, tx)
        step = make_train_step(config, tx, schedule, micro_batches=1, loss_chunk=min(args.loss_chunk, args.seq),
                               mesh=mesh, shardings=shardings)
        abstract_batch = {k: jax.ShapeDtypeStruct((batch, args.seq), jnp.int32, sharding=shardings.batch)
                          for k in BATCH_KEYS}
        t0 = time.perf_counter()
        compiled = step.lower(abstract_train_state(config, tx, shardings), abstract_batch).compile()
        compile_s = time.perf_counter() - t0
        peak = compiled_peak_bytes(compiled)
        tried.append({"remat": remat, "batch": batch, "compiled_peak_bytes": peak, "compile_s": compile_s})
        print(f"{remat}:{batch} compiled in {compile_s:.1f} s, peak "
              f"{peak / 2**30 if peak else float('nan'):.2f} GiB", flush=True)
        if limit and peak and peak > 0.97 * limit:
            print(f"{remat}:{batch} needs {peak / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB; next candidate",
                  flush=True)
            continue
        break
    else:
        raise MFUBenchError(f"no candidate fits in {limit} bytes: {tried}")
    state = create_train_state(config, tx, shardings, jax.random.key(0))
    batch_arrays = {k: jax.device_put(v, shardings.batch)
                    for k, v in random_batch(batch, args.seq, config.vocab_size, 0).items()}

    times, losses = [], []
    for i in tqdm(range(args.warmup + args.steps), desc=f"train steps ({remat}:{batch})", unit="step"):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        loss = float(jax.block_until_ready(metrics["loss"]))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    if not all(np.isfinite(losses)):
        raise MFUBenchError(f"non-finite loss during the benchmark: {losses}")
    step_s = statistics.median(times)
    tokens = batch * args.seq
    flops_token = training_flops_per_token(config, args.seq)
    achieved = flops_token * tokens / step_s
    peak_fl = peak_flops(device, args.peak_tflops)
    return {
        "model": args.model, "num_params": config.num_params, "seq": args.seq, "batch": batch, "remat": remat,
        "attention_impl": config.attention_impl or "default", "compute_dtype": config.compute_dtype,
        "device": f"{device.platform}: {device.device_kind}", "jax_version": jax.__version__,
        "compile_s": compile_s, "compiled_peak_bytes": peak, "device_memory_limit": limit, "tried": tried,
        "step_times_s": times, "median_step_s": step_s, "tokens_per_s": tokens / step_s,
        "flops_per_token": flops_token, "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_fl / 1e12 if peak_fl else None, "mfu": achieved / peak_fl if peak_fl else None,
        "first_loss": losses[0], "last_loss": losses[-1], "smoke": args.smoke,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, short sequence (CPU)")
    p.add_argument("--model", default="phi4-1.5b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--candidates", nargs="+", default=["dots_no_batch:4", "dots_no_batch:2", "full:4"],
                   help="REMAT:BATCH configurations, tried in order until one fits the device memory")
    p.add_argument("--attention", default=None, help="attention implementation (default: best for the device)")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of one device")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq, args.candidates = "tiny", 64, ["none:2"]
        args.warmup, args.steps, args.loss_chunk = 1, 2, 32
    try:
        result = run(args)
    except MFUBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (unknown peak)"
    print(f"{result['model']} seq {result['seq']} batch {result['batch']} remat {result['remat']}: "
          f"{1e3 * result['median_step_s']:.1f} ms/step, {result['tokens_per_s']:.0f} tokens/s, "
          f"{result['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
