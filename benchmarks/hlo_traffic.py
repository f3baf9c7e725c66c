"""Kernel launches and bytes written and read per step, by kind, read from an optimized XLA HLO dump.

    python benchmarks/hlo_traffic.py step.hlo [--top 30]

The HLO is the text of a compiled program (`jax.jit(f).lower(...).compile().as_text()`, or what
`benchmarks/gpu_deviceless.py` writes). Every top-level instruction of the entry computation and of
the loop bodies it reaches is a launch (fusions, custom calls, copies), counted once per loop
iteration when the trip count is known (layer scans: XLA's annotation, or on TPU programs, which
carry none, read from the loop's `counter < N` condition); a loop with an unknown trip count (the
decode loop) counts once, so its numbers are per iteration. Bytes are the instruction's output
size; a dynamic-update-slice fusion writes in place, so it counts the size of its updates, and a
custom call's outputs that alias its operands (a kernel updating a buffer in place) are not
counted. Bytes read are an estimate: a launch's operands, where a fusion that only slices an operand
reads its slices, and an in-place update does not read the buffer it updates; a custom call counts
its operands whole, so a kernel that reads one layer out of a stacked cache is overcounted.

This is a static reading of the program, not a timing: it shows where the memory traffic and the
launches are (zero-filled stacks, layout transposes, per-layer copies), which is what the GPU
profiles pointed at. Numbers come from runs on the device (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from dataclasses import dataclass

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\(")
_NO_LAUNCH = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
              "replica-id", "copy-done", "fusion-done", "all-gather-done", "all-reduce-done", "send-done",
              "recv-done", "opt-barrier"}


@dataclass
class Launch:
    name: str
    kind: str
    shape: str
    bytes_written: int
    count: int  # launches per step (loop trip counts multiplied in)
    op_name: str
    loop_depth: int  # 0 = outside every loop
    bytes_read: int = 0  # estimate: the operands, or the slices of them a fusion reads


def array_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (a tuple adds its elements up)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def computations(text: str) -> tuple[dict[str, list[str]], str]:
    """{name: instruction lines} of every computation, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            m = re.match(r"(ENTRY )?%?([\w.\-]+)", line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
                continue
        if current is not None and line.startswith("  "):
            comps[current].append(line.strip())
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


_ROOT_KINDS = {"dynamic-update-slice": "dynamic-update-slice (in place)", "dynamic-slice": "dynamic-slice copy",
               "broadcast": "broadcast (fill)", "transpose": "transpose", "copy": "copy", "reduce": "reduction",
               "scatter": "scatter", "gather": "gather", "dot": "matmul", "convolution": "matmul"}


def _root_op(comps: dict[str, list[str]], called: str) -> str:
    """The op at the root of a fused computation, looking through bitcasts and tuples."""
    lines = comps.get(called, [])
    defs = {}
    root = None
    for inner in lines:
        m = _INSTRUCTION.match(inner)
        if m:
            defs[m.group(1)] = (m.group(3), inner)
            if inner.startswith("ROOT "):
                root = m.group(1)
    seen = 0
    while root in defs and seen < 8:
        op, inner = defs[root]
        if op not in ("bitcast", "tuple", "reshape", "convert"):
            return op
        operand = re.search(r"\(%?([\w.\-]+)", inner[inner.index(op + "("):])
        root, seen = (operand.group(1) if operand else None), seen + 1
    return "?"


def kind_of(comps: dict[str, list[str]], line: str, op: str) -> str:
    if op in ("fusion", "fusion-start"):
        if "triton_gemm" in line or "triton_nested_gemm" in line:
            return "matmul"
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = comps.get(called.group(1), []) if called else []
        # A cuBLAS GEMM that reads its operands through slices in place (XLA's dynamic-slice fusion).
        if any(re.search(r'custom_call_target="[^"]*(cublas|gemm)', inner) for inner in body):
            return "matmul"
        if called and "dynamic_update_slice" in called.group(1):
            return _ROOT_KINDS["dynamic-update-slice"]
        if called and "dynamic_slice" in called.group(1):
            return _ROOT_KINDS["dynamic-slice"]
        if any(re.search(r" (dot|convolution)\(", inner) for inner in body):
            return "matmul"
        return _ROOT_KINDS.get(_root_op(comps, called.group(1)) if called else "?", "elementwise")
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        target = target.group(1) if target else "?"
        if "cudnn" in target:
            return "cuDNN"
        return "matmul" if ("cublas" in target or "gemm" in target) else f"custom-call {target}"
    if op in ("copy", "copy-start"):
        return "copy"
    return _ROOT_KINDS.get(op, op)


def _fusion_written_bytes(comps: dict[str, list[str]], line: str, whole: int) -> int:
    """Bytes a fusion writes: each output of its root, except that an output made by a
    dynamic-update-slice is written in place, so it counts its updates, not the buffer it updates
    (GPU programs fuse the update alone; TPU programs fold it into a matmul's multi-output fusion)."""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    defs = _definitions(comps.get(called.group(1), [])) if called else {}
    shapes = {name: _INSTRUCTION.match(inner).group(2) for name, (_, inner) in defs.items()}
    root = next((name for name, (_, inner) in defs.items() if inner.startswith("ROOT ")), None)
    if root is None or not any(op == "dynamic-update-slice" for op, _ in defs.values()):
        return whole

    def written(name: str) -> int:
        op, inner = _through_copies(defs, name, through=("bitcast",))
        if op != "dynamic-update-slice":
            return array_bytes(shapes.get(name, ""))
        buffer, update = _operands(inner, op)[:2]
        # a chain of updates into one buffer writes each of them
        nested = written(buffer) if _through_copies(defs, buffer, through=("bitcast",))[0] == op else 0
        return array_bytes(shapes.get(update, "")) + nested

    op, inner = defs[root]
    outputs = _operands(inner, "tuple") if op == "tuple" else [root]
    return sum(written(name) for name in outputs)


def _workspace_bytes(kind: str, shape: str) -> int:
    """A cuBLAS GEMM's scratch space (the s8[N] last in its output tuple): not written out."""
    m = re.search(r", s8\[(\d+)\](\{[^}]*\})?\)$", shape) if kind == "matmul" and shape.startswith("(") else None
    return int(m.group(1)) if m else 0


def _aliased_output_bytes(line: str, shape: str) -> int:
    """Bytes of a custom call's outputs that alias its operands (`output_to_operand_aliasing`): a
    kernel that updates a buffer in place (a KV cache written at one slot) does not write it whole."""
    aliasing = re.search(r"output_to_operand_aliasing=\{(.*?)\}\s*(?:,\s*[a-z_]+=|$)", line)
    if not aliasing:
        return 0
    outputs = re.findall(r"\{(\d*)\}:", aliasing.group(1))
    elements = _ARRAY.findall(shape)
    total = 0
    for index in outputs:
        dtype, dims = elements[int(index) if index else 0]
        total += array_bytes(f"{dtype}[{dims}]")
    return total


def _definitions(lines: list[str]) -> dict[str, tuple[str, str]]:
    """{instruction name: (op, line)} of one computation."""
    defs = {}
    for inner in lines:
        m = _INSTRUCTION.match(inner)
        if m:
            defs[m.group(1)] = (m.group(3), inner)
    return defs


def _operands(line: str, op: str) -> list[str]:
    args = line[line.index(op + "(") + len(op) + 1:]
    return re.findall(r"%?([\w.\-]+)(?=[,)])", args[: args.index(")") + 1])


def _through_copies(defs: dict[str, tuple[str, str]], name: str,
                    through: tuple[str, ...] = ("copy", "bitcast")) -> tuple[str, str]:
    """The (op, line) that defines `name`, looking through copies and bitcasts."""
    op, line = defs.get(name, ("", ""))
    for _ in range(4):
        if op not in through:
            break
        op, line = defs.get(_operands(line, op)[0], ("", ""))
    return op, line


def _loop_compare(comps: dict[str, list[str]], cond: str) -> tuple[str, str, str] | None:
    """(left operand, right operand, direction) of a loop condition's root compare, in the
    condition's own names (a compare wrapped in a fusion is looked through)."""
    defs = _definitions(comps.get(cond, []))
    root = next((inner for _, inner in defs.values() if inner.startswith("ROOT ")), "")
    op = _INSTRUCTION.match(root).group(3) if _INSTRUCTION.match(root) else ""
    args = _operands(root, op) if op else []
    if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", root)
        inner = _definitions(comps.get(called.group(1), [])) if called else {}
        root = next((line for _, line in inner.values() if line.startswith("ROOT ")), "")
        if " compare(" not in root:
            return None
        params = {name: int(re.search(r"parameter\((\d+)\)", line).group(1))
                  for name, (kind, line) in inner.items() if kind == "parameter"}
        picked = [params.get(name) for name in _operands(root, "compare")[:2]]
        if None in picked:
            return None
        args = [args[i] for i in picked]
    elif op != "compare":
        return None
    direction = re.search(r"direction=(\w+)", root)
    return (args[0], args[1], direction.group(1)) if direction and len(args) >= 2 else None


def trip_count(comps: dict[str, list[str]], parent: str, line: str) -> int:
    """Iterations of the while loop `line` (an instruction of computation `parent`).

    XLA's own annotation where there is one (GPU and CPU programs); otherwise read from the loop
    (TPU programs carry none): a condition `counter < N` with the counter's initial value a constant
    in the loop's init tuple (0 if it cannot be found), the counter stepping by one as jax's scans
    and fori_loops do. 1 (count the body once) when neither says.
    """
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    compare = _loop_compare(comps, cond.group(1)) if cond else None
    if compare is None or compare[2] not in ("LT", "GT"):
        return 1
    counter, bound, direction = compare
    if direction == "GT":  # N > counter
        counter, bound = bound, counter
    defs = _definitions(comps.get(cond.group(1), []))
    counter_op, counter_line = _through_copies(defs, counter)
    bound_op, bound_line = _through_copies(defs, bound)
    if counter_op != "get-tuple-element" or bound_op != "constant":
        return 1
    index = int(re.search(r"index=(\d+)", counter_line).group(1))
    limit = int(re.search(r"constant\((-?\d+)\)", bound_line).group(1))
    start = 0
    parent_defs = _definitions(comps.get(parent, []))
    init_op, init_line = _through_copies(parent_defs, _operands(line, "while")[0])
    if init_op == "tuple":
        first_op, first_line = _through_copies(parent_defs, _operands(init_line, "tuple")[index])
        value = re.search(r"constant\((-?\d+)\)", first_line) if first_op == "constant" else None
        start = int(value.group(1)) if value else 0
    return max(limit - start, 1)


_ON_CHIP = "S(1)"  # TPU layouts name the memory space: S(1) is the core's VMEM


def _copy_start_destination(shape: str) -> tuple[str, str]:
    """(destination shape, kind) of an async copy's output tuple `(destination, source, context)`.

    On TPUs most of them move weights between HBM and VMEM around their use: a read of the weights
    that the program has to do, apart from copies within HBM."""
    arrays = re.findall(r"\w+\[[\d,]*\](?:\{[^}]*\})?", shape)
    if len(arrays) < 2:
        return shape, "copy"
    destination, source = arrays[0], arrays[1]
    if _ON_CHIP in destination and _ON_CHIP not in source:
        return destination, "copy to VMEM (prefetch)"
    if _ON_CHIP in source and _ON_CHIP not in destination:
        return destination, "copy from VMEM"
    return destination, "copy"


_SLICING = ("slice", "dynamic-slice", "gather")


def _fusion_read_bytes(comps: dict[str, list[str]], line: str, operand_bytes: list[int]) -> int:
    """Bytes a fusion reads: each operand whole, except one that the fused computation only slices
    (a layer's weights out of a stack, a cache row), which counts its slices' sizes, and the buffer
    of an in-place update, which is not read. A broadcast operand counts once: caches serve the rest."""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    defs = _definitions(comps.get(called.group(1), [])) if called else {}
    users: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    params: dict[int, str] = {}
    for name, (op, inner) in defs.items():
        if op == "parameter":
            params[int(re.search(r"parameter\((\d+)\)", inner).group(1))] = name
        else:
            for operand in set(_operands(inner, op)):
                users[operand].append((name, op))
    total = 0
    for index, whole in enumerate(operand_bytes):
        param = params.get(index, "")
        uses = users.get(param, [])
        first = [_operands(defs[name][1], op)[0] == param for name, op in uses]
        if uses and all(op == "dynamic-update-slice" and is_buffer for (_, op), is_buffer in zip(uses, first)):
            continue  # the buffer an in-place update writes into
        if uses and all(op in _SLICING and is_array for (_, op), is_array in zip(uses, first)):
            total += sum(array_bytes(_INSTRUCTION.match(defs[name][1]).group(2)) for name, _ in uses)
        else:
            total += whole
    return total


def _read_bytes(comps: dict[str, list[str]], shapes: dict[str, str], line: str, op: str) -> int:
    """Bytes a launch reads: an estimate from its operands' sizes (see `_fusion_read_bytes`)."""
    sizes = [array_bytes(shapes.get(name, "")) for name in _operands(line, op)]
    if op == "dynamic-update-slice":  # in place: reads its update, not the buffer
        return sum(sizes[1:])
    if op == "dynamic-slice":
        return array_bytes(_INSTRUCTION.match(line).group(2))
    if op in ("fusion", "fusion-start"):
        return _fusion_read_bytes(comps, line, sizes)
    return sum(sizes)


def launches(text: str) -> list[Launch]:
    comps, entry = computations(text)
    shapes = {name: {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, lines) if m}
              for name, lines in comps.items()}
    found: list[Launch] = []

    def walk(comp: str, count: int, depth: int) -> None:
        for line in comps.get(comp, []):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, op = m.groups()
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                walk(body, count * trip_count(comps, comp, line), depth + 1)
                continue
            if op in ("call", "conditional"):
                for called in re.findall(r"(?:to_apply|true_computation|false_computation)=%?([\w.\-]+)", line):
                    walk(called, count, depth)
                for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                    for called in re.findall(r"%?([\w.\-]+)", group):
                        walk(called, count, depth)
                continue
            if op in _NO_LAUNCH:
                continue
            kind = kind_of(comps, line, op)
            if op == "fusion-start":  # async: the output tuple repeats the operands
                shape = shape.rsplit("}, ", 1)[-1] if "}, " in shape else shape
            if op == "copy-start":  # async: (destination, source, context); only the destination is written
                shape, kind = _copy_start_destination(shape)
            written = array_bytes(shape) - _aliased_output_bytes(line, shape) - _workspace_bytes(kind, shape)
            if op == "dynamic-update-slice":  # unfused (TPU programs): writes its update operand in place
                update = _operands(line, op)[1]
                written = array_bytes(shapes[comp].get(update, shape))
            elif op in ("fusion", "fusion-start"):
                written = _fusion_written_bytes(comps, line, written)
            op_name = re.search(r'op_name="([^"]+)"', line)
            read = _read_bytes(comps, shapes[comp], line, op)
            found.append(Launch(name, kind, shape, written, count, op_name.group(1) if op_name else "", depth, read))

    walk(entry, 1, 0)
    return found


def table(found: list[Launch]) -> list[str]:
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for launch in found:
        totals[launch.kind][0] += launch.count
        totals[launch.kind][1] += launch.count * launch.bytes_written
        totals[launch.kind][2] += launch.count * launch.bytes_read
    out = ["| kind | launches | GB written | GB read (est.) |", "|---|---|---|---|"]
    for kind, (n, written, read) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        out.append(f"| {kind} | {n:,} | {written / 1e9:.2f} | {read / 1e9:.2f} |")
    n_all, written_all, read_all = (sum(v[i] for v in totals.values()) for i in range(3))
    out.append(f"| **all** | **{n_all:,}** | **{written_all / 1e9:.2f}** | **{read_all / 1e9:.2f}** |")
    return out


def top(found: list[Launch], n: int) -> list[str]:
    """The `n` launches that move the most bytes (written + read)."""
    rows = sorted(found, key=lambda launch: -launch.count * (launch.bytes_written + launch.bytes_read))[:n]
    return [f"{r.count * r.bytes_written / 1e9:7.2f} GB w {r.count * r.bytes_read / 1e9:7.2f} GB r  x{r.count:<4d} "
            f"{r.kind:32s} {r.shape[:60]:60s} {r.op_name[-70:]}" for r in rows]


def report(text: str, top_n: int = 0, in_loops_only: bool = False) -> str:
    """The kind table of an HLO text, then its `top_n` biggest writers. `in_loops_only`: only what
    runs inside loops (a decode loop's per-token work, without its one-off set-up)."""
    found = [l for l in launches(text) if l.loop_depth or not in_loops_only]
    return "\n".join(table(found) + (top(found, top_n) if top_n else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hlo", help="optimized HLO text")
    p.add_argument("--top", type=int, default=0, help="also list the N launches that move the most bytes")
    args = p.parse_args(argv)
    with open(args.hlo) as f:
        print(report(f.read(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
