"""Per-call time of the ops' entry points on the CPU, side by side in one run: the public function (its eager
path: an autograd.Function around the implementation), the registered torch.library op (the path torch.compile
takes, through the dispatcher), and the implementation alone. Tiny inputs show the fixed overhead of a call,
the benchmark's main size its share of a realistic call.

    python bench/call_overhead.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moo_kernels as mk  # noqa: E402
from moo_kernels.ops.loss.spec import loss_spec  # noqa: E402
from moo_kernels.ops.policy_loss import op as pl  # noqa: E402


def best_us(fn, calls: int, repeats: int = 5) -> float:
    """The fastest of `repeats` runs of `calls` calls, in microseconds a call."""
    for _ in range(max(3, calls // 20)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def policy_loss_rows(B: int, T: int, calls: int) -> list[tuple[str, float]]:
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    adv, mask = torch.randn(B, generator=g), torch.rand(B, T, generator=g) > 0.2
    spec = loss_spec((B, T), logp.device, "logp", advantages=adv, mask=mask)
    flat = spec.flat()
    return [
        ("public function (eager path)", best_us(lambda: mk.policy_loss(logp, adv, mask), calls)),
        ("registered op (dispatcher)", best_us(lambda: pl.policy_loss_op(logp, *flat, True), calls)),
        ("implementation alone", best_us(lambda: pl.run(logp, spec, True), calls)),
    ]


def main() -> int:
    torch.manual_seed(0)
    with mk.use_backend("cpp"):
        tiny = policy_loss_rows(2, 8, 3000)
        main_size = policy_loss_rows(64, 4096, 200)
    print(f"policy_loss on the CPU (C++ backend, forward with the gradient), torch {torch.__version__}")
    print(f"{'entry':32s} {'B=2 T=8 (us)':>14s} {'B=64 T=4096 (us)':>18s}")
    for (name, a), (_, b) in zip(tiny, main_size, strict=True):
        print(f"{name:32s} {a:14.1f} {b:18.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
