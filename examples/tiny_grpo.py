"""A tiny multi-objective GRPO trainer on CPU: one synthetic task, two objectives (one of them noisy),
trained with weighting="scalarize", "fixed" and "variance" in turn, through moo_kernels end to end.

The task. A prompt is L random digits followed by "="; the policy samples L + 1 completion tokens from
a 16-token vocabulary (digits 0-9, "=", ".", four unused symbols). Two objectives per completion:

- correctness: the fraction of the first L completion tokens equal to the reversed prompt (exact,
  checked against the prompt);
- format: 1 when the last completion token is "." (the terminator), else 0, *observed with Gaussian
  noise* of standard deviation --noise (a noisy proxy, like a learned reward model or a sampled judge).

The trainer sees the noisy format reward; the curves report its true value (noise-free), so that the
real quality of each run is visible.

The policy. A causal transformer built here (token + position embeddings, pre-norm blocks of
multi-head attention and an MLP, tied output head), randomly initialised from the seed.

One GRPO step. --prompts prompts x G = --group-size completions (B samples, G consecutive per prompt),
sampled at --temperature; a prompt has L + 1 tokens, a completion L + 1:
  rewards [B, 2] -> moo_kernels.multi_objective_advantages(rewards, group_size=G, weighting=...)
  for each of --epochs PPO epochs:
      logits = model(prompt + completion); view = logits[:, L:-1], the positions that predict the
          completion (a strided view: the op reads it in place)
      first epoch, under no_grad: old_logp = moo_kernels.token_logprobs(view, completion) (these are
          still the weights that sampled)
      loss = moo_kernels.policy_loss_from_logits(view, completion, advantages, mask, old_logp=old_logp,
          clip_low=0.2, clip_high=0.28) -> backward -> gradient norm clipped to 1 -> Adam step
  (with --beta > 0 also a k3 KL to the frozen initial policy, ref_logp from token_logprobs).

Defaults: 16 prompts x 8 completions, 160 steps, 3 seeds, noise 1, weights [1, 1]; about 1.5 minutes on
two shared CPU cores (--quick: 12 steps, one seed, a few seconds).

Each weighting runs from the same seeds: the same initial weights and the same random stream for
prompts, sampling and reward noise (the samples differ as soon as the policies do).

Usage: python examples/tiny_grpo.py [--steps N] [--out DIR] [--seed S] [--seeds K] [--noise SIGMA]
       [--weights W_CORRECT W_FORMAT] [--quick]
Writes DIR/tiny_grpo.json (the curves and the configuration) and DIR/tiny_grpo.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import moo_kernels as mk  # noqa: E402

WEIGHTINGS = ("scalarize", "fixed", "variance")
OBJECTIVES = ("correctness", "format")

DIGITS = 10
EQ, DOT = 10, 11  # "=" ends the prompt, "." ends the completion
VOCAB = 16  # 0-9, "=", ".", four symbols never rewarded


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


# ----------------------------------------------------------------------------------------------- task


def make_prompts(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    digits = torch.randint(0, DIGITS, (n, length), generator=gen)
    return torch.cat([digits, torch.full((n, 1), EQ)], dim=1)


def true_rewards(prompts: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """[N, 2] noise-free objectives: correctness (fraction of the reversed prompt reproduced), format."""
    L = prompts.shape[1] - 1
    target = prompts[:, :L].flip(1)
    correct = (completion[:, :L] == target).float().mean(dim=1)
    fmt = (completion[:, L] == DOT).float()
    return torch.stack([correct, fmt], dim=1)


# -------------------------------------------------------------------------------------------- trainer


def train(weighting: str, args: argparse.Namespace, seed: int, log_every: int) -> dict:
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
    mask = torch.ones(n, C, dtype=torch.bool)
    weights = torch.tensor(args.weights, dtype=torch.float32)

    curves = {k: [] for k in (*OBJECTIVES, "format_observed", "format_weight_share", "clip_frac", "loss", "adv_std")}
    t0 = time.perf_counter()
    for step in range(args.steps):
        prompts = make_prompts(P, L, gen).repeat_interleave(G, dim=0)  # G consecutive samples per prompt
        model.eval()
        seq = sample(model, prompts, C, args.temperature, gen)
        completion = seq[:, L + 1 :]
        truth = true_rewards(prompts, completion)
        observed = truth.clone()
        observed[:, 1] += args.noise * torch.randn(n, generator=gen)

        out = mk.multi_objective_advantages(observed, group_size=G, weights=weights, weighting=weighting)
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

        mean_true = truth.mean(dim=0)
        curves["correctness"].append(round(float(mean_true[0]), 5))
        curves["format"].append(round(float(mean_true[1]), 5))
        curves["format_observed"].append(round(float(observed[:, 1].mean()), 5))
        # the format objective's share of the weight, averaged over groups (0.5 for scalarize / fixed with
        # equal weights; what "variance" gave it in this batch)
        share = out.weights[:, 1] / out.weights.sum(dim=1).clamp_min(1e-12)
        curves["format_weight_share"].append(round(float(share.mean()), 5))
        curves["clip_frac"].append(round(float(metrics.clip_frac), 5))
        curves["loss"].append(round(float(loss.detach()), 5))
        curves["adv_std"].append(round(float(adv.std()), 5))
        if log_every and (step % log_every == 0 or step == args.steps - 1):
            w = 20
            avg = [sum(curves[k][-w:]) / len(curves[k][-w:]) for k in OBJECTIVES]
            print(
                f"  [{weighting:9s} seed {seed}] step {step:4d}  correctness {avg[0]:.3f}  format {avg[1]:.3f}"
                f"  (means of the last {min(w, step + 1)} steps, noise-free)",
                flush=True,
            )
    return {"curves": curves, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------- reporting


def smooth(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def summarise(runs: dict, last: int) -> dict:
    """Per weighting: the mean over the last `last` steps of each objective, per seed and over seeds."""
    summary = {}
    for weighting, by_seed in runs.items():
        s = {}
        for k in OBJECTIVES:
            per_seed = [sum(r["curves"][k][-last:]) / len(r["curves"][k][-last:]) for r in by_seed.values()]
            mean = sum(per_seed) / len(per_seed)
            sd = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / (len(per_seed) - 1)) if len(per_seed) > 1 else 0.0
            s[k] = {"per_seed": per_seed, "mean": mean, "std_over_seeds": sd}
        summary[weighting] = s
    return summary


def plot(runs: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"scalarize": "tab:red", "fixed": "tab:blue", "variance": "tab:green"}
    w = max(1, args.steps // 25)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, k in zip(axes, OBJECTIVES, strict=True):
        for weighting, by_seed in runs.items():
            curves = [smooth(r["curves"][k], w) for r in by_seed.values()]
            steps = range(len(curves[0]))
            mean = [sum(c[i] for c in curves) / len(curves) for i in steps]
            for c in curves if len(curves) > 1 else []:
                ax.plot(steps, c, color=colors[weighting], alpha=0.25, lw=0.8)
            ax.plot(steps, mean, color=colors[weighting], lw=2, label=f'weighting="{weighting}"')
        ax.set_xlabel("GRPO step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_title("correctness (reversed prompt, fraction of digits right)")
    axes[1].set_title(f"format, noise-free (trained on it + N(0, {args.noise:g}²))")
    axes[0].legend(loc="upper left")
    n_seeds = len(next(iter(runs.values())))
    fig.suptitle(
        f"Tiny GRPO, weights {list(args.weights)}, {args.prompts}x{args.group_size} samples/step; "
        f"moving average over {w} steps; {n_seeds} seed(s)" + (" (thin: each seed, thick: mean)" if n_seeds > 1 else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default 160, --quick 12)")
    p.add_argument("--out", type=Path, default=Path("examples"), help="folder for tiny_grpo.json / tiny_grpo.png")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds: seed .. seed+K-1 (default 3, --quick 1)")
    p.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=WEIGHTINGS)
    p.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0], help="objective weights (correctness, format)")
    p.add_argument("--noise", type=float, default=1.0, help="std of the Gaussian noise on the format reward")
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    p.add_argument("--quick", action="store_true", help="a few steps, one seed: a smoke test")
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (12 if a.quick else 160)
    a.seeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_every = max(1, args.steps // 10)
    runs: dict[str, dict[str, dict]] = {}
    t0 = time.perf_counter()
    for weighting in args.weightings:
        runs[weighting] = {}
        for seed in range(args.seed, args.seed + args.seeds):
            print(f'weighting="{weighting}", seed {seed}', flush=True)
            runs[weighting][str(seed)] = train(weighting, args, seed, log_every)
    total = time.perf_counter() - t0

    last = max(1, args.steps // 5)
    summary = summarise(runs, last)
    print(f"\nmean over the last {last} steps (noise-free), mean over seeds (std over seeds):")
    for weighting, s in summary.items():
        cells = "  ".join(f"{k} {s[k]['mean']:.3f} ({s[k]['std_over_seeds']:.3f})" for k in OBJECTIVES)
        print(f"  {weighting:9s}  {cells}")
    print(f"total {total:.1f} s")

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "config": config,
        "objectives": list(OBJECTIVES),
        "summary_last_steps": last,
        "summary": summary,
        "runs": runs,
        "seconds_total": total,
        "torch": torch.__version__,
        "backend": mk.get_backend(),
        "cpu_threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
    }
    (args.out / "tiny_grpo.json").write_text(json.dumps(result) + "\n")
    plot(runs, args, args.out / "tiny_grpo.png")
    print(f"wrote {args.out / 'tiny_grpo.json'} and {args.out / 'tiny_grpo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
