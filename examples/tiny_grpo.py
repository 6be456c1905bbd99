"""A tiny multi-objective GRPO trainer on CPU: two synthetic tasks, two objectives each, trained with every
weighting of moo_kernels.multi_objective_advantages, through moo_kernels end to end.

The prompt. L random digits followed by "="; the policy samples L + 1 completion tokens from a 16-token
vocabulary (digits 0-9, "=", ".", four unused symbols). The answer is the prompt reversed.

Task (a), "noisy format". Objectives:
- correctness: the fraction of the first L completion tokens equal to the reversed prompt;
- format: 1 when the last completion token is "." (the terminator), else 0, *observed with Gaussian
  noise* of standard deviation --noise (a noisy proxy, like a learned reward model or a sampled judge).
  The trainer sees the noisy format reward; the curves report its true value.

Task (b), "tiny length cost". "." ends the answer: the stop position s is the index (0-based) of the first
"." in the completion, L + 1 when there is none; the tokens after the first "." are not part of the answer
(masked out of the loss). Objectives, exact (no noise):
- correctness: the fraction of the L prompt positions i whose reversed digit is at completion position i
  with i < s; a position at or after the stop counts wrong;
- length: -c * s with c = --length-cost (0.001: between 0 and -0.005), a tie-breaker that conflicts with
  correctness (a full answer needs s >= L; stopping at once costs nothing).

Run kinds: weighting "scalarize", "fixed", "variance", and "fixed" with a std floor
z = (r - mu) / (sigma + floor + eps) on every objective ("fixed+floor0.01"). Settings:
- main: task (a) with noise --noise (1) and task (b) with cost --length-cost (0.001), every run kind;
- std floor sweep: both main tasks, weighting "fixed", floors --floors (0.01, 0.05, 0.2);
- breaking cases: task (a) with noise --hard-noise (3) and task (b) with cost --hard-length-cost (0.02,
  20x: up to 0.1), the four run kinds.
Each (setting, run kind) runs from seeds --seed .. --seed + --seeds - 1 (0..4): the same initial weights
and the same random stream for prompts, sampling and reward noise (the samples differ as soon as the
policies do). A run does not depend on which worker process runs it, nor when.

The policy. A causal transformer built here (token + position embeddings, pre-norm blocks of
multi-head attention and an MLP, tied output head), randomly initialised from the seed.

One GRPO step. --prompts prompts x G = --group-size completions (B samples, G consecutive per prompt),
sampled at --temperature; a prompt has L + 1 tokens, a completion L + 1:
  rewards [B, 2] -> moo_kernels.multi_objective_advantages(rewards, group_size=G, weighting=..., std_floor=...)
  for each of --epochs PPO epochs:
      logits = model(prompt + completion); view = logits[:, L:-1], the positions that predict the
          completion (a strided view: the op reads it in place)
      first epoch, under no_grad: old_logp = moo_kernels.token_logprobs(view, completion) (these are
          still the weights that sampled)
      loss = moo_kernels.policy_loss_from_logits(view, completion, advantages, mask, old_logp=old_logp,
          clip_low=0.2, clip_high=0.28) -> backward -> gradient norm clipped to 1 -> Adam step
  (with --beta > 0 also a k3 KL to the frozen initial policy, ref_logp from token_logprobs).

Recorded per step: the noise-free objectives, the stop position (task b), the second objective's share of
the op's weights (`<objective>_weight_share`: 0.5 for scalarize and fixed with equal weights) and its share
of the advantage's spread inside a group (`<objective>_spread_share`: w_k sigma_gk for scalarize,
w_gk sigma_gk / (sigma_gk + floor + eps) for fixed and variance, normalised over k, averaged over groups;
for variance it is the op's weight, for fixed+floor it shows what the floor takes away).

Defaults: 16 prompts x 8 completions, 160 steps, 5 seeds, weights [1, 1]; 100 runs on --workers 2
processes (one torch thread each): 7.5 minutes measured on two otherwise idle CPU cores (18 minutes while other
jobs shared them). --quick: 6 steps, one seed, every setting and run kind: about 15 s.

Usage: python examples/tiny_grpo.py [--quick] [--steps N] [--seed S] [--seeds K] [--workers P] [--out DIR]
       [--no-readme] [--weights W1 W2] [--noise SIGMA] [--length-cost C] [--hard-noise SIGMA]
       [--hard-length-cost C] [--floor F] [--floors F ...] (and the model / training flags, see --help)
Writes DIR/tiny_grpo.json (every curve, the summary, the markdown tables and the configuration) and
DIR/tiny_grpo.png. A full run (not --quick) with the default --out also writes the tables into README.md
between the markers <!-- tiny_grpo:begin --> and <!-- tiny_grpo:end --> (--no-readme: not).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import moo_kernels as mk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("examples")
README_BEGIN, README_END = "<!-- tiny_grpo:begin -->", "<!-- tiny_grpo:end -->"

OBJECTIVES = {"a": ("correctness", "format"), "b": ("correctness", "length")}
EPS = 1e-6  # the op's eps, passed explicitly (the spread share uses it)

DIGITS = 10
EQ, DOT = 10, 11  # "=" ends the prompt, "." ends the completion
VOCAB = 16  # 0-9, "=", ".", four symbols never rewarded


# ---------------------------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class Setting:
    """A task and its one parameter: the format noise (task a) or the length cost (task b)."""

    task: str  # "a" or "b"
    noise: float = 0.0
    length_cost: float = 0.0

    @property
    def key(self) -> str:
        return f"a_noise{self.noise:g}" if self.task == "a" else f"b_cost{self.length_cost:g}"

    @property
    def title(self) -> str:
        if self.task == "a":
            return f"(a) noisy format, noise {self.noise:g}"
        return f"(b) length cost {self.length_cost:g} x stop"

    @property
    def objectives(self) -> tuple[str, str]:
        return OBJECTIVES[self.task]


@dataclass(frozen=True)
class Kind:
    """A weighting and the std floor given to the op (0: none)."""

    weighting: str
    floor: float = 0.0

    @property
    def name(self) -> str:
        return self.weighting if self.floor == 0 else f"{self.weighting}+floor{self.floor:g}"


def experiments(args: argparse.Namespace) -> dict[str, list[tuple[Setting, list[Kind]]]]:
    """The three groups of runs: main, the std floor sweep, the breaking cases (shared runs appear twice)."""
    base = [Kind("scalarize"), Kind("fixed"), Kind("variance"), Kind("fixed", args.floor)]
    main = [Setting("a", noise=args.noise), Setting("b", length_cost=args.length_cost)]
    hard = [Setting("a", noise=args.hard_noise), Setting("b", length_cost=args.hard_length_cost)]
    sweep = [Kind("fixed")] + [Kind("fixed", f) for f in args.floors]
    return {
        "main": [(s, base) for s in main],
        "floor_sweep": [(s, sweep) for s in main],
        "breaking": [(s, base) for s in hard],
    }


def run_list(args: argparse.Namespace) -> list[tuple[Setting, Kind]]:
    """Every distinct (setting, run kind), in a fixed order."""
    seen: dict[tuple[Setting, Kind], None] = {}
    for group in experiments(args).values():
        for setting, kinds in group:
            for kind in kinds:
                seen[(setting, kind)] = None
    return list(seen)


# ---------------------------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """x [B, T, D]. With `cache` (sampling, one new token at a time), keys and values are appended to it."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        causal = True
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
                causal = False  # the one new query sees every cached position
            cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A causal transformer: [B, T] token ids -> [B, T, VOCAB] next-token logits."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, max_len: int = 16):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids: torch.Tensor, caches: list[list] | None = None, start: int = 0) -> torch.Tensor:
        """ids [B, T] at positions start .. start + T - 1; `caches` (one list per block) for sampling."""
        x = self.tok(ids) + self.pos(torch.arange(start, start + ids.shape[1], device=ids.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.ln(x) @ self.tok.weight.t()  # tied head


@torch.no_grad()
def sample(model: TinyLM, prompts: torch.Tensor, length: int, temperature: float, gen: torch.Generator):
    """Appends `length` tokens sampled at `temperature`, with a key / value cache."""
    caches = [[] for _ in model.blocks]
    logits, out = model(prompts, caches), [prompts]
    for i in range(length):
        probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
        out.append(torch.multinomial(probs, 1, generator=gen))
        if i + 1 < length:
            logits = model(out[-1], caches, start=prompts.shape[1] + i)
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------- tasks


def make_prompts(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    digits = torch.randint(0, DIGITS, (n, length), generator=gen)
    return torch.cat([digits, torch.full((n, 1), EQ)], dim=1)


def stop_positions(completion: torch.Tensor) -> torch.Tensor:
    """[N] the index of the first "." in each completion, the completion length when there is none."""
    C = completion.shape[1]
    pos = torch.arange(C).expand_as(completion)
    return torch.where(completion == DOT, pos, C).min(dim=1).values


def rewards_a(prompts: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Task (a), [N, 2] noise-free: correctness (fraction of the reversed prompt reproduced), format."""
    L = prompts.shape[1] - 1
    target = prompts[:, :L].flip(1)
    correct = (completion[:, :L] == target).float().mean(dim=1)
    fmt = (completion[:, L] == DOT).float()
    return torch.stack([correct, fmt], dim=1)


def rewards_b(prompts: torch.Tensor, completion: torch.Tensor, length_cost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Task (b): [N, 2] (correctness before the stop, -length_cost x stop position) and the [N] stop positions."""
    L = prompts.shape[1] - 1
    target = prompts[:, :L].flip(1)
    stop = stop_positions(completion)
    before = torch.arange(L).unsqueeze(0) < stop.unsqueeze(1)
    correct = ((completion[:, :L] == target) & before).float().mean(dim=1)
    return torch.stack([correct, -length_cost * stop.float()], dim=1), stop


def spread_share(out, kind: Kind, weights: torch.Tensor) -> float:
    """The second objective's share of the advantage's spread inside a group, averaged over groups.

    Objective k moves the advantage of group g by c_gk (r_k - mu_gk) with spread c_gk sigma_gk:
    c_gk sigma_gk is w_k sigma_gk / sd_g(sum) for scalarize and w_gk sigma_gk / (sigma_gk + floor + eps)
    for fixed and variance (w_gk the op's weights). Groups where no objective varies are left out; the
    nominal share w_2 / (w_1 + w_2) when none varies.
    """
    sigma = out.std.double()
    if kind.weighting == "scalarize":
        contrib = weights.double() * sigma  # the common 1 / sd_g(sum) cancels in the share
    else:
        contrib = out.weights.double() * sigma / (sigma + kind.floor + EPS)
    total = contrib.sum(dim=1)
    varies = total > 0
    if not bool(varies.any()):
        return float(weights[1] / weights.sum())
    return float((contrib[varies, 1] / total[varies]).mean())


# -------------------------------------------------------------------------------------------- trainer


def train(setting: Setting, kind: Kind, args: argparse.Namespace, seed: int) -> dict:
    """One GRPO run; returns its curves (one value per step) and its time. Deterministic per seed."""
    torch.manual_seed(seed)
    model = TinyLM(d=args.d_model, layers=args.layers, heads=args.heads, max_len=2 * args.length + 2)
    ref = TinyLM(d=args.d_model, layers=args.layers, heads=args.heads, max_len=2 * args.length + 2)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed + 1)  # prompts, sampling and reward noise
    P, G, L = args.prompts, args.group_size, args.length
    C = L + 1  # completion tokens: L digits and the terminator
    n = P * G
    weights = torch.tensor(args.weights, dtype=torch.float32)
    second = setting.objectives[1]
    names = ["correctness", second, f"{second}_weight_share", f"{second}_spread_share", "clip_frac", "loss", "adv_std"]
    names += ["format_observed"] if setting.task == "a" else ["stop"]
    curves: dict[str, list[float]] = {k: [] for k in names}

    t0 = time.perf_counter()
    for _ in range(args.steps):
        prompts = make_prompts(P, L, gen).repeat_interleave(G, dim=0)  # G consecutive samples per prompt
        model.eval()
        seq = sample(model, prompts, C, args.temperature, gen)
        completion = seq[:, L + 1 :]
        if setting.task == "a":
            truth = rewards_a(prompts, completion)
            observed = truth.clone()
            observed[:, 1] += setting.noise * torch.randn(n, generator=gen)
            mask = torch.ones(n, C, dtype=torch.bool)
        else:
            truth, stop = rewards_b(prompts, completion, setting.length_cost)
            observed = truth
            mask = torch.arange(C).unsqueeze(0) <= stop.unsqueeze(1)  # the answer ends at its first "."

        out = mk.multi_objective_advantages(
            observed,
            group_size=G,
            weights=weights,
            weighting=kind.weighting,
            eps=EPS,
            std_floor=kind.floor if kind.floor > 0 else None,
        )
        adv = out.advantages

        ref_logp = None
        if args.beta > 0:
            with torch.no_grad():
                ref_logp = mk.token_logprobs(ref(seq)[:, L:-1], completion, temperature=args.temperature)
        model.train()
        old_logp = None
        for _ in range(args.epochs):
            logits = model(seq)
            view = logits[:, L:-1]  # position t predicts token t + 1: these positions predict the completion
            if old_logp is None:  # the first epoch runs the weights that sampled: their log-probs are the old ones
                with torch.no_grad():
                    old_logp = mk.token_logprobs(view.detach(), completion, temperature=args.temperature)
            loss, metrics = mk.policy_loss_from_logits(
                view,
                completion,
                adv,
                mask,
                temperature=args.temperature,
                old_logp=old_logp,
                ref_logp=ref_logp,
                beta=args.beta,
                clip_low=0.2,
                clip_high=0.28,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        mean_true = truth.double().mean(dim=0)
        curves["correctness"].append(round(float(mean_true[0]), 4))
        curves[second].append(round(float(mean_true[1]), 7 if setting.task == "b" else 4))
        if setting.task == "a":
            curves["format_observed"].append(round(float(observed[:, 1].mean()), 4))
        else:
            curves["stop"].append(round(float(stop.float().mean()), 5))
        share = out.weights[:, 1] / out.weights.sum(dim=1).clamp_min(1e-12)
        curves[f"{second}_weight_share"].append(round(float(share.mean()), 4))
        curves[f"{second}_spread_share"].append(round(spread_share(out, kind, weights), 4))
        curves["clip_frac"].append(round(float(metrics.clip_frac), 4))
        curves["loss"].append(round(float(loss.detach()), 4))
        curves["adv_std"].append(round(float(adv.std()), 4))
    return {"curves": curves, "seconds": round(time.perf_counter() - t0, 2)}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_job(job: tuple[Setting, Kind, argparse.Namespace, int]) -> tuple[str, str, int, dict]:
    setting, kind, args, seed = job
    return setting.key, kind.name, seed, train(setting, kind, args, seed)


def run_all(args: argparse.Namespace) -> dict[str, dict[str, dict[str, dict]]]:
    """Every run, on args.workers processes; returns runs[setting key][run kind name][str(seed)]."""
    pairs = run_list(args)
    seeds = range(args.seed, args.seed + args.seeds)
    jobs = [(s, k, args, seed) for s, k in pairs for seed in seeds]
    runs: dict[str, dict[str, dict[str, dict]]] = {}
    for s, k in pairs:
        runs.setdefault(s.key, {})[k.name] = {}

    def done(i: int, result: tuple[str, str, int, dict]) -> None:
        key, name, seed, run = result
        runs[key][name][str(seed)] = run
        c = run["curves"]
        last = max(1, args.steps // 5)
        second = "format" if key.startswith("a") else "stop"
        print(
            f"[{i:3d}/{len(jobs)}] {key:12s} {name:16s} seed {seed}: correctness "
            f"{sum(c['correctness'][-last:]) / last:.3f}  {second} {sum(c[second][-last:]) / last:.3f}"
            f"  ({run['seconds']:.1f} s)",
            flush=True,
        )

    if args.workers <= 1:
        _init_worker(args.threads)
        for i, job in enumerate(jobs, 1):
            done(i, _run_job(job))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.threads,)) as pool:
            for i, result in enumerate(pool.imap_unordered(_run_job, jobs), 1):
                done(i, result)
    # a fixed order in the JSON whatever order the workers finished in
    return {
        key: {name: dict(sorted(by_seed.items())) for name, by_seed in kinds.items()} for key, kinds in runs.items()
    }


# ------------------------------------------------------------------------------------------- reporting


def _stats(per_seed: list[float]) -> dict:
    mean = sum(per_seed) / len(per_seed)
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / (len(per_seed) - 1)) if len(per_seed) > 1 else 0.0
    return {"per_seed": per_seed, "mean": mean, "std_over_seeds": sd}


def summarise(runs: dict, last: int) -> dict:
    """Per setting and run kind: the mean over the last `last` steps of each curve, per seed and over seeds."""
    summary = {}
    for key, kinds in runs.items():
        summary[key] = {}
        for name, by_seed in kinds.items():
            curves = [r["curves"] for r in by_seed.values()]
            summary[key][name] = {
                k: _stats([sum(c[k][-last:]) / len(c[k][-last:]) for c in curves])
                for k in curves[0]
                if k not in ("loss", "clip_frac", "adv_std")
            }
    return summary


def _cell(s: dict, per_seed: bool = True, digits: int = 3) -> str:
    text = f"{s['mean']:.{digits}f}"
    if per_seed and len(s["per_seed"]) > 1:
        text += " (" + ", ".join(f"{x:.{digits}f}" for x in s["per_seed"]) + ")"
    return text


def tables_markdown(summary: dict, args: argparse.Namespace, seconds: float, n_runs: int) -> str:
    """The README's results tables (markdown) from the summary."""
    exp = experiments(args)
    last = max(1, args.steps // 5)
    seeds = f"seeds {args.seed}..{args.seed + args.seeds - 1}" if args.seeds > 1 else f"seed {args.seed}"
    lines = [
        f"Noise-free means over the last {last} of {args.steps} steps, mean over {seeds} (per seed in brackets); "
        f"weights {list(args.weights)}; stop: the mean stop position (0..{args.length + 1}); share: the second "
        f"objective's share of the advantage's spread inside a group. Generated by `examples/tiny_grpo.py` "
        f"({n_runs} runs, {seconds:.0f} s on {args.workers} worker process(es)).",
        "",
    ]
    (sa, kinds), (sb, _) = exp["main"]
    lines += [
        f"Main: {sa.title}; {sb.title}.",
        "",
        "| run | (a) correctness | (a) format | (a) format share | (b) correctness | (b) stop | (b) length share |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for k in kinds:
        a, b = summary[sa.key][k.name], summary[sb.key][k.name]
        lines.append(
            f"| `{k.name}` | {_cell(a['correctness'])} | {_cell(a['format'], False)} "
            f"| {_cell(a['format_spread_share'], False, 2)} | {_cell(b['correctness'])} "
            f"| {_cell(b['stop'], False, 2)} | {_cell(b['length_spread_share'], False, 2)} |"
        )
    (sa, kinds), (sb, _) = exp["floor_sweep"]
    lines += [
        "",
        f'Std floor sweep, weighting `"fixed"`, z = (r - mu) / (sigma + floor + eps): {sa.title}; {sb.title}.',
        "",
        "| floor | (a) correctness | (a) format | (b) correctness | (b) stop | (b) length share |",
        "|---|---|---:|---|---:|---:|",
    ]
    for k in kinds:
        a, b = summary[sa.key][k.name], summary[sb.key][k.name]
        lines.append(
            f"| {k.floor:g} | {_cell(a['correctness'])} | {_cell(a['format'], False)} | {_cell(b['correctness'])} "
            f"| {_cell(b['stop'], False, 2)} | {_cell(b['length_spread_share'], False, 2)} |"
        )
    (sa, kinds), (sb, _) = exp["breaking"]
    lines += [
        "",
        f"Breaking cases: {sa.title}; {sb.title}.",
        "",
        "| run | (a) correctness | (a) format | (b) correctness | (b) stop | (b) length share |",
        "|---|---|---:|---|---:|---:|",
    ]
    for k in kinds:
        a, b = summary[sa.key][k.name], summary[sb.key][k.name]
        lines.append(
            f"| `{k.name}` | {_cell(a['correctness'])} | {_cell(a['format'], False)} | {_cell(b['correctness'])} "
            f"| {_cell(b['stop'], False, 2)} | {_cell(b['length_spread_share'], False, 2)} |"
        )
    return "\n".join(lines) + "\n"


def update_readme(path: Path, tables: str) -> bool:
    """Replaces what is between the tiny_grpo markers in `path` by `tables`; False when the markers are missing."""
    text = path.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return False
    path.write_text(text[: begin + len(README_BEGIN)] + "\n" + tables + text[end:])
    return True


def smooth(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


COLORS = {
    "scalarize": "tab:red",
    "fixed": "tab:blue",
    "variance": "tab:green",
}
FLOOR_COLORS = ["tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:gray"]


def plot(runs: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp = experiments(args)
    rows = [s for s, _ in exp["main"]] + [s for s, _ in exp["breaking"]]
    floors = sorted({k.floor for s, k in run_list(args) if k.floor > 0})
    colors = dict(COLORS, **{Kind("fixed", f).name: FLOOR_COLORS[i % len(FLOOR_COLORS)] for i, f in enumerate(floors)})
    w = max(1, args.steps // 25)
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.1 * len(rows)), sharex=True, squeeze=False)
    for r, setting in enumerate(rows):
        second = setting.objectives[1]
        panels = [
            ("correctness", "correctness (noise-free)", (-0.02, 1.02)),
            ("format", "format, noise-free", (-0.02, 1.02))
            if setting.task == "a"
            else ("stop", "stop position (first '.')", (-0.1, args.length + 1.1)),
            (f"{second}_spread_share", f"{second}'s share of the advantage spread", (-0.02, 1.02)),
        ]
        for ax, (curve, label, ylim) in zip(axes[r], panels, strict=True):
            for name, by_seed in runs[setting.key].items():
                curves = [smooth(run["curves"][curve], w) for run in by_seed.values()]
                steps = range(len(curves[0]))
                mean = [sum(c[i] for c in curves) / len(curves) for i in steps]
                style = ":" if name.startswith("fixed+") and name != Kind("fixed", args.floor).name else "-"
                # scalarize under variance: their spread shares are equal by construction
                wide = name == "scalarize"
                ax.plot(
                    steps,
                    mean,
                    color=colors[name],
                    ls=style,
                    lw=3.5 if wide else 1.8,
                    alpha=0.5 if wide else 1,
                    label=name,
                )
            ax.set_ylim(*ylim)
            ax.set_title(f"{setting.title}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[r][0].legend(loc="best", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("GRPO step")
    n_seeds = len(next(iter(next(iter(runs.values())).values())))
    fig.suptitle(
        f"Tiny GRPO, weights {list(args.weights)}, {args.prompts}x{args.group_size} samples/step; mean over "
        f"{n_seeds} seed(s) of a moving average over {w} steps; dotted: the other std floors of the sweep"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default 160, --quick 6)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for tiny_grpo.json / tiny_grpo.png")
    p.add_argument("--no-readme", action="store_true", help="do not write the tables into README.md")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds: seed .. seed+K-1 (default 5, --quick 1)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1: run in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (tiny matrices: 1 is fastest)")
    p.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0], help="objective weights (both tasks)")
    p.add_argument("--noise", type=float, default=1.0, help="task (a): std of the Gaussian noise on the format")
    p.add_argument("--length-cost", type=float, default=0.001, help="task (b): length reward -C x stop position")
    p.add_argument("--hard-noise", type=float, default=3.0, help="breaking case of task (a): its noise")
    p.add_argument("--hard-length-cost", type=float, default=0.02, help="breaking case of task (b): its cost")
    p.add_argument("--floor", type=float, default=0.01, help='the std floor of the run kind "fixed+floor"')
    p.add_argument("--floors", type=float, nargs="+", default=[0.01, 0.05, 0.2], help="the std floor sweep")
    p.add_argument("--length", type=int, default=4, help="prompt digits")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs per batch of samples")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient to the initial policy")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a few steps, one seed, every run kind: a smoke test")
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (6 if a.quick else 160)
    a.seeds = a.seeds if a.seeds is not None else (1 if a.quick else 5)
    if a.floor <= 0 or any(f <= 0 for f in a.floors):
        p.error("--floor and --floors must be > 0")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = run_all(args)
    total = time.perf_counter() - t0
    n_runs = sum(len(by_seed) for kinds in runs.values() for by_seed in kinds.values())

    last = max(1, args.steps // 5)
    summary = summarise(runs, last)
    tables = tables_markdown(summary, args, total, n_runs)
    print("\n" + tables)
    print(f"total {total:.1f} s for {n_runs} runs on {args.workers} worker(s)")

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "config": config,
        "settings": {
            s.key: {
                "task": s.task,
                "title": s.title,
                "objectives": list(s.objectives),
                "noise": s.noise,
                "length_cost": s.length_cost,
            }
            for s in {s: None for s, _ in run_list(args)}
        },
        "experiments": {
            group: [{"setting": s.key, "runs": [k.name for k in kinds]} for s, kinds in pairs]
            for group, pairs in experiments(args).items()
        },
        "summary_last_steps": last,
        "summary": summary,
        "tables_markdown": tables,
        "runs": runs,
        "seconds_total": round(total, 1),
        "torch": torch.__version__,
        "backend": mk.get_backend(),
        "threads_per_worker": args.threads,
        "os_cpus": os.cpu_count(),
    }
    (args.out / "tiny_grpo.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    plot(runs, args, args.out / "tiny_grpo.png")
    print(f"wrote {args.out / 'tiny_grpo.json'} and {args.out / 'tiny_grpo.png'}")
    if not args.quick and not args.no_readme and args.out.resolve() == (ROOT / DEFAULT_OUT).resolve():
        if update_readme(ROOT / "README.md", tables):
            print(f"wrote the tables into {ROOT / 'README.md'}")
        else:
            print(f"README.md has no {README_BEGIN} ... {README_END} markers: tables not written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
