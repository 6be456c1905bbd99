"""Outputs and gradients of every op over a fixed grid of inputs and options, to hold a refactoring to
"behaviour unchanged": take a snapshot at one commit, compare at another.

    python bench/snapshot.py --out before.pt            # at the old commit
    python bench/snapshot.py --compare before.pt        # at the new one: exit 1 on a difference

The C++ backend must reproduce the snapshot bit for bit on every case; the float64 reference to float64
rounding and the Triton kernels (run under the interpreter when there is no GPU) to their float32 tolerance,
on a quarter of the cases (the interpreter is slow). Every case is
called through the public functions with the options as keywords, so the script does not depend on how the
package is organised inside. python_tests/test_snapshot.py compares the package with the committed snapshot.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # without a GPU the Triton kernels run under the interpreter

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moo_kernels as mk  # noqa: E402

Case = tuple[str, Callable[[], list[torch.Tensor]]]
SUBSET_EVERY = 4  # the Triton kernels and the reference run one case in this many


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def advantage_cases() -> Iterator[Case]:
    grid = itertools.product(
        (torch.float32, torch.float64, torch.bfloat16),
        ("zscore", "center", "rloo", "none"),
        ("scalarize", "fixed", "variance"),
        (False, True),  # batch_normalize
        ("plain", "gated", "ids"),
    )
    for i, (dtype, normalize, weighting, batch_normalize, kind) in enumerate(grid):

        def call(i=i, dtype=dtype, normalize=normalize, weighting=weighting, bn=batch_normalize, kind=kind):
            g = _gen(i)
            n, k = 24, 3
            r = torch.randn(n, k, generator=g, dtype=torch.float64)
            r[:, 0] = (r[:, 0] > 0).double()
            r[5] = r[4][[0, 2, 1]]  # a permutation tie
            r = r.to(dtype).requires_grad_()
            w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
            kw = dict(weights=w, normalize=normalize, weighting=weighting, batch_normalize=bn, eps=1e-6)
            if kind == "gated":
                kw.update(
                    valid=torch.rand(n, generator=g) > 0.1, gates=torch.rand(n, 2, generator=g) > 0.15,
                    reward_gates=torch.rand(n, k, generator=g) > 0.2, gated_value=0.5, infeasible_advantage=-0.5,
                    min_feasible=2, drop_zero_variance=True, positive_scale=1.0, negative_scale=0.5, clip=2.0,
                )  # fmt: skip
            if kind == "ids":
                kw["group_ids"] = torch.randint(0, 5, (n,), generator=g)
            else:
                kw["group_size"] = 6
            out = mk.multi_objective_advantages(r, **kw)
            loss = (out.advantages * torch.linspace(-1, 1, n, dtype=out.advantages.dtype)).sum()
            loss = loss + out.weights.sum() + out.std.sum() * 0.3 + out.mean.sum() * 0.1
            loss.backward()
            return [x.detach() for x in out] + [r.grad, w.grad]

        yield f"advantages/{dtype}/{normalize}/{weighting}/bn={batch_normalize}/{kind}", call


LOSS_OPTIONS = [
    dict(mode="clip", kl="k3", beta=0.04, clip_high=0.28, agg="token-mean"),
    dict(mode="clip", kl="k1", beta=0.1, dual_clip=3.0, ratio_cap=4.0, agg="seq-mean-token-mean"),
    dict(mode="clip", kl="k2", beta=0.02, agg="seq-mean-token-sum", num_tokens=None),
    dict(mode="clip", agg="seq-mean-token-sum-norm", max_len=13),
    dict(mode="clip", agg="token-mean", num_tokens=57.0),
    dict(mode="gspo", agg="seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4),
    dict(mode="gspo", agg="token-mean", dual_clip=3.0),
    dict(mode="cispo", clip_low=1.0 - 1e-9, clip_high=4.0, agg="token-mean"),
    dict(mode="reinforce", agg="token-mean"),
    dict(mode="clip", offpolicy="mixed", offpolicy_gamma=0.2),
    dict(mode="clip", is_weights="token", token_advantages=True),
    dict(mode="clip", is_weights="sequence", old_logp=None),
]


def _loss_kwargs(spec: dict, b: int, t: int, g: torch.Generator) -> dict:
    kw = dict(spec)
    lp_old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    if kw.get("old_logp", True) is not None:
        kw["old_logp"] = lp_old.float()
    else:
        kw.pop("old_logp")
    if "kl" in kw:
        kw["ref_logp"] = (lp_old - 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    if kw.get("offpolicy") == "mixed":
        kw["offpolicy"] = torch.tensor([True, False] * (b // 2) + [False] * (b % 2))
    if kw.get("is_weights") == "token":
        kw["is_weights"] = torch.rand(b, t, generator=g) * 2
    elif kw.get("is_weights") == "sequence":
        kw["is_weights"] = torch.rand(b, generator=g) * 2
    if kw.pop("token_advantages", False):
        kw["token_advantages"] = 0.3 * torch.randn(b, t, generator=g)
    return kw


def loss_cases() -> Iterator[Case]:
    for i, (spec, mask_kind) in enumerate(itertools.product(LOSS_OPTIONS, ("bool", "float"))):

        def call(i=i, spec=spec, mask_kind=mask_kind):
            g = _gen(100 + i)
            b, t = 5, 13
            kw = _loss_kwargs(spec, b, t, g)
            mask = torch.rand(b, t, generator=g) > 0.25
            mask[2] = False
            if mask_kind == "float":
                mask = mask * (torch.rand(b, t, generator=g) + 0.5)
            base = kw.get("old_logp", -torch.rand(b, t, generator=g))
            logp = (base + 0.2 * torch.randn(b, t, generator=g)).clamp(max=0).requires_grad_()
            loss, metrics = mk.policy_loss(logp, torch.randn(b, generator=g), mask, **kw)
            (-1.3 * loss).backward()
            return [loss.detach(), *metrics, logp.grad]

        yield f"policy_loss/{i // 2}/{mask_kind}", call


def logits_cases() -> Iterator[Case]:
    grid = itertools.product(range(len(LOSS_OPTIONS)), (torch.float32, torch.bfloat16), (False, True))
    for i, (j, dtype, inplace) in enumerate(grid):

        def call(i=i, j=j, dtype=dtype, inplace=inplace):
            g = _gen(200 + i)
            b, t, v = 4, 6, 37
            kw = _loss_kwargs(LOSS_OPTIONS[j], b, t, g)
            leaf = (torch.randn(b, t + 1, v, generator=g) * 2).to(dtype).requires_grad_()
            x = leaf * 1.0
            tokens = torch.randint(0, v, (b, t), generator=g)
            mask = torch.rand(b, t, generator=g) > 0.25
            loss, metrics, ent = mk.policy_loss_from_logits(
                x[:, :-1], tokens, torch.randn(b, generator=g), mask, temperature=0.8, inplace_backward=inplace,
                return_entropy=True, **kw,
            )  # fmt: skip
            (2.0 * loss).backward()
            return [loss.detach(), *metrics, ent, leaf.grad]

        yield f"logits/{j}/{dtype}/inplace={inplace}", call

    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):

        def call(i=i, dtype=dtype):
            g = _gen(300 + i)
            x = (torch.randn(3, 5, 41, generator=g) * 3).to(dtype).requires_grad_()
            tokens = torch.randint(0, 41, (3, 5), generator=g)
            logp, ent = mk.token_logprobs(x, tokens, temperature=1.3, return_entropy=True)
            (logp * torch.randn(3, 5, generator=g)).sum().backward(retain_graph=True)
            (ent * torch.randn(3, 5, generator=g)).sum().backward()
            return [logp.detach(), ent.detach(), x.grad]

        yield f"token_logprobs/{dtype}", call


def brier_cases() -> Iterator[Case]:
    for i, dtype in enumerate((torch.float32, torch.float64)):

        def call(i=i, dtype=dtype):
            g = _gen(400 + i)
            q = torch.rand(33, generator=g, dtype=dtype).requires_grad_()
            r = mk.brier_reward(torch.rand(33, generator=g) > 0.5, q)
            r.sum().backward()
            return [r.detach(), q.grad]

        yield f"brier/{dtype}", call


def cases() -> Iterator[Case]:
    yield from advantage_cases()
    yield from loss_cases()
    yield from logits_cases()
    yield from brier_cases()


def digest(x: torch.Tensor) -> str:
    """The exact bits of a tensor, with its dtype and shape, as a short hex string."""
    import hashlib

    h = hashlib.sha256(f"{x.dtype} {tuple(x.shape)}".encode())
    h.update(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def take(backends: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """{case: {backend: outputs}}: the C++ outputs as digests of their bits (the kernels give the same bits on
    any x86-64 machine and thread count), the reference's and Triton's as tensors (compared to a tolerance: the
    reference's float64 reductions follow torch's vectorisation), those two on every SUBSET_EVERY-th case."""
    snap: dict[str, dict[str, list]] = {}
    for index, (name, call) in enumerate(cases()):
        snap[name] = {}
        for backend in backends:
            if backend != "cpp" and index % SUBSET_EVERY:
                continue
            with mk.use_backend(backend):
                outs = [x.detach().clone() for x in call()]
            snap[name][backend] = [digest(x) for x in outs] if backend == "cpp" else outs
    return snap


def compare(old: dict, new: dict) -> list[str]:
    """The differences: C++ outputs bit for bit, the reference's to float64 rounding, Triton's to float32's."""
    problems = []
    for name, per_backend in old.items():
        for backend, outs in per_backend.items():
            got = new.get(name, {}).get(backend)
            if got is None or len(got) != len(outs):
                problems.append(f"{name} [{backend}]: {'missing' if got is None else 'a different output count'}")
                continue
            for k, (a, b) in enumerate(zip(outs, got, strict=True)):
                if isinstance(a, str):
                    if a != b:
                        problems.append(f"{name} [{backend}] output {k}: not bitwise equal")
                elif a.shape != b.shape or a.dtype != b.dtype:
                    problems.append(f"{name} [{backend}] output {k}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
                else:
                    tol = (1e-5, 1e-6) if backend == "triton" else (1e-12, 1e-13)
                    if not torch.allclose(a.double(), b.double(), rtol=tol[0], atol=tol[1], equal_nan=True):
                        problems.append(f"{name} [{backend}] output {k}: beyond the tolerance {tol}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the snapshot here")
    ap.add_argument("--compare", type=Path, help="compare with this snapshot (exit 1 on a difference)")
    ap.add_argument("--backends", default="cpp,reference,triton")
    args = ap.parse_args(argv)
    if not args.out and not args.compare:
        ap.error("give --out or --compare")
    snap = take(tuple(args.backends.split(",")))
    if args.out:
        torch.save(snap, args.out)
        print(f"wrote {args.out}: {len(snap)} cases")
    if args.compare:
        problems = compare(torch.load(args.compare), snap)
        for p in problems:
            print(p)
        print(f"{len(snap)} cases compared with {args.compare}: {len(problems)} differences")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
