"""Where the device time goes in a profile that a benchmark captured (`--profile FILE.xplane.pb`).

    python benchmarks/profile_summary.py train.xplane.pb.gz --per 2          # 2 profiled steps
    python benchmarks/profile_summary.py generate_b1.xplane.pb.gz --module decode --per 128

Reads the GPU (or TPU) kernels of the file with jax's own profile reader (`jax.profiler.ProfileData`,
no xprof needed) and prints, for each compiled program (`hlo_module`) or the ones whose name
contains `--module`:
- kernels, the time the device was busy (the union of the kernels' intervals), the span from the
  first kernel's start to the last one's end, and the idle time between (launch gaps, host syncs);
- the busy time by kind (matmul, attention, reduction, copy, other fusions) and the gaps by size;
- the kernels that took the most time.
`--per N` divides counts and times by N: profiled steps, or decoded tokens times profiled calls.

A profile holds a few calls of a program, so these are per-call readings of one run, not a
benchmark. The benchmark's own timing (its JSON line) is the number to report.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys
from dataclasses import dataclass, field

# Kernel name -> kind, first match wins. cuBLAS / cuBLASLt kernels (sm90_xmma_*, nvjet_*), CUTLASS,
# XLA's Triton GEMM fusions; cuDNN attention; XLA's fusion names for the rest. Our Pallas kernels
# are named for it: decode_attention*, decode_matmul_* (the fused decode projections).
_KINDS = [
    ("attention", re.compile(r"cudnn|fmha|flash|attention", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|wgmma|matmul|dot", re.I)),
    ("copy / memset", re.compile(r"^memcpy|^memset|copy|dynamic_update_slice|dynamic_slice", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("other fusion", re.compile(r"fusion|^loop_|^input_", re.I)),
]
_GAP_BINS_US = (2, 10, 100)  # gaps below 2 us, 2-10, 10-100, 100 and more


def kind_of(name: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


@dataclass
class Kernel:
    name: str
    start_ns: float
    duration_ns: float
    module: str = ""


@dataclass
class Summary:
    module: str
    kernels: int = 0
    busy_ns: float = 0.0
    span_ns: float = 0.0
    by_kind: dict[str, float] = field(default_factory=dict)
    gaps: list[tuple[str, int, float]] = field(default_factory=list)  # (bin, count, total ns)
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (name, count, total ns)

    @property
    def idle_ns(self) -> float:
        return self.span_ns - self.busy_ns


def _gap_bin(gap_us: float) -> str:
    low = 0
    for high in _GAP_BINS_US:
        if gap_us < high:
            return f"{low}-{high} us"
        low = high
    return f">= {low} us"


def summarize(kernels: list[Kernel], module: str = "", top: int = 15) -> Summary:
    """The busy / idle split, kinds, gaps and top kernels of one program's kernels (any streams)."""
    s = Summary(module)
    if not kernels:
        return s
    kernels = sorted(kernels, key=lambda k: k.start_ns)
    s.kernels = len(kernels)
    s.span_ns = max(k.start_ns + k.duration_ns for k in kernels) - kernels[0].start_ns
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    gaps: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    end = kernels[0].start_ns
    for k in kernels:
        by_kind[kind_of(k.name)] += k.duration_ns
        by_name[k.name][0] += 1
        by_name[k.name][1] += k.duration_ns
        if k.start_ns > end:  # idle until this kernel (overlapping kernels leave no gap)
            gap = k.start_ns - end
            b = gaps[_gap_bin(gap / 1e3)]
            b[0] += 1
            b[1] += gap
        k_end = k.start_ns + k.duration_ns
        s.busy_ns += max(0.0, k_end - max(k.start_ns, end))
        end = max(end, k_end)
    s.by_kind = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
    order = [_gap_bin(0)] + [_gap_bin(b) for b in _GAP_BINS_US]
    s.gaps = [(b, int(gaps[b][0]), gaps[b][1]) for b in order if b in gaps]
    s.top = sorted(((n, int(c), t) for n, (c, t) in by_name.items()), key=lambda r: -r[2])[:top]
    return s


def format_summary(s: Summary, per: float = 1.0) -> str:
    ms = lambda ns: f"{ns / per / 1e6:.3f}"
    unit = "" if per == 1 else f" (per 1/{per:g} of the profile)"
    lines = [
        f"== {s.module or 'all programs'}{unit}",
        f"kernels {s.kernels / per:,.1f}; busy {ms(s.busy_ns)} ms, span {ms(s.span_ns)} ms, "
        f"idle {ms(s.idle_ns)} ms ({100 * s.idle_ns / s.span_ns if s.span_ns else 0:.1f}% of the span)",
        "| kind | ms | % of busy |",
        "|---|---|---|",
    ]
    kernel_ns = sum(s.by_kind.values()) or 1.0
    for kind, ns in s.by_kind.items():
        lines.append(f"| {kind} | {ms(ns)} | {100 * ns / kernel_ns:.1f} |")
    if s.gaps:
        lines.append("gaps between kernels: " + "; ".join(f"{b}: {c / per:,.1f} ({ms(t)} ms)" for b, c, t in s.gaps))
    lines.append("top kernels (calls, ms):")
    lines += [f"  {ms(t):>9s}  x{c / per:<8,.1f} {name[:100]}" for name, c, t in s.top]
    return "\n".join(lines)


def device_kernels(path: str) -> list[Kernel]:
    """Every kernel of the GPU / TPU planes of an .xplane.pb (or .xplane.pb.gz) file."""
    from jax.profiler import ProfileData

    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = ProfileData.from_serialized_xspace(f.read())
    planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    if not planes:
        names = ", ".join(p.name for p in data.planes) or "none"
        raise ValueError(f"{path}: no GPU or TPU device plane (planes: {names}); a CPU profile has host threads only")
    found = []
    for plane in planes:
        lines = list(plane.lines)
        if plane.name.startswith("/device:TPU"):  # the op line; the others repeat it per module / step
            lines = [line for line in lines if line.name == "XLA Ops"] or lines
        for line in lines:
            for e in line.events:
                stats = dict(e.stats)
                found.append(Kernel(e.name, float(e.start_ns), float(e.duration_ns), str(stats.get("hlo_module", ""))))
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help=".xplane.pb or .xplane.pb.gz (a benchmark's --profile)")
    p.add_argument("--module", default=None, help="only programs whose name contains this (e.g. decode, train_step)")
    p.add_argument("--per", type=float, default=1.0, help="divide by this many steps / tokens")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    try:
        kernels = device_kernels(args.profile)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    modules = collections.Counter(k.module for k in kernels)
    picked = [m for m in modules if args.module is None or args.module in m]
    if not picked:
        print(f"error: no program matches {args.module!r}; programs: {dict(modules)}", file=sys.stderr)
        return 2
    for module in sorted(picked, key=lambda m: -modules[m]):
        print(format_summary(summarize([k for k in kernels if k.module == module], module, args.top), args.per))
    return 0


if __name__ == "__main__":
    sys.exit(main())
