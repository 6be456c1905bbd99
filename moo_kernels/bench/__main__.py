"""moo-bench: benchmark moo_kernels against the eager, compiled, per-sample-loop and Liger baselines.

Writes, per suite, <out>/<suite>_<device>_<YYYYMMDD>.json (device, versions, date, commit, every figure;
rewritten after every size, "complete": false until the suite ends) and a .png of time against problem
size (`python -m moo_kernels.bench.plot FILE.json` draws it again from the JSON); prints a table per
suite. Correctness is checked before any timing: an implementation that disagrees with the float64
reference stops its suite (exit status 1) unless --keep-going.

    python -m moo_kernels.bench                      # every suite, default sizes, cuda when available
    python -m moo_kernels.bench --suites advantages --sizes advantages=65536,4096 --device cpu
    python -m moo_kernels.bench --quick --no-compile --out /tmp/bench    # tiny, for CI

Exit status: 0; 1 when an implementation disagreed or a suite failed; 2 on a usage error; 3 on the
CPU when a C++ kernel is missing and the reference backend was timed in its place (0 with
--allow-fallback).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from . import timing
from .advantages import AdvantagesSuite
from .core import Context, Suite, parse_sizes, run_suite
from .linear_loss import LinearLossSuite
from .logits_loss import LogitsLossSuite
from .policy_loss import PolicyLossSuite
from .report import ROOT, Progress, format_result, have_matplotlib, plot_suite, write_json

SUITES: dict[str, type[Suite]] = {
    s.name: s for s in (AdvantagesSuite, PolicyLossSuite, LogitsLossSuite, LinearLossSuite)
}
# Shares of --budget-s (the logits suite compiles and moves the most bytes).
BUDGET_WEIGHT = {"advantages": 1.0, "policy_loss": 1.0, "logits_loss": 2.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="moo-bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sizes presets: " + "; ".join(
            f"{name} ({'x'.join(s.dims).upper()}): " + ", ".join(s.presets["cpu"]) for name, s in SUITES.items()
        ),
    )  # fmt: skip
    ap.add_argument("--suites", default=",".join(SUITES), help="comma list (default: all): " + ", ".join(SUITES))
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="input dtype (auto: float32, logits bfloat16 on cuda); suites that support only float32 "
                    "refuse another")  # fmt: skip
    ap.add_argument(
        "--sizes", action="append", default=[], metavar="[SUITE=]SPEC",
        help="a preset (tiny, small, default, large) or sizes AxB[,AxB...] (the first is the main size; fewer "
        "numbers than the suite's dims take the rest from its default); SUITE= applies it to one suite; repeatable",
    )  # fmt: skip
    ap.add_argument("--reps", type=int, help="timed repetitions per implementation (default: per device)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI)")
    comp = ap.add_mutually_exclusive_group()
    comp.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="time the torch.compile baselines (the default, except with --quick)",
    )
    comp.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baselines")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    ap.add_argument("--budget-s", type=float, metavar="S",
                    help="time budget of the run: once a suite's share is spent its remaining sizes are skipped "
                    "(the main size always runs)")  # fmt: skip
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="time even when an implementation disagrees with the reference (still exits 1)",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="CPU: interleave the implementations' timed calls (fairer on a busy shared machine)",
    )
    ap.add_argument(
        "--allow-fallback",
        action="store_true",
        help="CPU: exit 0 when a C++ kernel is missing and the reference backend was timed instead",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG")
    return ap.parse_args(argv)


def _sizes_per_suite(args: argparse.Namespace, suites: list[str], device: str) -> dict[str, list[dict[str, int]]]:
    spec = {name: "tiny" if args.quick else "default" for name in suites}
    for item in args.sizes:
        name, sep, value = item.partition("=")
        if sep and name in SUITES:
            if name in spec:
                spec[name] = value
        else:
            spec = dict.fromkeys(spec, item)
    return {name: parse_sizes(SUITES[name], device, spec[name]) for name in suites}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if unknown:
        print(f"moo-bench: unknown suite(s) {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("moo-bench: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.dtype != "auto":
        refuse = [s for s in suites if args.dtype not in SUITES[s].supported_dtypes]
        if refuse:
            print(f"moo-bench: --dtype {args.dtype}: suite(s) {refuse} run in float32 only", file=sys.stderr)
            return 2
    try:
        sizes = _sizes_per_suite(args, suites, device)
    except ValueError as e:
        print(f"moo-bench: --sizes: {e}", file=sys.stderr)
        return 2
    plot = not args.no_plot and have_matplotlib()
    if not args.no_plot and not plot:
        print("moo-bench: matplotlib is not installed (pip install 'moo_kernels[bench]'): JSON only, no plots",
              file=sys.stderr)  # fmt: skip

    progress = Progress(not args.no_progress)
    ctx = Context(device=device, dtype=args.dtype, quick=args.quick, keep_going=args.keep_going, reps=args.reps,
                  use_compile=args.compile if args.compile is not None else not args.quick,
                  interleave=args.interleave, progress=progress)  # fmt: skip
    copy = None
    if device == "cuda":
        progress.update(suite="device copy bandwidth")
        copy = timing.cuda_copy_bandwidth((64 << 20) if args.quick else (1 << 30))
        ctx.copy_gbps = copy["gbps"]
        progress.log(f"device-to-device copy: {copy['gbps']:.0f} GB/s (read + write)")
    if ctx.use_compile:
        timing.allow_recompiles()

    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    t0 = time.monotonic()
    rc = 0
    try:
        for i, name in enumerate(suites):
            deadline = None
            if args.budget_s is not None:
                left = args.budget_s - (time.monotonic() - t0)
                weights = [BUDGET_WEIGHT.get(s, 1.0) for s in suites[i:]]
                deadline = time.monotonic() + max(0.0, left) * weights[0] / sum(weights)
            path = args.out / f"{name}_{device}_{day}.json"

            def save(result: dict, path: Path = path) -> None:
                result["meta"] |= {"command": " ".join(["moo-bench", *(sys.argv[1:] if argv is None else argv)]),
                                   "copy_bandwidth": copy, "budget_s": args.budget_s}  # fmt: skip
                write_json(result, path)

            # The JSON is rewritten after every size: a run stopped from outside keeps what it measured.
            result = run_suite(SUITES[name], ctx, sizes[name], deadline, on_point=save)
            save(result)
            progress.close() if i == len(suites) - 1 else None
            progress.log(format_result(result))
            progress.log(f"wrote {path}")
            if plot and any(p.get("timings") for p in result["points"]):
                plot_suite(result, path.with_suffix(".png"))
                progress.log(f"wrote {path.with_suffix('.png')}")
            if not result["correct"]:
                rc = 1
            elif result["info"].get("moo_fallback_reason") and not args.allow_fallback and rc == 0:
                progress.log(f"FAILED: {name}: the C++ kernel is missing (python setup.py build_ext --inplace)")
                rc = 3
    finally:
        progress.close()
    print(f"moo-bench: {len(suites)} suite(s) in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
