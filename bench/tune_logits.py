"""Sweep the fused logits-loss kernel's settings: vocabulary entries per program (chunk), tile width
(block), warps and register cap, at the benchmark's shapes, through the public op (forward + backward).

Every shape starts from the launcher's defaults, nothing carried over from the shape before: the default
setting runs first, its loss is checked against the float64 reference, and every other setting's loss
and gradient are checked against the default's (the chunk exchange changes the summation order, so
within float32 rounding, not bit for bit) before it is timed. The JSON (one row per setting, the
fastest per shape with its speedup over the default) is rewritten after every setting, so a run
stopped from outside keeps what it measured. The launcher takes a winner through
MOO_KERNELS_LOGITS_{CHUNK,BLOCK,MAXNREG}.

    python bench/tune_logits.py --json out.json [--grid quick] [--budget-s 40]
    python bench/tune_logits.py --device cpu --grid tiny --json out.json     # the interpreter, tiny shapes

--device cpu runs the Triton kernels under the interpreter (TRITON_INTERPRET=1): a rehearsal of the
sweep's code path, not a tuning.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (B, T, V) per device: the logits_loss benchmark's default sizes on a GPU, tiny ones under the interpreter.
SHAPES = {"cuda": [(4, 4096, 151936), (8, 2048, 32000)], "cpu": [(1, 4, 512), (1, 2, 1024)]}
CHUNKS = [8192, 16384, 32768, 1 << 20]  # 1 << 20: a whole row per program (no exchange)
BLOCKS = [1024, 2048, 4096, 8192]
WARPS = [4, 8, 16]
MAXNREG = [64, 96, 128]
# (chunk, block, warps, maxnreg) lists; the launcher's default setting is always swept first.
GRIDS = {
    "full": list(itertools.product(CHUNKS, BLOCKS, WARPS, MAXNREG)),
    "quick": [(c, b, 8, 96) for c in CHUNKS for b in (2048, 4096)]
    + [(16384, 8192, 8, 128), (16384, 8192, 16, 96), (32768, 8192, 16, 96), (16384, 4096, 16, 96)],
    "tiny": [(128, 64, 8, 96), (256, 128, 8, 96), (1 << 20, 256, 8, 96)],
}
SETTING = ("CHUNK_V", "BLOCK_V", "NUM_WARPS", "LOSS_MAXNREG")  # the launcher's module-level names, in order
LOSS_RTOL = 1e-4  # loss against the default's and against the float64 reference, relative to max(1, |loss|)
GRAD_RTOL = 1e-2  # gradient against the default's, max abs relative to the default's max |gradient|


def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in spec.split(","):
        dims = tuple(int(x) for x in item.lower().split("x"))
        if len(dims) != 3 or min(dims) < 1:
            raise ValueError(f"shape {item!r} is not BxTxV")
        shapes.append(dims)
    return shapes


class Sweep:
    """One run: the launcher's defaults, the output document and its file, the clock."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        from moo_kernels.bench.report import run_meta, write_json
        from moo_kernels.ops.logits import triton_launch as lc

        self.lc, self.write_json, self.device, self.args = lc, write_json, device, args
        self.defaults = tuple(getattr(lc, name) for name in SETTING)
        self.path = Path(args.json)
        self.start = time.monotonic()
        self.doc: dict[str, Any] = {
            "meta": run_meta("tune_logits", device, args.grid != "full", ROOT)
            | {"grid": args.grid, "budget_s": args.budget_s, "interpreted": os.environ.get("TRITON_INTERPRET") == "1"},
            "defaults": dict(zip(SETTING, self.defaults, strict=True)),
            "rows": [],
            "best": {},
            "complete": False,
        }  # fmt: skip

    def save(self) -> None:
        self.write_json(self.doc, self.path)

    def use(self, setting: tuple[int, ...]) -> None:
        for name, value in zip(SETTING, setting, strict=True):
            setattr(self.lc, name, value)

    def timer(self, step):
        from moo_kernels.bench.timing import time_cpu, time_cuda_graph

        if self.device == "cuda":
            return time_cuda_graph(step, reps=20, batch=10)
        return time_cpu(step, warmup=1, reps=3)

    def shape(self, shape: tuple[int, int, int], settings: list[tuple[int, ...]], deadline: float) -> None:
        """The default setting, then every other one while time is left; always back to the defaults."""
        import moo_kernels as mk
        from moo_kernels.bench.logits_loss import make_inputs, moo_loss
        from moo_kernels.bench.policy_loss import make_step, reference_grads
        from moo_kernels.bench.timing import gbps

        b, t, v = shape
        key = "x".join(map(str, shape))
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        inp = make_inputs(b, t, v, dtype, self.device)
        ref_loss = reference_grads(inp["logp64"], inp)[4]["loss"]
        run = make_step(moo_loss(inp, False), inp["logits"])
        backend = "auto" if self.device == "cuda" else "triton"
        nbytes = 2 * b * t * v * inp["logits"].element_size()
        base: tuple[float, torch.Tensor, float] | None = None  # the default's loss, gradient, max |gradient|
        try:
            for setting in [self.defaults] + [s for s in settings if s != self.defaults]:
                if base is not None and time.monotonic() > deadline:
                    self.doc.setdefault("stopped_early", []).append(key)
                    break
                self.use(setting)
                row: dict[str, Any] = dict(zip(("chunk", "block", "warps", "maxnreg"), setting, strict=True))
                row |= {"shape": list(shape), "default": setting == self.defaults, "chunks": self.lc._tiles(v)[2]}

                def step(run=run):
                    with mk.use_backend(backend):
                        return run()

                try:
                    loss_t, grad = step()
                    loss = float(loss_t.detach())
                    if base is None:
                        base = (loss, grad.detach().float().clone(), float(grad.detach().abs().max()))
                        row["loss_ref_diff"] = abs(loss - ref_loss)
                        row["correct"] = row["loss_ref_diff"] <= LOSS_RTOL * max(1.0, abs(ref_loss))
                    else:
                        row["loss_diff"] = abs(loss - base[0])
                        row["grad_max_diff"] = float((grad.detach().float() - base[1]).abs().max())
                        row["correct"] = (
                            row["loss_diff"] <= LOSS_RTOL * max(1.0, abs(base[0]))
                            and row["grad_max_diff"] <= GRAD_RTOL * base[2]
                        )
                    del loss_t, grad
                    if row["correct"]:
                        tm = self.timer(step)
                        row["us"] = tm.median_us
                        row["effective_gbps"] = gbps(nbytes, tm.median_us)
                except Exception as e:  # noqa: BLE001 - a setting that does not compile or launch is reported
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    row.setdefault("correct", False)
                self.doc["rows"].append(row)
                self.best(key)
                self.save()
                print(_line(row), flush=True)
                if base is None:  # the default setting failed: nothing to compare the others with
                    break
        finally:
            self.use(self.defaults)
            inp = run = None
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def best(self, key: str) -> None:
        rows = [r for r in self.doc["rows"] if "x".join(map(str, r["shape"])) == key]
        timed = [r for r in rows if "us" in r]
        if not timed:
            return
        best = min(timed, key=lambda r: r["us"])
        default = next((r for r in rows if r["default"] and "us" in r), None)
        self.doc["best"][key] = best | {"speedup_vs_default": default["us"] / best["us"] if default else None}


def _line(row: dict[str, Any]) -> str:
    head = f"{'x'.join(map(str, row['shape']))} chunk {row['chunk']} block {row['block']} warps {row['warps']} "
    head += f"maxnreg {row['maxnreg']} ({row['chunks']} chunks){' default' if row['default'] else ''}: "
    if "error" in row:
        return head + row["error"]
    if not row["correct"]:
        return head + "DISAGREES with the default setting / the reference"
    return head + f"{row['us']:.1f} us, {row['effective_gbps']:.0f} GB/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output file, rewritten after every setting")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    ap.add_argument("--grid", choices=list(GRIDS), help="settings swept (default: quick on cuda, tiny on cpu)")
    ap.add_argument("--quick", dest="grid", action="store_const", const="quick", help="--grid quick")
    ap.add_argument("--shapes", help="BxTxV[,BxTxV...] (default: the device's SHAPES)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop sweeping after this many seconds, shared out between the shapes")  # fmt: skip
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("tune_logits: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("tune_logits: --device cpu needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before moo_kernels imports triton
    args.grid = args.grid or ("quick" if device == "cuda" else "tiny")
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else SHAPES[device]
    except ValueError as e:
        print(f"tune_logits: --shapes: {e}", file=sys.stderr)
        return 2

    sweep = Sweep(args, device)
    if device == "cuda":
        from moo_kernels.bench.timing import cuda_copy_bandwidth

        sweep.doc["copy_bandwidth"] = cuda_copy_bandwidth()
    sweep.save()
    for i, shape in enumerate(shapes):
        # Each shape may run until its share of the budget is spent; what one leaves goes to the next.
        deadline = sweep.start + args.budget_s * (i + 1) / len(shapes)
        sweep.shape(shape, GRIDS[args.grid], deadline)
    sweep.doc["complete"] = True
    sweep.doc["seconds"] = time.monotonic() - sweep.start
    sweep.save()
    for key, best in sweep.doc["best"].items():
        speedup = best["speedup_vs_default"]
        print(f"best {key}: {_line(best)}; {speedup:.3f}x the default" if speedup else f"best {key}: {_line(best)}")
    rows = sweep.doc["rows"]
    errors = [r for r in rows if "error" in r]
    wrong = [r for r in rows if not r["correct"] and "error" not in r]
    if errors:
        print(f"tune_logits: {len(errors)} setting(s) did not compile or launch (recorded)", file=sys.stderr)
    if wrong:
        print(f"tune_logits: {len(wrong)} setting(s) DISAGREE with the default / the reference", file=sys.stderr)
    # Exit 1 on a wrong result, a default setting that fails, or a shape left unmeasured; a setting that
    # does not compile (too many registers, too much shared memory) is a finding, recorded in its row.
    defaults_ok = all(r["correct"] for r in rows if r["default"])
    return 0 if not wrong and defaults_ok and len(sweep.doc["best"]) == len(shapes) else 1


if __name__ == "__main__":
    sys.exit(main())
