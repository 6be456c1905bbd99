"""What the benchmark shows and writes: run metadata, plain-text tables, a progress bar, JSON and plots.

matplotlib is optional (the "bench" extra): without it every JSON is still written and the run says
plainly that no plot was made.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Metadata


def git_commit(root: str | Path = ROOT) -> dict[str, Any]:
    """{"git_commit": HEAD of the repository at root, "git_dirty": uncommitted changes to the code}, None when
    unknown. Results and the README, which a benchmark run itself rewrites, do not count.

    Where root is no git checkout (a copy of the tree on another machine), the commit is taken from
    MOO_KERNELS_GIT_COMMIT when set, and whether the copy had changes is unknown.
    """
    unknown = {"git_commit": os.environ.get("MOO_KERNELS_GIT_COMMIT") or None, "git_dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results", ":(exclude)README.md"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return unknown
    if head.returncode != 0:
        return unknown
    return {
        "git_commit": head.stdout.strip(),
        "git_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
    }


def device_name(device: str) -> str:
    """The GPU's name for "cuda", the processor's model name for "cpu"."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine distorts CPU figures), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def run_meta(benchmark: str, device: str, quick: bool, root: str | Path = ROOT) -> dict[str, Any]:
    """The "meta" block of a results JSON: what ran, where, with which versions, when, at which commit."""
    import moo_kernels

    return {
        "benchmark": benchmark,
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "moo_kernels": moo_kernels.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        **git_commit(root),
    }


# --------------------------------------------------------------------------------------------
# Text


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def fmt_us(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.1f}" if x < 1e5 else f"{x:,.0f}")


def fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "-"


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


class Progress:
    """One status line on stderr: suite, case, implementation, elapsed time (redrawn twice a second).

    Disabled (enabled=False, or stderr not a terminal): only the suite and case lines are printed, one
    per line, so that a log stays readable.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.live = enabled and sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.suite = self.case = self.step_text = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.live:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            text = f"[{time.monotonic() - self.t0:6.1f}s] {self.suite} | {self.case} | {self.step_text}"
            width = max(20, _terminal_width() - 1)
            sys.stderr.write("\r\033[K" + text[:width])
            sys.stderr.flush()

    def update(self, *, suite: str | None = None, case: str | None = None, step: str | None = None) -> None:
        if suite is not None:
            self.suite, self.case, self.step_text = suite, "", ""
        if case is not None:
            self.case, self.step_text = case, ""
            if not self.live:
                self.log(f"{self.suite}: {case}")
        if step is not None:
            self.step_text = step
        if self.live:
            self._draw()

    def log(self, message: str) -> None:
        """A line of its own (a warning, a disagreement), above the status line."""
        with self._lock:
            if self.live:
                sys.stderr.write("\r\033[K")
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        return 120


# --------------------------------------------------------------------------------------------
# Files


def write_json(result: dict[str, Any], path: Path) -> None:
    """Writes the file whole or not at all (a temporary file renamed over it): a run stopped while it writes
    leaves the previous version, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_suite(result: dict[str, Any], path: Path) -> None:
    """Time per call against problem size (left); CUDA: effective GB/s against the copy, CPU: speedups (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["names"]
    cuda = result["meta"]["device"] == "cuda"
    pts = sorted((p for p in result["points"] if p.get("timings")), key=lambda p: p["x"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, name in names.items():
        xy = [(p["x"], p["timings"][key]["median_us"]) for p in pts if key in p["timings"]]
        if not xy:
            continue
        (line,) = ax.plot(*zip(*xy, strict=True), marker="o", label=name)
        dev = [(p["x"], d["median_us"]) for p in pts if isinstance(d := p["device_timings"].get(key), dict)]
        if dev:
            style = dict(marker="s", linestyle="--", color=line.get_color())
            ax.plot(*zip(*dev, strict=True), **style, label=f"{name}, device")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(result["x_label"])
    ax.set_ylabel("median time per call (us)")
    ax.set_title(f"{result['title']}, {result['meta']['device_name']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)

    if cuda:
        for key in result["speedup_of"]:
            xy = [(p["x"], b["gbps"]) for p in pts if (b := p["bandwidth"].get(key, {}).get("device"))]
            if xy:
                ax2.plot(*zip(*xy, strict=True), marker="o", label=f"{names[key]}, device time")
        copy = result["meta"].get("copy_bandwidth") or {}
        if copy.get("gbps"):
            ax2.axhline(copy["gbps"], color="gray", linestyle="--", label="device-to-device copy")
        ax2.set_ylabel("effective GB/s (minimal bytes / time)")
    else:
        for key, baselines in result["speedup_of"].items():
            for base in baselines:
                xy = [(p["x"], s) for p in pts if (s := p["speedups"].get(key, {}).get(base))]
                if xy:
                    ax2.plot(*zip(*xy, strict=True), marker="o", label=f"{names[base]} / {names[key]}")
        ax2.axhline(1.0, color="gray", linestyle=":")
        ax2.set_ylabel("speedup (time of the baseline / time of moo_kernels)")
        ax2.set_yscale("log")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel(result["x_label"])
    ax2.grid(True, which="both", alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The terminal report of one suite


def _err(e: Any) -> str:
    if e is None:
        return "-"
    if isinstance(e, str):
        return "error"
    return f"{e['error']:.1e}" if e.get("error") is not None else e.get("why", "-")


def main_table(result: dict[str, Any], point: dict[str, Any]) -> str:
    """Every figure of one point, one row per implementation."""
    names, sp_of = result["names"], result["speedup_of"]
    cuda = result["meta"]["device"] == "cuda"
    header = ["implementation", "median us", "min us"]
    if cuda:
        header += ["batch us", "device us"]
    header += [f"vs {names[k]}" for k in sp_of]
    header += ["GB/s", "% copy", "peak MB"] if cuda else ["GB/s"]
    header.append(f"err ({result['error_kind']})")
    rows = []
    for key, name in names.items():
        if key not in point["errors"]:
            continue
        tm, bw = point["timings"].get(key), point["bandwidth"].get(key, {})
        row = [name, fmt_us(tm and tm["median_us"]), fmt_us(tm and tm["min_us"])]
        if cuda:
            d = point["device_timings"].get(key)
            row += [fmt_us(tm and tm.get("batch_us")), fmt_us(d["median_us"]) if isinstance(d, dict) else "-"]
        row += [fmt_ratio(point["speedups"].get(k, {}).get(key)) for k in sp_of]
        g = bw.get("device") or bw.get("latency")
        row.append(fmt_num(g and g["gbps"], ".1f"))
        if cuda:
            m = point["memory"].get(key)
            peak = fmt_num(m["peak_bytes"] / 1e6, ".1f") if isinstance(m, dict) else "-"
            row += [fmt_num(g and g["fraction_of_copy"], ".1%"), peak]
        row.append(_err(point["errors"].get(key)))
        rows.append(row)
    return format_table(header, rows)


def sizes_table(result: dict[str, Any]) -> str:
    """Median time of every implementation at every size, and the speedup of the first moo_kernels entry."""
    names = result["names"]
    moo = next(iter(result["speedup_of"]))
    present = [k for k in names if any(k in p["timings"] for p in result["points"])]
    header = ["size (us per call)"] + present + [f"{k} / {moo}" for k in result["speedup_of"][moo]]
    rows = []
    for p in result["points"]:
        row = [p["label"] + (" (main)" if p["main"] else "")]
        row += [fmt_us(p["timings"][k]["median_us"]) if k in p["timings"] else "-" for k in present]
        row += [fmt_ratio(p.get("speedups", {}).get(moo, {}).get(k)) for k in result["speedup_of"][moo]]
        rows.append(row)
    return format_table(header, rows)


def format_result(result: dict[str, Any]) -> str:
    meta = result["meta"]
    out = [
        f"== {result['title']} on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"triton {meta['triton']}, commit {(meta['git_commit'] or 'unknown')[:10]}",
        result["config_line"],
    ]
    if meta["device"] == "cpu":
        load = meta.get("load_average_1min", {})
        out.append(
            f"threads: {meta['num_threads']}; load average (1 min) {fmt_num(load.get('before'))} before, "
            f"{fmt_num(load.get('after'))} after, on {meta['cpu_count']} CPUs"
        )
    out += [f"NOTE: {n}" for n in result.get("notes", [])]
    main = next((p for p in result["points"] if p["main"]), None)
    if main is not None:
        out.append(f"main size {main['label']} (ratios: time of the row / time of the column's moo_kernels entry):")
        out.append(main_table(result, main))
        if meta["device"] == "cuda":
            out.append(
                "median/min: one call, L2 flushed, device idle before it (includes the host-side cost); batch: "
                "back-to-back calls / count; device: CUDA-graph replay (device work only); GB/s over "
                f"{result['bytes_formula']}, device time where measured; peak: max_memory_allocated rise"
            )
        else:
            out.append(f"GB/s: {result['bytes_formula']} / median time")
    if len(result["points"]) > 1:
        out.append(sizes_table(result))
    for name, tg in result.get("targets", {}).items():
        met = "met" if tg["met"] else "NOT met"
        out.append(f"target {name}: {fmt_num(tg['value'], '.3f')} against {tg['target']:g}: {met}")
    if result["skipped"]:
        out.append(f"sizes skipped (time budget spent): {', '.join(result['skipped'])}")
    if not result["correct"]:
        out.append(f"DISAGREE WITH THE REFERENCE: {', '.join(result['disagree'])}")
    return "\n".join(out)
