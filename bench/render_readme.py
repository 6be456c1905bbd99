"""Regenerate the performance section of README.md from the results JSON under bench/results/.

The figures in the README are never typed by hand: for each suite this script reads the newest full
(not --quick) results file of each device, as written by `python -m moo_kernels.bench`, and rewrites
the text between the markers <!-- perf:begin --> and <!-- perf:end -->. Results of a GPU run
(bench/gpu_check.sh writes them as JSON alone) count once copied into bench/results/ under the names
they came with (<suite>_cuda_<date>.json); `python -m moo_kernels.bench.plot --missing
bench/results/*.json` draws their plots.

    python bench/render_readme.py            # rewrite README.md
    python bench/render_readme.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
SUITES = {"advantages": "Advantage step", "policy_loss": "Policy loss", "logits_loss": "Loss from logits",
          "linear_loss": "Loss from hidden states"}  # fmt: skip
# the entries of bench/call_overhead.py, in its order
ENTRIES = ("public function (eager)", "registered op (dispatcher)", "implementation alone")


def newest(suite: str, device: str, results: Path = RESULTS) -> tuple[Path, dict[str, Any]] | None:
    """The newest full run of a suite on a device (by the date in its JSON), or None."""
    found = []
    for path in sorted(results.glob(f"{suite}_*.json")):
        data = json.loads(path.read_text())
        if data.get("format") == 2 and data.get("device") == device and not data["meta"].get("quick"):
            found.append((data["meta"]["date"], path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda x: x[0])
    return path, data


def _us(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _ratio(x: float | None) -> str:
    return "-" if not x else (f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x")


def _source(path: Path, data: dict[str, Any]) -> str:
    m = data["meta"]
    commit = (m.get("git_commit") or "unknown")[:10] + (" (uncommitted changes)" if m.get("git_dirty") else "")
    threads = f", {m['num_threads']} threads" if data["device"] == "cpu" else ""
    copy = m.get("copy_bandwidth") or {}
    bw = f", device copy {copy['gbps']:,.0f} GB/s" if copy.get("gbps") else ""
    return (
        f"{m['device_name']}{threads}{bw}; Python {m['python']}, torch {m['torch']}, triton {m['triton']}; "
        f"{m['date'][:10]}, commit {commit}; `{m.get('command', 'moo-bench')}`; `{path.relative_to(ROOT)}`"
    )


def device_section(path: Path, data: dict[str, Any]) -> list[str]:
    """The main size's table (every implementation, speedups against each moo_kernels entry) and the sizes."""
    names, sp_of = data["names"], data["speedup_of"]
    cuda = data["device"] == "cuda"
    main = next((p for p in data["points"] if p["main"] and "timings" in p), None)
    where = "GPU" if cuda else "CPU"
    if main is None:
        return [f"**{where}**: the run failed before timing (see `{path.relative_to(ROOT)}`).", ""]
    cpu_peak = main.get("cpu_peak_rss") if not cuda else None  # a fresh process's peak resident set per entry
    head = ["implementation", "median (us)"] + (["device (us)", "GB/s", "peak (MB)"] if cuda else [])
    head += ["peak RSS (MB)"] if cpu_peak else []
    head += [f"vs {names[k]}" for k in sp_of]
    lines = [
        f"**{where}**, {main['label']}: {data['config_line']}. "
        + ("Per call: CUDA events, L2 flushed; device: CUDA-graph replay." if cuda else "Median of repeated calls.")
        + " Ratios: time of the row / time of the column's moo_kernels entry.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for key, name in names.items():
        tm = main["timings"].get(key)
        if tm is None:
            continue
        row = [name, _us(tm["median_us"])]
        if cuda:
            d = main["device_timings"].get(key)
            bw = main["bandwidth"].get(key, {})
            g = bw.get("device") or bw.get("latency")
            m = main["memory"].get(key)
            row += [
                _us(d["median_us"]) if isinstance(d, dict) else "-",
                f"{g['gbps']:,.0f}" if g else "-",
                f"{m['peak_bytes'] / 1e6:,.0f}" if isinstance(m, dict) else "-",
            ]
        if cpu_peak:
            m = cpu_peak.get(key)
            row.append(f"{m['peak_bytes'] / 1e6:,.0f}" if isinstance(m, dict) else "-")
        row += [_ratio(main["speedups"].get(k, {}).get(key)) for k in sp_of]
        lines.append("| " + " | ".join(row) + " |")
    if "logits_bytes" in main:
        lines += ["", f"The logits of this size would take {main['logits_bytes'] / 1e6:,.0f} MB."]
    others = [p for p in data["points"] if not p["main"] and p.get("speedups")]
    if others:
        moo = next(iter(sp_of))
        lines += ["", f"Other sizes, {names[moo]} faster than: " + "; ".join(
            f"{p['label']}: " + ", ".join(f"{k} {_ratio(v)}" for k, v in p["speedups"].get(moo, {}).items())
            for p in others
        ) + "."]  # fmt: skip
    if not data["correct"]:
        lines += ["", f"**Disagreed with the reference**: {', '.join(data['disagree'])}."]
    if data.get("pending"):
        lines += ["", f"The run stopped before the sizes {', '.join(data['pending'])}."]
    lines += ["", f"Source: {_source(path, data)}.", ""]
    return lines


def overhead_section(results: Path = RESULTS) -> list[str]:
    """The per-call time of each op's entries (bench/call_overhead.py): what the eager path saves."""
    found = sorted(results.glob("call_overhead_cpu_*.json"))
    lines = ["### Per-call overhead of the entries", ""]
    if not found:
        return lines + ["**CPU**: not yet measured (`python bench/call_overhead.py`).", ""]
    path = found[-1]
    data = json.loads(path.read_text())
    rows = data["rows"]
    lines += [
        "Each op has one implementation and one backward and three entries: the public function in eager mode, the "
        "registered torch.library op (what torch.compile calls; timed here in eager mode, through the dispatcher) "
        "and the implementation alone (no validation, no autograd). C++ backend, forward (and with a gradient, the "
        "autograd graph; not the backward). The ratio is the registered op's time over the public function's: "
        "what the eager path saves.",
        "",
        "| op | gradient | size | public function (us) | registered op (us) | implementation alone (us) | ratio |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["grad"]), {})[r["entry"]] = r
    for (op, grad), entries in groups.items():
        public, registered, alone = (entries[e] for e in ENTRIES)
        for size, key in (("tiny", "tiny_us"), ("main", "main_us")):
            label = public["tiny"] if size == "tiny" else public["main"]
            ratio = registered[key] / public[key] if public[key] else None
            lines.append(
                f"| `{op}` | {'yes' if grad else 'no'} | {label} | {_us(public[key])} | {_us(registered[key])} "
                f"| {_us(alone[key])} | {_ratio(ratio)} |"
            )
    lines += ["", f"Source: {_source(path, data)}.", ""]
    return lines


def render(results: Path = RESULTS) -> str:
    lines: list[str] = []
    for suite, title in SUITES.items():
        lines += [f"### {title}", ""]
        for device in ("cpu", "cuda"):
            found = newest(suite, device, results)
            if found:
                lines += device_section(*found)
            else:
                lines += [f"**{'GPU' if device == 'cuda' else 'CPU'}**: not yet measured.", ""]
    lines += overhead_section(results)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md is out of date")
    args = ap.parse_args(argv)
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if args.check:
        if new != text:
            print("README.md's performance section is out of date: run python bench/render_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
