"""moo_kernels.distributed on two CPU processes (gloo), against the single-process result of the whole batch.

The two ranks are spawned once for the module (torch.multiprocessing, a FileStore in a temp directory,
no port); each runs every scenario and saves what it computed; the tests compare in this process with
the single-process computation on the concatenated batch. Batches are split unevenly, groups span the
two ranks, and one scenario leaves a rank without samples.
"""

from __future__ import annotations

import datetime
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moo_kernels as mk
from moo_kernels.distributed import (
    entropy_quantile,
    global_sequence_count,
    global_token_count,
    multi_objective_advantages_distributed,
    rescale_token_mean,
)

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# ---- the data: one batch, and how it is split over the ranks ----------------------------------------------------


def _advantage_cases() -> dict:
    g = torch.Generator().manual_seed(3)
    # A: group_size 4 over 16 samples split 6 / 10: group 1 (samples 4..7) spans both ranks.
    r_a = torch.randn(16, 3, generator=g)
    r_a[:, 0] = (r_a[:, 0] > 0).float()
    case_a = dict(
        sizes=[6, 10],
        tensors=dict(
            rewards=r_a,
            gates=torch.rand(16, 2, generator=g) > 0.15,
            valid=torch.rand(16, generator=g) > 0.1,
        ),
        options=dict(
            group_size=4,
            weights=[1.0, 0.5, 2.0],
            weighting="variance",
            batch_normalize=True,
            infeasible_advantage=-0.5,
            clip=3.0,
        ),
        grad=True,
    )
    # B: group ids in any order, 17 samples split 5 / 12, every group on both ranks; float64, reward gates.
    ids = torch.randperm(17, generator=g) % 5
    case_b = dict(
        sizes=[5, 12],
        tensors=dict(
            rewards=torch.randn(17, 2, generator=g, dtype=torch.float64),
            group_ids=ids,
            reward_gates=torch.rand(17, 2, generator=g) > 0.2,
            gates=torch.rand(17, generator=g) > 0.1,
        ),
        options=dict(weighting="fixed", normalize="rloo", weights=[0.7, 0.3], min_feasible=2, negative_scale=0.5),
        grad=True,
    )
    # C: one objective ([N] rewards), rank 0 holds no sample.
    case_c = dict(
        sizes=[0, 8],
        tensors=dict(rewards=torch.randn(8, generator=g)),
        options=dict(group_size=4, drop_zero_variance=True),
        grad=False,
    )
    return {"group_size": case_a, "group_ids": case_b, "empty_rank": case_c}


B, T, D, V = 7, 9, 5, 11
ROWS = [[(0, 1), (1, 3)], [(3, 5), (5, 7)]]  # [rank][micro-batch] = rows of the batch: 3 / 4 sequences


def _loss_case() -> dict:
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2, :] = False  # a sequence without an active token (micro-batch (1, 3) keeps one active row)
    mask[5, 5:] = False
    return dict(
        weight=torch.randn(V, D, generator=g) * 0.5,
        feats=torch.randn(B, T, D, generator=g),
        tokens=torch.randint(0, V, (B, T), generator=g),
        advantages=torch.randn(B, generator=g),
        mask=mask,
        old_logp=-torch.rand(B, T, generator=g) * 3 - 0.5,
        options=dict(clip_low=0.2, clip_high=0.28, temperature=0.9),
    )


def _slice(x: torch.Tensor | None, sizes: list[int], rank: int) -> torch.Tensor | None:
    start = sum(sizes[:rank])
    return None if x is None else x[start : start + sizes[rank]]


def _loss_terms(model, case: dict, rows: tuple[int, int], num_tokens):
    lo, hi = rows
    logits = model(case["feats"][lo:hi])
    logits.retain_grad()
    loss, _ = mk.policy_loss_from_logits(
        logits, case["tokens"][lo:hi], case["advantages"][lo:hi], case["mask"][lo:hi],
        old_logp=case["old_logp"][lo:hi], num_tokens=num_tokens, **case["options"],
    )  # fmt: skip
    return loss, logits


# the seq-mean aggregations over the split batch, with what each needs (the logp is on-policy: old_logp is None)
SEQ_AGGS = {
    "seq-mean-token-mean": {},
    "seq-mean-token-sum": {},
    "seq-mean-token-sum-norm": dict(max_len=T),
}


def _compiled_step(logp, advantages, mask):
    loss, metrics = mk.policy_loss(logp, advantages, mask)
    return rescale_token_mean(loss, metrics, global_token_count(mask, as_tensor=True))


# ---- the ranks ------------------------------------------------------------------------------------------------


def _worker(rank: int, init_file: str, out_dir: str, threads: int, adv_cases: dict, loss_case: dict) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = {}
        for name, case in adv_cases.items():
            local = {k: _slice(v, case["sizes"], rank) for k, v in case["tensors"].items()}
            if case["grad"]:
                local["rewards"] = local["rewards"].clone().requires_grad_()
            out = multi_objective_advantages_distributed(**local, **case["options"])
            entry = {"out": [x.detach() for x in out]}
            if case["grad"]:
                coef = _slice(torch.linspace(-1.0, 2.0, case["sizes"][0] + case["sizes"][1]), case["sizes"], rank)
                (out.advantages * coef.to(out.advantages.dtype)).sum().backward()
                entry["grad"] = local["rewards"].grad
            results[name] = entry

        # Token-mean loss: DDP over the two ranks, two micro-batches each, the global count divided by W
        # (DDP averages the gradients).
        model = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            model.weight.copy_(loss_case["weight"])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        masks = [loss_case["mask"][lo:hi] for lo, hi in ROWS[rank]]
        n = global_token_count(masks, divide_by_world_size=True)
        n_sum = global_token_count(masks, as_tensor=True)
        losses, logit_grads = [], []
        for i, rows in enumerate(ROWS[rank]):
            if i == 0:
                with ddp.no_sync():
                    loss, logits = _loss_terms(ddp, loss_case, rows, n)
                    loss.backward()
            else:
                loss, logits = _loss_terms(ddp, loss_case, rows, n)
                loss.backward()
            losses.append(loss.detach())
            logit_grads.append(logits.grad)
        results["ddp"] = dict(
            num_tokens=n, num_tokens_tensor=n_sum, losses=losses, logit_grads=logit_grads, grad=model.weight.grad
        )

        # Seq-mean losses from log-probs: two micro-batches per rank, the global sequence count divided by W.
        s = global_sequence_count(masks, divide_by_world_size=True)
        s_sum = global_sequence_count(masks, as_tensor=True)
        seq = {}
        for agg, extra in SEQ_AGGS.items():
            losses, grads = [], []
            for lo, hi in ROWS[rank]:
                logp = loss_case["old_logp"][lo:hi].clone().requires_grad_()
                loss, _ = mk.policy_loss(logp, loss_case["advantages"][lo:hi], loss_case["mask"][lo:hi], agg=agg,
                                         num_sequences=s, **extra)  # fmt: skip
                loss.backward()
                losses.append(loss.detach())
                grads.append(logp.grad)
            seq[agg] = dict(losses=losses, grads=grads)
        results["seq"] = dict(num_sequences=s, num_sequences_tensor=s_sum, aggs=seq)

        # The entropy threshold of top_entropy_quantile over the ranks' uneven rows (entropies: -old_logp).
        lo, hi = ROWS[rank][0][0], ROWS[rank][-1][1]
        results["entropy_threshold"] = entropy_quantile(-loss_case["old_logp"][lo:hi], loss_case["mask"][lo:hi], 0.2)

        # The tensor form inside torch.compile: the count's all_reduce is traced into the graph.
        lo, hi = ROWS[rank][0][0], ROWS[rank][-1][1]
        logp = loss_case["old_logp"][lo:hi].clone().requires_grad_()
        compiled = torch.compile(_compiled_step, fullgraph=True, backend="aot_eager")
        loss = compiled(logp, loss_case["advantages"][lo:hi], loss_case["mask"][lo:hi])
        loss.backward()
        results["compiled"] = dict(loss=loss.detach(), grad=logp.grad)
        results["disagreements"] = _disagreements(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


DISAGREEMENTS = {  # what rank 1 passes differently from rank 0, and the name the error must give
    "weights (list)": ("weights", dict(weights=[1.0, 0.5]), dict(weights=[1.0, 0.25])),
    "weights (tensor)": ("weights (tensor values)", dict(weights=torch.tensor([1.0, 0.5])),
                         dict(weights=torch.tensor([0.5, 1.0]))),
    "weights (tensor vs list)": ("weights", dict(weights=torch.tensor([1.0, 0.5])), dict(weights=[1.0, 0.5])),
    "eps": ("eps", dict(), dict(eps=1e-5)),
    "std_floor (tensor)": ("std_floor (tensor values)", dict(std_floor=torch.tensor([0.1, 0.0]), weighting="fixed"),
                           dict(std_floor=torch.tensor([0.1, 0.2]), weighting="fixed")),
    "std_floor (number)": ("std_floor", dict(std_floor=0.1, weighting="fixed"), dict(weighting="fixed")),
    "weighting": ("weighting", dict(weighting="fixed"), dict(weighting="variance")),
    "requires_grad": ("requires_grad", dict(grad=False), dict(grad=True)),
    "agree (numpy numbers)": (None, dict(eps=1e-6, clip=2, group_size=4),
                              dict(eps=np.float64(1e-6), clip=np.float32(2.0), group_size=np.int64(4))),
}  # fmt: skip


def _disagreements(rank: int) -> dict:
    """Each scenario run on both ranks: the error message each rank got (None when the call succeeded)."""
    rewards = torch.randn(8, 2, generator=torch.Generator().manual_seed(11))
    got = {}
    for label, (_, on_rank0, on_rank1) in DISAGREEMENTS.items():
        options = {"group_size": 4, **(on_rank1 if rank == 1 else on_rank0)}
        local = rewards[:3] if rank == 0 else rewards[3:]
        if options.pop("grad", False):
            local = local.clone().requires_grad_()
        try:
            multi_objective_advantages_distributed(local, **options)
            got[label] = None
        except ValueError as e:
            got[label] = str(e)
    return got


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank computed: [rank] -> {scenario: results}."""
    tmp = tmp_path_factory.mktemp("dist")
    adv_cases, loss_case = _advantage_cases(), _loss_case()
    args = (str(tmp / "store"), str(tmp), torch.get_num_threads(), adv_cases, loss_case)
    ctx = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the distributed workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)], adv_cases, loss_case


# ---- advantages -----------------------------------------------------------------------------------------------


def _single_process(case: dict, requires_grad: bool):
    tensors = dict(case["tensors"])
    if requires_grad:
        tensors["rewards"] = tensors["rewards"].clone().requires_grad_()
    out = mk.multi_objective_advantages(**tensors, **case["options"])
    return out, tensors["rewards"]


@pytest.mark.parametrize("name", ["group_size", "group_ids", "empty_rank"])
def test_advantages_bitwise_equal_to_one_process(ranks, name):
    results, cases, _ = ranks
    case = cases[name]
    full, _ = _single_process(case, requires_grad=False)
    for rank in range(WORLD):
        out = results[rank][name]["out"]
        # the gathered batch is the same batch: the same kernel gives the same bits
        assert torch.equal(out[0], _slice(full.advantages, case["sizes"], rank)), (name, rank)
        assert torch.equal(out[2], _slice(full.sample_mask, case["sizes"], rank)), (name, rank)
        for got, want in zip(out[3:], full[3:], strict=True):  # per-group weights, mean, std: every group
            assert torch.equal(got, want), (name, rank)
        assert torch.equal(out[1], full.group_mask)
    assert torch.count_nonzero(full.advantages) > 0


@pytest.mark.parametrize("name", ["group_size", "group_ids"])
def test_advantages_gradient_is_this_ranks_slice(ranks, name):
    """Each rank's loss uses its slice of the advantages; the sum over ranks is the single-process loss.

    The backward of the gather sums the two ranks' gradients of each rank's rows (rank 0's part plus rank
    1's part of a group that spans both), while one process gets that gradient from a single backward:
    the same terms added in another order, so equal to float rounding, not bitwise.
    """
    results, cases, _ = ranks
    case = cases[name]
    full, r = _single_process(case, requires_grad=True)
    coef = torch.linspace(-1.0, 2.0, r.shape[0]).to(full.advantages.dtype)
    (full.advantages * coef).sum().backward()
    tol = 1e-12 if r.dtype == torch.float64 else 1e-6
    for rank in range(WORLD):
        grad = results[rank][name]["grad"]
        torch.testing.assert_close(grad, _slice(r.grad, case["sizes"], rank), atol=tol, rtol=tol)
    assert r.grad.abs().sum() > 0


@pytest.mark.parametrize("label", list(DISAGREEMENTS))
def test_ranks_that_disagree_raise_on_every_rank(ranks, label):
    """Options, weights and requires_grad are checked in the size exchange: a rank that differs makes every
    rank raise a ValueError naming what differs (not a wrong result, nor a hang in the backward's collective);
    equal numbers of different Python / numpy types agree."""
    results, _, _ = ranks
    name = DISAGREEMENTS[label][0]
    for rank in range(WORLD):
        message = results[rank]["disagreements"][label]
        if name is None:
            assert message is None, (rank, message)
        else:
            assert message is not None and "disagree" in message and name in message, (rank, message)


def test_advantages_without_process_group_is_the_local_op():
    case = _advantage_cases()["group_size"]
    out = multi_objective_advantages_distributed(**case["tensors"], **case["options"])
    full, _ = _single_process(case, requires_grad=False)
    assert all(torch.equal(a, b) for a, b in zip(out, full, strict=True))


# ---- the token-mean loss over ranks and micro-batches ---------------------------------------------------------


def _full_batch(loss_case: dict):
    model = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        model.weight.copy_(loss_case["weight"])
    n = float(loss_case["mask"].sum())
    loss, logits = _loss_terms(model, loss_case, (0, B), n)
    loss.backward()
    return n, loss.detach(), logits.grad, model.weight.grad


def test_global_token_count(ranks):
    results, _, loss_case = ranks
    total = float(loss_case["mask"].sum())
    for rank in range(WORLD):
        assert results[rank]["ddp"]["num_tokens"] == total / WORLD
        t = results[rank]["ddp"]["num_tokens_tensor"]
        assert t.dim() == 0 and t.dtype == torch.float64 and float(t) == total


def test_token_mean_loss_does_not_depend_on_the_split(ranks):
    """2 ranks x 2 micro-batches (rows 1 + 2 | 2 + 2), DDP averaging, count / W: the full-batch loss and grad.

    Per token nothing changes: each token's loss and d loss / d logits are computed once, by the same
    kernel, with the normaliser N / 2 instead of N, a factor 2 that is exact in binary floating point:
    every micro-batch's logits gradient is bitwise twice the single-process one, and the losses are
    twice the single-process partial sums. The parameter gradient adds (logits grad)^T x over tokens in
    another grouping (per micro-batch, then DDP's all_reduce over ranks, then / 2), so it equals the
    single-process gradient to float32 rounding; so does the sum of the micro-batch losses.
    """
    results, _, loss_case = ranks
    n, loss, logits_grad, weight_grad = _full_batch(loss_case)
    total_loss = 0.0
    for rank in range(WORLD):
        res = results[rank]["ddp"]
        for (lo, hi), mb_loss, mb_grad in zip(ROWS[rank], res["losses"], res["logit_grads"], strict=True):
            assert torch.equal(mb_grad, WORLD * logits_grad[lo:hi]), (rank, lo, hi)
            total_loss += float(mb_loss) / WORLD
        # DDP's averaged gradient is the same on every rank
        torch.testing.assert_close(res["grad"], weight_grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(results[0]["ddp"]["grad"], results[1]["ddp"]["grad"])
    assert abs(total_loss - float(loss)) < 1e-6 * max(1.0, abs(float(loss)))
    assert weight_grad.abs().sum() > 0


def test_entropy_quantile_over_ranks(ranks):
    results, _, loss_case = ranks
    active = -loss_case["old_logp"][loss_case["mask"]]
    expected = torch.quantile(active.float(), 0.8)
    for rank in range(WORLD):
        assert torch.equal(results[rank]["entropy_threshold"], expected)


def test_entropy_quantile_is_trls_high_entropy_mask():
    """One process: the tokens at or above the threshold are TRL's get_high_entropy_mask."""
    from types import SimpleNamespace

    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(9)
    entropy = torch.rand(6, 10, generator=g) * 3
    mask = torch.rand(6, 10, generator=g) > 0.3
    accelerator = SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x)
    for rho in (0.2, 0.5, 1.0):
        trl_mask = GRPOTrainer.get_high_entropy_mask(SimpleNamespace(accelerator=accelerator), entropy, mask, 1 - rho)
        threshold = entropy_quantile(entropy, mask, rho)
        assert torch.equal((entropy >= threshold) & mask, trl_mask)
    assert entropy_quantile(entropy, torch.zeros_like(mask), 0.2) == float("inf")
    with pytest.raises(ValueError, match="rho must be in"):
        entropy_quantile(entropy, mask, 1.5)


def test_global_sequence_count(ranks):
    results, _, loss_case = ranks
    total = float((loss_case["mask"].sum(dim=1) > 0).sum())
    assert total == B - 1  # row 2 has no active token
    for rank in range(WORLD):
        assert results[rank]["seq"]["num_sequences"] == total / WORLD
        t = results[rank]["seq"]["num_sequences_tensor"]
        assert t.dim() == 0 and t.dtype == torch.float64 and float(t) == total


@pytest.mark.parametrize("agg", list(SEQ_AGGS))
def test_seq_mean_loss_does_not_depend_on_the_split(ranks, agg):
    """2 ranks x 2 micro-batches with num_sequences = S / W: each token's gradient is W times the full batch's
    (bitwise: the factor 2 is exact) and the losses add up to W times the full-batch loss. Without num_sequences
    each micro-batch would average over its own sequences (a different, split-dependent loss)."""
    results, _, loss_case = ranks
    logp = loss_case["old_logp"].clone().requires_grad_()
    kw = dict(agg=agg, **SEQ_AGGS[agg])
    if agg == "seq-mean-token-sum-norm":  # the active-sequence count replaces B: the one-process value is S, not B
        kw["num_sequences"] = float(B - 1)
    loss, _ = mk.policy_loss(logp, loss_case["advantages"], loss_case["mask"], **kw)
    loss.backward()
    total = 0.0
    for rank in range(WORLD):
        res = results[rank]["seq"]["aggs"][agg]
        for (lo, hi), mb_loss, mb_grad in zip(ROWS[rank], res["losses"], res["grads"], strict=True):
            assert torch.equal(mb_grad, WORLD * logp.grad[lo:hi]), (rank, lo, hi)
            total += float(mb_loss) / WORLD
    assert abs(total - float(loss)) < 1e-6 * max(1.0, abs(float(loss)))
    assert logp.grad.abs().sum() > 0


def test_rescale_token_mean_under_compile_over_ranks(ranks):
    """Each rank compiles policy_loss + rescale_token_mean(global_token_count(as_tensor=True)) with
    fullgraph (the all_reduce is in the graph): the ranks' losses add up to the full-batch token mean and
    their gradients are its gradient (to rounding: local mean times a count ratio)."""
    results, _, case = ranks
    logp = case["old_logp"].clone().requires_grad_()
    loss, _ = mk.policy_loss(logp, case["advantages"], case["mask"])
    loss.backward()
    total = 0.0
    for rank in range(WORLD):
        res = results[rank]["compiled"]
        lo, hi = ROWS[rank][0][0], ROWS[rank][-1][1]
        torch.testing.assert_close(res["grad"], logp.grad[lo:hi], atol=1e-8, rtol=1e-6)
        total += float(res["loss"])
    assert abs(total - float(loss.detach())) < 1e-6


def test_rescale_token_mean_matches_num_tokens():
    """The tensor form: the local normaliser rescaled by a count tensor equals num_tokens=<float>."""
    case = _loss_case()
    logits = (case["feats"] @ case["weight"].T).requires_grad_()
    kw = dict(old_logp=case["old_logp"], **case["options"])
    n = torch.tensor(float(case["mask"].sum()) + 13.0, dtype=torch.float64)  # as if other ranks had 13 more
    loss_local, metrics = mk.policy_loss_from_logits(logits, case["tokens"], case["advantages"], case["mask"], **kw)
    loss = rescale_token_mean(loss_local, metrics, n)
    (g,) = torch.autograd.grad(loss, logits)
    ref = logits.detach().clone().requires_grad_()
    loss_ref, _ = mk.policy_loss_from_logits(ref, case["tokens"], case["advantages"], case["mask"], num_tokens=float(n),
                                             **kw)  # fmt: skip
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(g, ref.grad, atol=1e-8, rtol=1e-6)


def test_rescale_token_mean_compiles_once():
    """Under torch.compile the count stays a tensor: three different counts, one graph, no recompilation."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    case = _loss_case()
    logp = -torch.rand(B, T, generator=torch.Generator().manual_seed(1)) * 2

    def step(x, mask, n):
        loss, metrics = mk.policy_loss(x, case["advantages"], mask, old_logp=case["old_logp"])
        return rescale_token_mean(loss, metrics, global_token_count(mask, as_tensor=True) + n)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for extra in (0.0, 7.0, 20.0):
        x1, x2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        n = torch.tensor(extra, dtype=torch.float64)
        out = compiled(x1, case["mask"], n)
        out.backward()
        ref = step(x2, case["mask"], n)
        ref.backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(x1.grad, x2.grad)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_global_sequence_count_without_process_group():
    """Rows with an active token, over the micro-batches of the step; a float mask's row counts when its weights sum
    to more than 0."""
    a = torch.tensor([[True, False], [False, False], [False, True]])
    b = torch.tensor([[0.0, 0.0], [0.0, 0.25]])
    assert global_sequence_count(a) == 2.0
    assert global_sequence_count([a, b]) == 3.0
    assert global_sequence_count([a, b], divide_by_world_size=True) == 3.0  # world size 1
    t = global_sequence_count(b, as_tensor=True)
    assert t.dtype == torch.float64 and t.dim() == 0 and float(t) == 1.0


def test_errors():
    with pytest.raises(ValueError, match="empty sequence"):
        global_token_count([])
    with pytest.raises(ValueError, match="empty sequence"):
        global_sequence_count([])
    with pytest.raises(TypeError, match="mask"):
        global_sequence_count([torch.ones(2, 2), "mask"])
    with pytest.raises(TypeError, match="divide_by_world_size"):
        global_token_count(torch.ones(2, 2), divide_by_world_size=1)
    loss, metrics = mk.policy_loss(torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="0-dim"):
        rescale_token_mean(loss, metrics, torch.ones(1))
