"""Pair our benchmark JSON lines with the PyTorch reference's and print a markdown table of ratios.

    python benchmarks/compare.py bench.jsonl [more.jsonl ...]

Reads the lines printed by benchmarks/train_step.py, benchmarks/generate.py and
`ref_torch_llava_ov.py` (benchmarks/gpu_session.sh collects them into one file). A ratio is only
printed for a pair measured in the same file, i.e. the same run on the same device. The targets
are the ones of issues 5 and 6 (one H100); on other devices they are shown but not judged.
"""

from __future__ import annotations

import argparse
import json
import sys

TRAIN_TARGET_RATIO = 2.0
GENERATE_TARGET_TOKENS_PER_S = {1: 1500.0, 16: 15000.0}


def read_lines(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        print(f"warning: {path}: unreadable line skipped: {line[:80]}", file=sys.stderr)
    return rows


def is_reference(row: dict) -> bool:
    return str(row.get("impl", "")).startswith("torch")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _times(ratio: float | None, spec: str = ".2f") -> str:
    return "-" if ratio is None else f"{ratio:{spec}}x"


def _ratio(ours: float | None, ref: float | None) -> float | None:
    return ours / ref if ours and ref else None


def _flags(row: dict) -> str:
    """The XLA_FLAGS a run had, for its label (variants differ by them), less the dump flags
    gpu_session.sh gives every run (they change what is written, not what runs)."""
    flags = " ".join(f for f in str(row.get("xla_flags") or "").split() if not f.startswith("--xla_dump"))
    return f", XLA_FLAGS={flags}" if flags else ""


def table(rows: list[dict]) -> list[str]:
    on_h100 = any("H100" in str(r.get("device", "")) for r in rows)
    out = [
        "| workload | metric | manager_jax | PyTorch reference | speed-up | target |",
        "|---|---|---|---|---|---|",
    ]
    trains = [r for r in rows if r.get("what") == "train"]
    ours = [r for r in trains if not is_reference(r)]
    refs = [r for r in trains if is_reference(r) and not r.get("compile")]
    for mine in ours:
        ref = next((r for r in refs if r.get("batch") == mine.get("batch_per_device")), None)
        ratio = _ratio(mine.get("tokens_per_s"), ref and ref.get("tokens_per_s"))
        verdict = "-" if ratio is None or not on_h100 else ("met" if ratio >= TRAIN_TARGET_RATIO else "not met")
        layers = f", {mine['layers']} layers" if mine.get("layers") else ""
        if mine.get("loss_token_budget"):
            layers += f", LM head on {mine['loss_token_budget']} positions per shard"
        multiple = mine.get("vision_token_multiple")
        if multiple:  # 0 = automatic, not shown
            layers += ", crops unpadded" if multiple == 1 else f", crops padded to x{multiple}"
        if mine.get("row_len") and mine.get("row_len") != mine.get("seq"):
            layers += f", rows padded to {mine['row_len']}"
        if mine.get("timing") == "back_to_back":  # per step (the default) is not shown
            layers += ", steps timed back to back"
        label = (f"train B={mine.get('batch_per_device')} {mine.get('image')} "
                 f"({mine.get('variant')}, remat {mine.get('remat')}{layers}{_flags(mine)})")
        out.append(f"| {label} | tokens/s | {_fmt(mine.get('tokens_per_s'), ',.0f')} | "
                   f"{_fmt(ref and ref.get('tokens_per_s'), ',.0f')} | {_times(ratio)} | "
                   f">= {TRAIN_TARGET_RATIO:g}x: {verdict} |")
        out.append(f"| | MFU | {_fmt(mine.get('mfu'), '.1%')} | {_fmt(ref and ref.get('mfu'), '.1%')} | | >= 40% |")
        out.append(f"| | step s | {_fmt(mine.get('step_s_median'), '.3f')} | "
                   f"{_fmt(ref and ref.get('step_s_median'), '.3f')} | | |")
    gens = [r for r in rows if r.get("what") == "generate"]
    for mine in (r for r in gens if not is_reference(r)):
        batch = mine.get("batch")
        ref = next((r for r in gens if is_reference(r) and r.get("batch") == batch), None)
        tps = mine.get("decode_tokens_per_s")
        ratio = _ratio(tps, ref and ref.get("decode_tokens_per_s"))
        floor = GENERATE_TARGET_TOKENS_PER_S.get(batch)
        verdict = "-" if floor is None or not on_h100 else ("met" if tps and tps >= floor else "not met")
        layers = f", {mine['decode_layers']} layers" if mine.get("decode_layers") else ""
        on_cpu = "cpu" in str(mine.get("device", "")).lower()
        if (mine.get("decode_min_rows") or 1) > 1:
            layers += f", decoded as >= {mine['decode_min_rows']} rows"
        elif mine.get("decode_min_rows") == 1 and not on_cpu:  # off the GPU default of two
            layers += ", one row per prompt"
        if mine.get("decode_attention"):
            layers += f", {mine['decode_attention']} decode attention"
        if mine.get("decode_kernel"):
            layers += f" {mine['decode_kernel']}"
        if mine.get("decode_matmul") == "pallas":
            layers += ", pallas decode matmuls" + (f" {mine['decode_matmul_kernels']}" if mine.get("decode_matmul_kernels") else "")
        if (mine.get("decode_check_every") or 1) > 1:
            layers += f", end checked every {mine['decode_check_every']} tokens"
        if mine.get("decode_command_buffers"):
            layers += ", loops in CUDA graphs"
        if mine.get("decode_multi_output_fusion"):
            layers += ", residual add + next norm fused"
        if mine.get("decode_xla_options"):
            layers += ", decode XLA options " + " ".join(f"{k}={v}" for k, v in mine["decode_xla_options"].items())
        if mine.get("tokens_sha1"):  # equal digests: the same tokens (speed options must not change them)
            layers += f", tokens {mine['tokens_sha1']}"
        label = f"generate B={batch} {mine.get('image')} ({mine.get('variant')}, {mine.get('new_tokens')} new{layers}{_flags(mine)})"
        out.append(f"| {label} | decode tokens/s | {_fmt(tps, ',.0f')} | "
                   f"{_fmt(ref and ref.get('decode_tokens_per_s'), ',.1f')} | {_times(ratio, '.1f')} | "
                   f"{'-' if floor is None else f'>= {floor:,.0f}'}: {verdict} |")
        prefill, ref_prefill = mine.get("prefill_s"), ref and ref.get("prefill_s")
        out.append(f"| | prefill ms | {_fmt(prefill and prefill * 1e3, '.1f')} | "
                   f"{_fmt(ref_prefill and ref_prefill * 1e3, '.1f')} | "
                   f"{_times(_ratio(ref_prefill, prefill))} | |")
        if mine.get("first_call_s") is not None:  # the compiles: what an XLA option such as a full autotune costs
            out.append(f"| | first call s (compiles + 1 run) | {_fmt(mine['first_call_s'], '.1f')} | | | |")
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    out.append("")
    out.append(f"devices: {', '.join(devices) or 'unknown'}" + ("" if on_h100 else " (targets are for one H100: not judged)"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="JSON-lines files")
    args = p.parse_args(argv)
    rows = read_lines(args.paths)
    if not rows:
        print("no benchmark lines found", file=sys.stderr)
        return 1
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
