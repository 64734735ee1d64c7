"""Does the TPU compiler read each quantized weight byte once in a decode matmul? Its own plan, no TPU needed.

    python bench/quant_tpu_matmul.py                          # v5e and v5p, int8 / int4, batch 1 / 8 / 64
    python bench/quant_tpu_matmul.py --write BENCHMARKS.md    # also the table in the "Quantized inference" section
    python bench/quant_tpu_matmul.py --decode-step            # also phi-4 14B's decode step (minutes more)

The product is phi-4's gate projection, x [B, 5120] bf16 times W [5120, 17920] stored as `QuantizedWeight`
(int8 with one bf16 scale per output channel, or int4 packed two per byte with a bf16 scale per group of 128:
`load_model(..., quantize=...)`'s defaults), compiled with libtpu for the first chip of `--topologies`:

- "XLA": `QuantizedWeight.linear_einsum` as the model calls it (that matrix has more values than
  `MAX_DEQUANTIZED_VALUES`, so our code multiplies it in `lax.map` slices of rows: a loop);
- "kernel": `kernels.dequant_matmul` (Pallas, compiled by Mosaic);
- "bf16 peer": the same product with a bf16 W, as XLA compiles it: how close XLA gets to its ideal with no
  dequantization in the way;
- "layer scan" rows: the product for 40 stacked layers inside `lax.scan`, as the decode step runs it: XLA on the
  scan's slices, the kernel on the scan's slices, and the kernel given the stacked weights and the layer index;
- with `--decode-step`: phi-4 14B's whole jitted decode step, with XLA matmuls, the kernel for the lm_head, and
  the kernel for every matrix (`use_dequant_kernel(..., layers=True)`).

Columns. *ideal* = the bytes that must move: the weight's stored bytes + its scales + x + the output.
*HBM bytes* = what the optimized HLO moves to or from HBM: every top-level instruction's operands and results
that live in HBM (memory space 0; the compiler puts some intermediates in VMEM, memory space 1, and those are not
counted), with the layout's tile padding, loop bodies times their trip counts, dynamic slices and in-place
updates counted by the bytes they touch (`hbm_bytes`); a Mosaic kernel counts each operand once (its BlockSpecs
fetch each block once; see kernels/dequant_matmul.py), and with the layer index one layer's share of the
stacked operands (by the kernel's construction: the HLO cannot show it). *XLA bytes accessed* =
`compiled.cost_analysis()` (none for a custom call, and it counts a loop body once, so only loop-free rows have
it). *temporaries* = `memory_analysis()` (HBM). *weight-sized intermediates* = results of top-level instructions
(loop bodies included; in-place updates not) with at least a quarter as many elements as the (sliced) weight has
values: a dequantized, unpacked or broadcast copy that the matmul reads instead of the stored bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench._report import publish, run_heading  # noqa: E402

K_IN, N_OUT = 5120, 17920
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "s4": 1, "u4": 1}
NOT_MEMORY_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
                  "after-all", "copy-done", "partition-id", "replica-id", "opt-barrier", "iota"}
HBM, VMEM = 0, 1


# ----------------------------------------------------------------------------- reading optimized TPU HLO

@dataclasses.dataclass(frozen=True)
class Buffer:
    dtype: str
    shape: tuple[int, ...]
    memory_space: int          # 0 = HBM, 1 = VMEM (TPU), others: SMEM, semaphores
    padded_bytes: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        where = {HBM: "HBM", VMEM: "VMEM"}.get(self.memory_space, f"S({self.memory_space})")
        return f"{self.dtype}[{','.join(map(str, self.shape))}] in {where}"


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    results: tuple[Buffer, ...]
    operands: tuple[str, ...]
    text: str


def _parse_buffers(type_text: str) -> tuple[Buffer, ...]:
    """`bf16[4,64]{1,0:T(8,128)(2,1)S(1)}` or a tuple of such -> Buffers (padding from the first tile)."""
    out = []
    for m in re.finditer(r"\b([a-z]+\d*)\[([\d,]*)\](?:\{([^}]*)\})?", type_text):
        dtype, dims, layout = m.group(1), m.group(2), m.group(3) or ""
        if dtype not in DTYPE_BYTES:
            continue
        shape = tuple(int(d) for d in dims.split(",") if d)
        space = re.search(r"S\((\d+)\)", layout)
        padded = list(shape)
        order = [int(d) for d in layout.split(":")[0].split(",") if d.strip().isdigit()] if layout else []
        tile = re.search(r"T\(([\d,]+)\)", layout)
        if tile and order and len(order) == len(shape):
            tdims = [int(t) for t in tile.group(1).split(",")]
            minor_first = order[:len(tdims)]                   # the most minor dimensions, minor first
            for t, dim in zip(reversed(tdims), minor_first):
                padded[dim] = -(-padded[dim] // t) * t
        out.append(Buffer(dtype, shape, int(space.group(1)) if space else HBM,
                          math.prod(padded) * DTYPE_BYTES[dtype]))
    return tuple(out)


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, the rest); TYPE may be a parenthesized tuple."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    type_text, _, tail = rest.partition(" ")
    return type_text, tail


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Optimized HLO text -> ({computation name: instructions}, the entry computation's name)."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            if head.group(1):
                entry = current
            continue
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = (.*)$", line)
        if m and current is not None:
            type_text, tail = _split_type(m.group(2))
            op = re.match(r"([\w-]+)\((.*)", tail)
            if not op:
                continue
            operands = tuple(re.findall(r"%([\w.\-]+)", op.group(2).split(")")[0]))
            comps[current].append(Instruction(m.group(1), op.group(1), _parse_buffers(type_text), operands, line))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _trip_count(comps: dict, condition: str) -> int:
    """A counted loop's trip count: its condition compares the counter (from 0) with a constant, LT."""
    by_name = {i.name: i for i in comps[condition]}
    for inst in comps[condition]:
        if inst.opcode == "compare" and "direction=LT" in inst.text:
            for name in inst.operands:
                const = re.search(r"constant\((\d+)\)", by_name[name].text) if name in by_name else None
                if const:
                    return int(const.group(1))
    raise ValueError(f"cannot read the trip count of loop condition {condition}")


def top_level(comps: dict[str, list[Instruction]], entry: str) -> list[tuple[Instruction, dict, int]]:
    """(instruction, its computation's name -> instruction map, times it runs) for the entry computation and every
    while loop body reachable from it (times = the product of the enclosing loops' trip counts): the
    instructions that run as separate kernels."""
    out, stack = [], [(entry, 1)]
    while stack:
        name, times = stack.pop()
        by_name = {i.name: i for i in comps[name]}
        for inst in comps[name]:
            out.append((inst, by_name, times))
            if inst.opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", inst.text).group(1)
                condition = re.search(r"condition=%([\w.\-]+)", inst.text).group(1)
                stack.append((body, times * _trip_count(comps, condition)))
            elif inst.opcode in ("conditional", "call"):
                raise ValueError(f"{inst.opcode} is not counted: {inst.name}")
    return out


def _operand_read(comps: dict, fusion: Instruction, index: int, full: int) -> int:
    """Bytes a fusion reads of its operand `index`: the dynamic slices (or gathered rows) taken of it when every
    use inside the fused computation is one (directly, through a copy/bitcast of the whole, or inside a nested
    fusion), else all of it."""
    got = _param_sliced_bytes(comps, fusion, index, 0) if fusion.opcode == "fusion" else None
    return full if got is None else min(got, full)


def _param_sliced_bytes(comps: dict, fusion: Instruction, index: int, depth: int) -> int | None:
    callee = re.search(r"calls=%([\w.\-]+)", fusion.text)
    if not callee or callee.group(1) not in comps or depth > 4:
        return None
    body = comps[callee.group(1)]
    params = [i for i in body if i.opcode == "parameter" and re.search(rf"parameter\({index}\)", i.text)]
    return _sliced_bytes(comps, body, params[0].name, depth) if params else None


def _sliced_bytes(comps: dict, body: list, name: str, depth: int) -> int | None:
    users = [i for i in body if name in i.operands]
    total = 0
    for user in users:
        if user.opcode in ("dynamic-slice", "gather") and user.operands[0] == name:
            total += sum(b.padded_bytes for b in user.results)
            continue
        relayout = user.opcode == "fusion" and len(user.operands) == 1 and "calls=%copy_fusion" in user.text
        if depth < 4 and (user.opcode in ("bitcast", "copy") or relayout):
            inner = _sliced_bytes(comps, body, user.name, depth + 1)           # a relayout of the whole operand
        elif user.opcode == "fusion" and user.operands.count(name) == 1:
            inner = _param_sliced_bytes(comps, user, user.operands.index(name), depth + 1)
        else:
            return None
        if inner is None:
            return None
        total += inner
    return total if users else None


def hbm_bytes(text: str, kernel_layers: int | None = None) -> int:
    """HBM bytes read and written by a program's top-level instructions, loop bodies times their trip counts (see
    the module docstring).

    An asynchronous `copy-start` / `slice-start` moves its destination's bytes (its result is (source alias,
    destination, context)); a slice or gather reads as many bytes as it writes; a fusion reads the dynamic slices
    (or gathered rows) it takes of an operand, or the whole operand (an upper bound for a fusion that reads part
    of one in another way); a
    Mosaic kernel reads each operand once, or with `kernel_layers`, one layer's share of an operand whose
    leading dimension is that many layers (kernels.dequant_matmul's `layer` index maps read that layer's blocks
    only: by the kernel's construction, not seen in the HLO); every instruction writes its results."""
    comps, entry = parse_hlo(text)
    total = 0
    for inst, by_name, times in top_level(comps, entry):
        if inst.opcode in NOT_MEMORY_OPS or inst.opcode.endswith("-done") or "AllocateBuffer" in inst.text:
            continue
        sources = [by_name[name].results for name in inst.operands if name in by_name]
        if inst.opcode in ("copy-start", "slice-start"):
            dest = inst.results[1]
            moved = dest.padded_bytes * ((dest.memory_space == HBM) + (sources[0][0].memory_space == HBM))
        elif inst.opcode in ("slice", "dynamic-slice", "gather"):
            moved = sum(b.padded_bytes * ((b.memory_space == HBM) + (sources[0][0].memory_space == HBM))
                        for b in inst.results)
        else:
            in_place = _in_place_update(comps, inst)
            if in_place is None:
                moved = sum(b.padded_bytes for b in inst.results if b.memory_space == HBM)
            else:                                      # writes the update into the operand's buffer, in place
                updated, update_bytes = in_place
                moved = update_bytes * (inst.results[0].memory_space == HBM)
            for index, buffers in enumerate(sources):
                full = sum(b.padded_bytes for b in buffers if b.memory_space == HBM)
                if in_place is not None and index == updated:
                    continue
                if kernel_layers and "tpu_custom_call" in inst.text and buffers[0].shape[:1] == (kernel_layers,):
                    full //= kernel_layers
                moved += _operand_read(comps, inst, index, full) if full else 0
        total += times * moved
    return total


def _in_place_update(comps: dict, inst: Instruction) -> tuple[int, int] | None:
    """(operand index updated in place, bytes written) for a dynamic-update-slice, or a fusion whose root is
    one of a parameter; None otherwise."""
    if inst.opcode == "dynamic-update-slice":
        return 0, 0
    callee = re.search(r"calls=%([\w.\-]+)", inst.text)
    if inst.opcode != "fusion" or not callee or callee.group(1) not in comps:
        return None
    body = comps[callee.group(1)]
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.text.lstrip().startswith("ROOT ")), None)
    while root is not None and root.opcode == "bitcast" and root.operands[0] in by_name:
        root = by_name[root.operands[0]]
    if root is None or root.opcode != "dynamic-update-slice" or root.operands[0] not in by_name:
        return None
    target = by_name[root.operands[0]]
    index = re.search(r"parameter\((\d+)\)", target.text) if target.opcode == "parameter" else None
    if index is None:
        return None
    update = by_name.get(root.operands[1])
    return int(index.group(1)), sum(b.padded_bytes for b in update.results) if update else 0


def weight_sized_intermediates(text: str, weight_values: int) -> list[str]:
    """Results of top-level instructions (loop bodies too) with >= weight_values / 4 elements (not counting
    in-place updates of an operand, such as a KV cache's dynamic-update-slice)."""
    comps, entry = parse_hlo(text)
    found = []
    for inst, _, times in top_level(comps, entry):
        if (inst.opcode in NOT_MEMORY_OPS or inst.opcode.endswith(("-start", "-done")) or "AllocateBuffer" in inst.text
                or "tpu_custom_call" in inst.text or _in_place_update(comps, inst) is not None):
            continue
        for b in inst.results:
            if b.elements * 4 >= weight_values:
                found.append(f"{inst.opcode} -> {b.describe()}{' (in a loop)' if times > 1 else ''}")
    return found


# ----------------------------------------------------------------------------- the programs

def quantized_weight_spec(bits: int, n: int, k: int, on):
    """A `QuantizedWeight` of ShapeDtypeStructs for an [k in, n out] matrix with load_model's default scheme."""
    import jax
    import jax.numpy as jnp

    from phi4_jax.quant.weights import DEFAULT_INT4_GROUP_SIZE, QuantizedWeight

    group = k if bits == 8 else DEFAULT_INT4_GROUP_SIZE
    values = jax.ShapeDtypeStruct((n, k // 2 if bits == 4 else k), jnp.uint8 if bits == 4 else jnp.int8, sharding=on)
    scales = jax.ShapeDtypeStruct((n, k // group), jnp.bfloat16, sharding=on)
    return QuantizedWeight(values, scales, None, bits, group, (k,), (n,))


def ideal_bytes(w, rows: int) -> int:
    n, k = w.out_shape[0], w.k
    return (math.prod(w.values.shape) * w.values.dtype.itemsize + math.prod(w.scales.shape) * 2
            + rows * k * 2 + rows * n * 2)


def compile_on(device, fn, *args, donate=()):
    """jit(fn).lower(*args).compile() for a compile-only TPU device (kernels see the TPU via an abstract mesh)."""
    import jax
    import numpy as np

    mesh = jax.sharding.Mesh(np.array([device]), ("x",))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    return lowered.compile()


@dataclasses.dataclass
class Row:
    topology: str
    chip: str
    weights: str
    batch: int
    path: str
    ideal: int
    hbm: int
    xla_bytes: float | None
    temporaries: int
    intermediates: list[str]
    seconds: float


def measure(topology: str, device, bits: int, batch: int) -> list[Row]:
    import jax
    import jax.numpy as jnp

    from kernels.dequant_matmul import dequant_matmul
    from phi4_jax.quant.weights import MAX_DEQUANTIZED_VALUES, _row_slices

    on = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((batch, K_IN), jnp.bfloat16, sharding=on)
    w = quantized_weight_spec(bits, N_OUT, K_IN, on)
    label = "int8 per channel" if bits == 8 else f"int4, groups of {w.group_size}"
    rows = []

    def row(path, ideal, hbm, compiled, intermediates, seconds):
        cost = compiled.cost_analysis() or {}
        rows.append(Row(topology, device.device_kind, label, batch, path, ideal, hbm, cost.get("bytes accessed"),
                        compiled.memory_analysis().temp_size_in_bytes, intermediates, seconds))
        print(rows[-1], flush=True)

    product = lambda x, w: w.linear_einsum("bk,kn->bn", x, jnp.bfloat16)  # noqa: E731
    t = time.perf_counter()
    xla = compile_on(device, product, x, w)
    slices = _row_slices(N_OUT, K_IN) if N_OUT * K_IN > MAX_DEQUANTIZED_VALUES else 1
    per_slice = N_OUT // slices * K_IN
    row(f"XLA (our linear_einsum: {slices} slices in a loop)", ideal_bytes(w, batch), hbm_bytes(xla.as_text()), xla,
        weight_sized_intermediates(xla.as_text(), per_slice), time.perf_counter() - t)
    rows[-1].xla_bytes = None          # cost_analysis counts a loop body once

    t = time.perf_counter()
    kern = compile_on(device, lambda x, v, s: dequant_matmul(x, v, s, bits=bits, group_size=w.group_size),
                      x, w.values, w.scales)
    row("Pallas kernel (kernels.dequant_matmul)", ideal_bytes(w, batch), hbm_bytes(kern.as_text()), kern,
        weight_sized_intermediates(kern.as_text(), N_OUT * K_IN), time.perf_counter() - t)
    rows[-1].xla_bytes = None          # cost_analysis has no total for a Mosaic custom call

    if bits == 8:
        t = time.perf_counter()
        wb = jax.ShapeDtypeStruct((K_IN, N_OUT), jnp.bfloat16, sharding=on)
        dense = compile_on(device, lambda x, w: jnp.einsum("bk,kn->bn", x, w), x, wb)
        row("bf16 peer (XLA, bf16 W)", 2 * K_IN * N_OUT + batch * (K_IN + N_OUT) * 2, hbm_bytes(dense.as_text()),
            dense, weight_sized_intermediates(dense.as_text(), N_OUT * K_IN), time.perf_counter() - t)
    return rows


def scan_rows(topology: str, device, bits: int, layers: int, batch: int = 1) -> list[Row]:
    """The same product for `layers` stacked layers inside `lax.scan`, as the decode step runs it: XLA on the
    scan's slices; the kernel on the scan's slices; the kernel on the stacked weights with the layer index."""
    import jax
    import jax.numpy as jnp

    from kernels.dequant_matmul import dequant_matmul

    on = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((batch, K_IN), jnp.bfloat16, sharding=on)
    one = quantized_weight_spec(bits, N_OUT, K_IN, on)
    stack = lambda a: jax.ShapeDtypeStruct((layers, *a.shape), a.dtype, sharding=on)  # noqa: E731
    w = dataclasses.replace(one, values=stack(one.values), scales=stack(one.scales))
    g = one.group_size
    label = "int8 per channel" if bits == 8 else f"int4, groups of {g}"
    ideal = layers * (ideal_bytes(one, batch) - batch * K_IN * 2) + batch * K_IN * 2

    def xla(x, w):
        return jax.lax.scan(lambda c, wl: (c, wl.linear_einsum("bk,kn->bn", x, jnp.bfloat16)), 0, w)[1]

    def kernel_on_slices(x, w):
        body = lambda c, vs: (c, dequant_matmul(x, vs[0], vs[1], bits=bits, group_size=g))  # noqa: E731
        return jax.lax.scan(body, 0, (w.values, w.scales))[1]

    def kernel_with_layer(x, w):
        body = lambda c, i: (c, dequant_matmul(x, w.values, w.scales, bits=bits, group_size=g, layer=i))  # noqa
        return jax.lax.scan(body, 0, jnp.arange(layers))[1]

    rows = []
    for path, fn in ((f"XLA in a {layers}-layer scan", xla), (f"kernel on the scan's slices ({layers} layers)",
                                                            kernel_on_slices),
                     (f"kernel with the layer index ({layers} layers)", kernel_with_layer)):
        t = time.perf_counter()
        compiled = compile_on(device, fn, x, w)
        text = compiled.as_text()
        rows.append(Row(topology, device.device_kind, label, batch, path, ideal,
                        hbm_bytes(text, layers if fn is kernel_with_layer else None), None,
                        compiled.memory_analysis().temp_size_in_bytes,
                        weight_sized_intermediates(text, N_OUT // 4 * K_IN), time.perf_counter() - t))
        print(rows[-1], flush=True)
    return rows


def decode_step_rows(topology: str, device, bits: int, context: int) -> list[str]:
    """phi-4 14B's jitted decode step (quantized weights, XLA attention): HBM bytes, temporaries and weight-sized
    intermediates, with the XLA path, the kernel for the lm_head, and the kernel for every matrix."""
    import jax
    import jax.numpy as jnp

    from phi4_jax.inference import kv_cache as generation
    from phi4_jax.model.config import get_preset
    from phi4_jax.quant.tpu_kernel import use_dequant_kernel
    from phi4_jax.quant.weights import QuantizeOptions, abstract_quantized_params

    on = jax.sharding.SingleDeviceSharding(device)
    place = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), tree)  # noqa
    config = get_preset("phi4-14b", param_dtype="bfloat16", compute_dtype="bfloat16", remat_policy="none",
                        attention_impl="xla")
    mode = "int8" if bits == 8 else "int4"
    params = place(abstract_quantized_params(config, QuantizeOptions(mode), "bfloat16"))
    cache = place(jax.eval_shape(lambda: generation.init_cache(config, 1, context)))
    token = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=on)
    lines = []
    for path, p in (("XLA", params), ("kernel for the lm_head", use_dequant_kernel(params, max_rows=1)),
                    ("kernel for all (layers=True)", use_dequant_kernel(params, max_rows=1, layers=True))):
        t = time.perf_counter()
        compiled = compile_on(device, lambda p, c, t: generation.decode_step(p, c, t, config), p, cache, token,
                              donate=(1,))
        ma = compiled.memory_analysis()
        text = compiled.as_text()
        inter = weight_sized_intermediates(text, config.hidden_size * config.hidden_size)
        in_hbm = sorted({i for i in inter if " in HBM" in i})
        moved = hbm_bytes(text)
        lines.append(f"| {mode} | {path} | {ma.argument_size_in_bytes / 1e9:.2f} | {moved / 1e9:.2f} | "
                     f"**{moved / ma.argument_size_in_bytes:.2f}x** | {ma.temp_size_in_bytes / 2**20:,.0f} MiB | "
                     f"{'; '.join(in_hbm) or 'none'} | {len(inter) - len([i for i in inter if ' in HBM' in i])} "
                     f"| {time.perf_counter() - t:.0f} s |")
        print(lines[-1], flush=True)
    return lines


def table(rows: list[Row]) -> list[str]:
    mb = lambda n: f"{n / 1e6:,.1f}"  # noqa: E731
    out = ["| chip | weights | B | program | ideal MB | HBM MB | HBM / ideal | XLA bytes accessed MB | temporaries MB "
           "| weight-sized intermediates |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r.chip} | {r.weights} | {r.batch} | {r.path} | {mb(r.ideal)} | {mb(r.hbm)} | "
                   f"**{r.hbm / r.ideal:.2f}x** | {'n/a' if not r.xla_bytes else mb(r.xla_bytes)} | "
                   f"{mb(r.temporaries)} | {'; '.join(sorted(set(r.intermediates))) or 'none'} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topologies", default="v5e:2x2,v5p:2x2x2", help="TPU topologies; each one's first chip")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--layers", type=int, default=40, help="layers in the scan rows (phi-4 has 40)")
    p.add_argument("--decode-step", action="store_true", help="also phi-4 14B's decode step, int8 and int4")
    p.add_argument("--context", type=int, default=2048, help="KV cache length for --decode-step")
    p.add_argument("--write", metavar="BENCHMARKS_MD", default=None)
    args = p.parse_args(argv)

    from importlib import metadata

    import jax

    from phi4_jax.train.plan import tpu_topology_devices

    rows, step_lines = [], []
    for topology in args.topologies.split(","):
        device = tpu_topology_devices(topology)[0]
        for bits in (8, 4):
            for batch in (int(b) for b in args.batches.split(",")):
                rows += measure(topology, device, bits, batch)
            rows += scan_rows(topology, device, bits, args.layers)
        if args.decode_step:
            step_lines += [f"| {device.device_kind} " + line for line in
                           decode_step_rows(topology, device, 8, args.context)
                           + decode_step_rows(topology, device, 4, args.context)]
    lines = [run_heading(__file__, argv), "",
             f"TPU compiler: libtpu {metadata.version('libtpu')}, jax {jax.__version__}, compile-only devices "
             f"({args.topologies}; first chip), on this CPU machine: compiled, not run. x [B, {K_IN}] bf16 times "
             f"W [{K_IN}, {N_OUT}] (phi-4's gate projection); columns as in the script's docstring.", ""]
    lines += table(rows)
    if step_lines:
        lines += ["", f"phi-4 14B decode step (`kv_cache.decode_step`, batch 1, {args.context}-token bf16 cache "
                      "donated, XLA attention, load_model's default scheme; matmuls through XLA, or the kernel via "
                      "`use_dequant_kernel(max_rows=1[, layers=True])`); HBM bytes counted as above, against the "
                      "arguments (every weight and the whole cache, read once); weight-sized = at least "
                      "5120 x 5120 / 4 elements:", "",
                  "| chip | weights | matmuls | arguments GB | HBM GB | HBM / arguments | temporaries "
                  "| weight-sized intermediates in HBM | in VMEM | compile |",
                  "|---|---|---|---:|---:|---:|---:|---|---:|---:|", *step_lines]
    publish(lines, args.write, "Quantized inference", "quant-tpu-matmul")
    return 0


if __name__ == "__main__":
    sys.exit(main())
