"""Regenerate the performance section of README.md from the committed results JSON.

The figures in the README are never typed by hand: this script reads the newest results file of each
device under bench/results/ (written by bench/bench_advantages.py) and rewrites the text between the
markers <!-- perf:begin --> and <!-- perf:end -->.

    python bench/render_readme.py            # rewrite README.md
    python bench/render_readme.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
NOT_MEASURED = "not yet measured (no GPU run has been made)."


def newest(device: str, bench: str = "advantages") -> tuple[Path, dict] | None:
    found = []
    for path in sorted(RESULTS.glob(f"{bench}_*.json")):
        data = json.loads(path.read_text())
        if data.get("device") == device and not data.get("meta", {}).get("quick"):
            found.append((data["meta"].get("date", ""), path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda x: x[0])
    return path, data


def _us(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _source(path: Path, data: dict) -> str:
    m = data["meta"]
    commit = (m.get("git_commit") or "unknown")[:10]
    return (
        f"{m.get('device_name')}, torch {m.get('torch')}, triton {m.get('triton')}, {m.get('date', '')[:10]}, "
        f"commit {commit}; `{path.relative_to(ROOT)}`"
    )


def cpu_section(path: Path, data: dict) -> list[str]:
    c = data["config"]
    t = data["timings"]
    names = data["names"]
    sp = data["speedup_of_moo"]
    lines = [
        f"**CPU** ({data.get('num_threads')} threads): N={c['n']}, K={c['k']}, group_size={c['group_size']}, "
        f'weighting="{c["weighting"]}" with gates {c["gates_shape"]}. Median of repeated calls.',
        "",
        "| implementation | median (us) | moo_kernels is faster by |",
        "|---|---:|---:|",
    ]
    for key in ("moo", "eager", "loop"):
        name = names[key]
        ratio = "-" if key == "moo" else f"{sp[name]:.1f}x"
        lines.append(f"| {name} | {_us(t[name]['median_us'])} | {ratio} |")
    if "scalarize" in names:
        name, moo = names["scalarize"], names["moo_scalarize"]
        ratio = data["speedup_of_moo_scalarize"][name]
        lines.append(f"| {moo} | {_us(t[moo]['median_us'])} | - |")
        lines.append(f"| {name} | {_us(t[name]['median_us'])} | {ratio:.1f}x (vs moo scalarize) |")
    lines += ["", f"Source: {_source(path, data)}.", ""]
    return lines


def gpu_section(path: Path, data: dict) -> list[str]:
    c = data["config"]
    t = data["timings"]
    data["names"]
    dev = data.get("device_timings", {})
    lines = [
        f'**GPU**: N={c["n"]}, K={c["k"]}, group_size={c["group_size"]}, weighting="{c["weighting"]}" with '
        f"gates {c['gates_shape']}. Per call: CUDA events around the Python call (L2 flushed), median; "
        "device time: CUDA-graph replay (kernels only), where the call can be captured.",
        "",
        "| implementation | per call (us) | device time (us) | moo_kernels (raise) is faster by | "
        "moo_kernels (ignore) is faster by |",
        "|---|---:|---:|---:|---:|",
    ]
    raise_sp = data.get("speedup_of_moo_raise", {})
    ignore_sp = data.get("speedup_of_moo_ignore", {})
    for name in t:
        d = dev.get(name, {}).get("median_us")
        r1 = f"{raise_sp[name]:.1f}x" if name in raise_sp else "-"
        r2 = f"{ignore_sp[name]:.1f}x" if name in ignore_sp else "-"
        lines.append(f"| {name} | {_us(t[name]['median_us'])} | {_us(d)} | {r1} | {r2} |")
    bw = data.get("bandwidth", {})
    if bw:
        lines += [
            "",
            "Bandwidth of moo_kernels over its minimal traffic: "
            + ", ".join(
                f"{k}: {v:.0f}" if isinstance(v, float) else f"{k}: {v}"
                for k, v in bw.items()
                if not isinstance(v, dict)
            )
            + ".",
        ]
    lines += ["", f"Source: {_source(path, data)}.", ""]
    return lines


def policy_loss_section(path: Path, data: dict) -> list[str]:
    c = data["config"]
    t = data["timings"]
    sp = data["speedup_of_moo"]
    moo = data["names"]["moo"]
    where = "CPU" if data["device"] == "cpu" else "GPU"
    lines = [
        f"**{where}, policy loss forward + backward**: B={c['b']}, T={c['t']} ({c['active_fraction']:.0%} of tokens "
        f'active), mode "{c["mode"]}" [{1 - c["clip_low"]:.2f}, {1 + c["clip_high"]:.2f}], {c["kl"]} KL, {c["agg"]}, '
        f"{c['dtype']}. Median per call.",
        "",
        "| implementation | median (us) | moo_kernels is faster by |",
        "|---|---:|---:|",
    ]
    for name in t:
        ratio = "-" if name == moo else f"{sp[name]:.2f}x"
        lines.append(f"| {name} | {_us(t[name]['median_us'])} | {ratio} |")
    lines += ["", f"Source: {_source(path, data)}.", ""]
    return lines


def render() -> str:
    lines: list[str] = ["### Advantage step", ""]
    for device, section in (("cpu", cpu_section), ("cuda", gpu_section)):
        found = newest(device)
        lines += section(*found) if found else [f"{device.upper()}: {NOT_MEASURED}", ""]
    lines += ["### Policy loss", ""]
    for device in ("cpu", "cuda"):
        found = newest(device, "policy_loss")
        lines += policy_loss_section(*found) if found else [f"{device.upper()}: {NOT_MEASURED}", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is out of date")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
