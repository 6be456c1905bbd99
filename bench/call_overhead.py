"""Per-call time of each op's entries on the CPU (C++ backend), side by side in one run.

Every op has one implementation and one backward and three entries to them (docs/ARCHITECTURE.md): the public
function in eager mode (an autograd.Function around the implementation when a gradient is needed, the
implementation alone otherwise), the registered torch.library op (the entry torch.compile takes; called here in
eager mode, through the dispatcher) and the implementation alone (no validation, no autograd). Tiny inputs show the
fixed cost of a call, the benchmarks' main sizes its share of a realistic call. Each entry's outputs are checked
against the public function's before anything is timed.

--against DIR compares the public functions' per-call time on tiny inputs with another checkout of the package
(an older commit, say), the two timed alternately in fresh processes, a few rounds: the side-by-side check that a
change of structure costs no time per call.

    python bench/call_overhead.py             # the table, and bench/results/call_overhead_cpu_<date>.json
    python bench/call_overhead.py --no-write  # the table only
    python bench/call_overhead.py --against /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

if "--public" not in sys.argv:  # --public runs in another checkout: its moo_kernels comes from PYTHONPATH
    sys.path.insert(0, str(ROOT))
import moo_kernels as mk  # noqa: E402

ENTRIES = ("public function (eager)", "registered op (dispatcher)", "implementation alone")


def best_us(fn: Callable[[], object], calls: int, repeats: int = 5) -> float:
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


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.equal(a, b):
        raise AssertionError(f"{what}: the entries disagree")


def policy_loss_entries(B: int, T: int, grad: bool) -> tuple[Callable, ...]:
    from moo_kernels.ops.loss.spec import loss_spec
    from moo_kernels.ops.policy_loss import op as pl_op

    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=g)).requires_grad_(grad)
    adv, mask = torch.randn(B, generator=g), torch.rand(B, T, generator=g) > 0.2
    old = logp.detach() + 0.05 * torch.randn(B, T, generator=g)
    spec = loss_spec((B, T), logp.device, "logp", advantages=adv, mask=mask, old_logp=old, clip_high=0.28)
    entries = (
        lambda: mk.policy_loss(logp, adv, mask, old_logp=old, clip_high=0.28)[0],
        lambda: pl_op.policy_loss_op(logp, *spec.flat(), grad)[0],
        lambda: pl_op.run(logp, spec, grad)[0],
    )
    first = entries[0]().detach()
    for e in entries[1:]:
        _same(e().detach(), first, f"policy_loss {B}x{T}")
    return entries


def advantages_entries(N: int, K: int, G: int, grad: bool) -> tuple[Callable, ...]:
    from moo_kernels._spec import Context
    from moo_kernels.ops.advantages import op as adv_op
    from moo_kernels.ops.advantages.spec import AdvantageSpec

    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(N, K, generator=g).requires_grad_(grad)
    spec, derived = AdvantageSpec.prepare(Context({"N": N, "K": K}, rewards.device, "rewards"), group_size=N // G)
    entries = (
        lambda: mk.multi_objective_advantages(rewards, group_size=N // G).advantages,
        lambda: adv_op.advantages_op(rewards, *spec.flat(), *derived.flat())[0],
        lambda: adv_op.run(rewards, spec, derived)[0],
    )
    first = entries[0]().detach()
    for e in entries[1:]:
        _same(e().detach(), first, f"advantages {N}x{K}")
    return entries


# (op, gradient, label of the tiny size, its entries, label of the main size, its entries, calls tiny / main)
CASES = [
    ("policy_loss", True, "B=2 T=8", lambda: policy_loss_entries(2, 8, True),
     "B=64 T=4096", lambda: policy_loss_entries(64, 4096, True)),
    ("policy_loss", False, "B=2 T=8", lambda: policy_loss_entries(2, 8, False),
     "B=64 T=4096", lambda: policy_loss_entries(64, 4096, False)),
    ("multi_objective_advantages", True, "N=16 K=2", lambda: advantages_entries(16, 2, 4, True),
     "N=65536 K=4", lambda: advantages_entries(65536, 4, 4096, True)),
    ("multi_objective_advantages", False, "N=16 K=2", lambda: advantages_entries(16, 2, 4, False),
     "N=65536 K=4", lambda: advantages_entries(65536, 4, 4096, False)),
]  # fmt: skip


def measure(calls_tiny: int, calls_main: int) -> list[dict]:
    rows = []
    with mk.use_backend("cpp"):
        for op, grad, tiny_label, tiny, main_label, main in CASES:
            tiny_entries, main_entries = tiny(), main()
            for name, t, m in zip(ENTRIES, tiny_entries, main_entries, strict=True):
                rows.append(
                    dict(op=op, grad=grad, entry=name, tiny=tiny_label, main=main_label,
                         tiny_us=best_us(t, calls_tiny), main_us=best_us(m, calls_main))
                )  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'op':28s} {'grad':5s} {'entry':28s} {'tiny (us)':>10s} {'main (us)':>11s}"]
    for r in rows:
        lines.append(f"{r['op']:28s} {str(r['grad']):5s} {r['entry']:28s} {r['tiny_us']:10.1f} {r['main_us']:11.1f}")
    return "\n".join(lines)


def public_calls() -> dict[str, float]:
    """The public functions on tiny inputs (their API is the same at every commit): us per call."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 8, 11
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    adv, mask = torch.randn(B, generator=g), torch.rand(B, T, generator=g) > 0.2
    logits = torch.randn(B, T, V, generator=g).requires_grad_()
    tokens = torch.randint(0, V, (B, T), generator=g)
    r = torch.randn(16, 2, generator=g)
    c, q = torch.rand(64, generator=g) > 0.5, torch.rand(64, generator=g)
    c1k, q1k = torch.rand(1024, generator=g) > 0.5, torch.rand(1024, generator=g)
    c256k, q256k = torch.rand(262144, generator=g) > 0.5, torch.rand(262144, generator=g)
    calls = {
        "policy_loss, gradient": lambda: mk.policy_loss(logp, adv, mask, clip_high=0.28),
        "policy_loss, no gradient": lambda: mk.policy_loss(logp.detach(), adv, mask, clip_high=0.28),
        "policy_loss_from_logits, gradient": lambda: mk.policy_loss_from_logits(logits, tokens, adv, mask),
        "token_logprobs, no gradient": lambda: mk.token_logprobs(logits.detach(), tokens),
        "multi_objective_advantages, no gradient": lambda: mk.multi_objective_advantages(r, group_size=4),
        "multi_objective_advantages, gradient": lambda: mk.multi_objective_advantages(
            r.clone().requires_grad_(), group_size=4
        ),
        "brier_reward, 64": lambda: mk.brier_reward(c, q),
        "brier_reward, 1024": lambda: mk.brier_reward(c1k, q1k),
        "brier_reward, 262144": lambda: mk.brier_reward(c256k, q256k),
    }
    with mk.use_backend("cpp"):
        return {name: best_us(fn, 300 if name.endswith("262144") else 3000) for name, fn in calls.items()}


def against(other: Path, rounds: int) -> int:
    """This checkout and another, timed alternately in fresh processes; the fastest of the rounds of each."""
    import os
    import subprocess

    trees = {"this": ROOT, "other": other.resolve()}
    best: dict[str, dict[str, float]] = {k: {} for k in trees}
    for _ in range(rounds):
        for key, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree))
            out = subprocess.run([sys.executable, __file__, "--public"], env=env, cwd=tree, check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            for name, us in json.loads(out.splitlines()[-1]).items():
                best[key][name] = min(us, best[key].get(name, float("inf")))
    print(f"Public functions, tiny inputs, C++ backend: fastest of {rounds} alternating rounds (us per call)")
    print(f"this: {ROOT}\nother: {trees['other']}")
    print(f"{'call':42s} {'other':>8s} {'this':>8s} {'this/other':>11s}")
    for name, us in best["this"].items():
        theirs = best["other"].get(name)
        ratio = f"{us / theirs:11.2f}" if theirs else f"{'-':>11s}"
        print(f"{name:42s} {theirs or float('nan'):8.1f} {us:8.1f} {ratio}")
    from moo_kernels.bench.report import git_commit, run_meta

    meta = run_meta("call_overhead_against", "cpu", quick=False)
    meta["command"] = f"python bench/call_overhead.py --against <checkout> --rounds {rounds}"
    meta["other"] = git_commit(trees["other"])
    day = datetime.date.today().strftime("%Y%m%d")
    path = ROOT / "bench" / "results" / f"call_overhead_against_cpu_{day}.json"
    path.write_text(
        json.dumps({"format": "call_overhead_against-1", "device": "cpu", "meta": meta, "us": best}, indent=1)
    )
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    ap.add_argument("--calls", type=int, default=3000, help="calls per repeat at the tiny sizes")
    ap.add_argument("--against", type=Path, help="another checkout: compare the public functions' per-call time")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of --against")
    ap.add_argument("--public", action="store_true", help=argparse.SUPPRESS)  # one round of --against, as JSON
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.public:
        print(json.dumps(public_calls()))
        return 0
    if args.against is not None:
        return against(args.against, args.rounds)
    from moo_kernels.bench.report import run_meta

    rows = measure(args.calls, max(20, args.calls // 100))
    print(f"Per-call time on the CPU (C++ backend), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table(rows))
    if not args.no_write:
        meta = run_meta("call_overhead", "cpu", quick=False)
        meta["command"] = "python bench/call_overhead.py"
        day = datetime.date.today().strftime("%Y%m%d")
        path = ROOT / "bench" / "results" / f"call_overhead_cpu_{day}.json"
        path.write_text(
            json.dumps({"format": "call_overhead-1", "device": "cpu", "meta": meta, "rows": rows}, indent=1)
        )
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
