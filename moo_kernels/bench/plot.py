"""Draw the plot of a suite's results JSON again, beside it (FILE.json -> FILE.png).

For results that came back from another machine as JSON alone (bench/gpu_check.sh writes no PNG):
copy them into bench/results/, then

    python -m moo_kernels.bench.plot bench/results/logits_loss_cuda_20261201.json
    python -m moo_kernels.bench.plot --missing bench/results/*.json     # only where no current PNG is
    python bench/render_readme.py                                        # the README's performance section
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import have_matplotlib, plot_suite


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moo_kernels.bench.plot", description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="results JSON written by moo-bench")
    ap.add_argument("--missing", action="store_true",
                    help="skip a JSON whose PNG exists and is newer, and any JSON that is not moo-bench's")  # fmt: skip
    args = ap.parse_args(argv)
    if not have_matplotlib():
        print("moo-bench plot: matplotlib is not installed (pip install 'moo_kernels[bench]')", file=sys.stderr)
        return 2
    rc = 0
    for path in args.json:
        png = path.with_suffix(".png")
        if args.missing and png.exists() and png.stat().st_mtime >= path.stat().st_mtime:
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"moo-bench plot: {path}: {e}", file=sys.stderr)
            rc = 1
            continue
        if result.get("format") != 2 or "points" not in result:
            print(f"moo-bench plot: {path}: not a moo-bench results file (format 2)", file=sys.stderr)
            rc = rc if args.missing else 1  # a glob of a results folder holds other JSON too
            continue
        if not any(p.get("timings") for p in result["points"]):
            print(f"moo-bench plot: {path}: nothing was timed, no plot", file=sys.stderr)
            continue
        plot_suite(result, png)
        print(f"wrote {png}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
