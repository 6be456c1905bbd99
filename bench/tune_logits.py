"""Sweep the fused logits-loss kernel's settings on a GPU: vocabulary entries per program (chunk), tile
width (block), warps and register cap, at the benchmark's shapes. Every setting's loss and gradient are
checked against the default setting's before it is timed (the chunk exchange changes the summation
order, so within float32 rounding, not bit for bit). Writes a JSON with one row per setting and the
fastest per shape; the launcher takes the winner through MOO_KERNELS_LOGITS_{CHUNK,BLOCK,MAXNREG}.

    python bench/tune_logits.py --json out.json [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moo_kernels as mk  # noqa: E402
from moo_kernels.bench.report import run_meta  # noqa: E402
from moo_kernels.bench.timing import cuda_copy_bandwidth, gbps, time_cuda_graph  # noqa: E402
from moo_kernels.ops.logits import cuda as lc  # noqa: E402
from moo_kernels.ops.logits.op import problem_from_args  # noqa: E402
from moo_kernels.ops.policy_loss.api import check_loss_args  # noqa: E402

SHAPES = [(4, 4096, 151936), (8, 2048, 32000)]
CHUNKS = [8192, 16384, 32768, 1 << 20]  # 1 << 20: a whole row per program (no exchange)
BLOCKS = [1024, 2048, 4096, 8192]
WARPS = [4, 8, 16]
MAXNREG = [64, 96, 128]


def problem(b, t, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(b, t, v, device="cuda", generator=g, dtype=torch.bfloat16)
    tokens = torch.randint(0, v, (b, t), device="cuda", generator=g)
    adv = torch.randn(b, device="cuda", generator=g)
    mask = torch.rand(b, t, device="cuda", generator=g) > 0.1
    with torch.no_grad():
        lp = mk.token_logprobs(logits, tokens)
    old = lp + 0.05 * torch.randn(b, t, device="cuda", generator=g)
    ref = lp + 0.05 * torch.randn(b, t, device="cuda", generator=g)
    return logits, tokens, adv, mask, dict(old_logp=old, ref_logp=ref, beta=0.04, clip_high=0.28)


def sweep_shape(shape, settings, out_of_time, out) -> None:
    b, t, v = shape
    logits, tokens, adv, mask, kw = problem(b, t, v)
    grad = torch.empty_like(logits)
    loss_args = check_loss_args((b, t), logits.device, "logits", adv, mask, kw["old_logp"], kw["ref_logp"], None,
                                None, None, 0.04, "k3", 0.2, 0.28, None, None, "clip", 0.1, "token-mean", None,
                                None)  # fmt: skip
    p = problem_from_args((*loss_args, True))

    def fused():
        return lc.logits_loss_triton(logits, tokens, p, 1.0, False, grad)[0]

    base_loss = fused().item()
    base_grad = grad.float()
    scale = base_grad.abs().max().item()
    nbytes = 2 * logits.numel() * logits.element_size()
    for chunk, block, warps, maxnreg in settings:
        if out_of_time():
            out["stopped_early"] = True
            break
        lc.CHUNK_V, lc.BLOCK_V, lc.NUM_WARPS, lc.LOSS_MAXNREG = chunk, block, warps, maxnreg
        row = dict(shape=list(shape), chunk=chunk, block=block, warps=warps, maxnreg=maxnreg, chunks=lc._tiles(v)[2])
        try:
            grad.zero_()
            loss = fused().item()
            row["loss_diff"] = abs(loss - base_loss)
            row["grad_max_diff"] = (grad.float() - base_grad).abs().max().item()
            row["correct"] = (
                row["loss_diff"] <= 1e-4 * max(1.0, abs(base_loss)) and row["grad_max_diff"] <= 1e-2 * scale
            )
            if row["correct"]:
                tm = time_cuda_graph(fused, reps=20, batch=10)
                row["device_us"] = tm.median_us
                row["effective_gbps"] = gbps(nbytes, tm.median_us)
        except Exception as e:  # a setting that does not compile or launch is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in out["rows"] if r["shape"] == list(shape) and "device_us" in r]
    if timed:
        best = min(timed, key=lambda r: r["device_us"])
        out.setdefault("best", {})["x".join(map(str, shape))] = best
        print("best", json.dumps(best), flush=True)
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer settings")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop sweeping after this many seconds")
    args = ap.parse_args()
    start = time.perf_counter()
    out = {"meta": run_meta("tune_logits", "cuda", args.quick, Path(__file__).resolve().parents[1]), "rows": []}
    out["copy_bandwidth"] = cuda_copy_bandwidth()
    settings = list(itertools.product(CHUNKS, BLOCKS, WARPS, MAXNREG))
    if args.quick:
        settings = [(c, b, 8, 96) for c in CHUNKS for b in (2048, 4096)]
        settings += [(16384, 8192, 8, 128), (16384, 8192, 16, 96), (32768, 8192, 16, 96), (16384, 4096, 16, 96)]
    for shape in SHAPES:
        sweep_shape(shape, settings, lambda: time.perf_counter() - start > args.budget_s, out)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
