"""Compile Triton kernel configurations ahead of time for sm_80 and sm_90, without a GPU.

Run as a script (the interpreter must be off: TRITON_INTERPRET is removed before triton is imported).
Each configuration is compiled to PTX with triton.compile, then assembled by the ptxas that ships with
triton (`ptxas -v`), whose report gives registers and spill bytes. Prints one JSON line per
configuration: {"kernel", "arch", "config", "registers", "spill_stores", "spill_loads"}.

The configurations are the block sizes the launchers pick for representative problem shapes, crossed with the
options that change the compiled code (constexpr options, absent tensors).
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moo_kernels import _codes  # noqa: E402
from moo_kernels.ops.advantages import triton_kernels as adv_k  # noqa: E402
from moo_kernels.ops.advantages import triton_launch as adv_launch  # noqa: E402
from moo_kernels.ops.advantages.spec import AdvantageSpec, Derived  # noqa: E402
from moo_kernels.ops.logits import triton_kernels as lg_k  # noqa: E402
from moo_kernels.ops.logits import triton_launch as lg_launch  # noqa: E402
from moo_kernels.ops.logits.spec import LogitsSpec  # noqa: E402
from moo_kernels.ops.loss import triton_kernels as loss_k  # noqa: E402
from moo_kernels.ops.loss import triton_launch as loss_launch  # noqa: E402
from moo_kernels.ops.loss.spec import LossSpec  # noqa: E402
from moo_kernels.ops.policy_loss import triton_kernels as pl_k  # noqa: E402
from moo_kernels.ops.policy_loss import triton_launch as pl_launch  # noqa: E402
from moo_kernels.ops.rollout import triton_kernels as ro_k  # noqa: E402
from moo_kernels.ops.rollout import triton_launch as ro_launch  # noqa: E402
from moo_kernels.ops.rollout.spec import RolloutSpec  # noqa: E402

ARCHS = (80, 90)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def ptxas_report(ptx: str) -> dict:
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [PTXAS, f"-arch={target}", "-v", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_stores": int(stores.group(1)) if stores else 0,
        "spill_loads": int(loads.group(1)) if loads else 0,
    }


def compile_kernel(
    fn, signature: dict, constexprs: dict, arch: int, num_warps: int, maxnreg: int | None = None
) -> dict:
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "maxnreg": maxnreg}
    )
    return ptxas_report(compiled.asm["ptx"])


def advantages_configs():
    """(name, kernel, signature, constexprs, num_warps, label) of the advantage kernels: the block sizes the
    launcher picks for representative shapes, crossed with the options that change the compiled code."""
    shapes = [  # (input dtype, K, group size, M, number of groups)
        (torch.float32, 1, 16, 1, 8192),
        (torch.bfloat16, 4, 16, 2, 1024),
        (torch.float32, 8, 16, 2, 8192),
        (torch.float16, 3, 5, 1, 100),
        (torch.float32, 8, 64, 3, 512),
        (torch.float32, 64, 16, 1, 64),
        (torch.float32, 2, 4096, 1, 4),
        (torch.float64, 4, 16, 2, 64),
        (torch.float64, 8, 1024, 2, 2),
    ]
    # (options, absent tensors): the plain call; everything on, grouped by ids; each column x weighting, and each
    # batch step (with lengths where it reads them)
    plain = dict(column=0, std=1, weighting=0, drop_zero_variance=False, batch=0, nan_policy=1, check_weights=False)
    plain_absent = {"order", "offsets", "valid", "reward_gates", "gates", "raw", "code", "parts", "clip", "std_floor",
                    "lengths"}  # fmt: skip
    every = dict(column=2, std=0, weighting=2, drop_zero_variance=True, batch=1, nan_policy=0, check_weights=True)
    option_sets = [(plain, plain_absent), (every, {"group_size", "lengths"})]
    # (the column's code differs between "scalarize" (on the combined reward) and the per-objective weightings,
    # whose "fixed" and "variance" differ only in the weights; a batch step is the same code under each weighting
    # but for the combined reward that "scale" and "gpg" read)
    scalarize, fixed = _codes.WEIGHTING["scalarize"], _codes.WEIGHTING["fixed"]
    for column in _codes.COLUMN.values():
        for weighting in (scalarize, fixed, _codes.WEIGHTING["variance"]) if column < 4 else (scalarize, fixed):
            absent = plain_absent - {"valid", "gates"} - ({"lengths"} if column == _codes.COLUMN["opo"] else set())
            option_sets.append((dict(plain, column=column, weighting=weighting), absent))
    for batch, weighting in ((1, scalarize), (1, fixed), (2, scalarize), (3, scalarize), (3, fixed)):
        lengths = {"lengths"} if batch in (_codes.BATCH["whiten"], _codes.BATCH["scale"]) else set()
        absent = plain_absent - {"raw", "code", "parts"} - lengths
        option_sets.append((dict(plain, batch=batch, weighting=weighting), absent))
    kernel = adv_k.advantages_fwd_kernel
    for i, (dtype, k, size, m, groups) in enumerate(shapes):
        meta = adv_launch.block_sizes(groups, size, k, m)
        num_warps = meta.pop("num_warps")
        out = "fp64" if dtype == torch.float64 else "fp32"  # the output dtype; the kernel computes in float64
        ptrs = dict(rewards=TYPE[dtype], order="i64", offsets="i64", weights="fp64", std_floor="fp64", valid="u8",
                    reward_gates="u8", gates="u8", out_advantages=out, out_group_mask="u8", out_sample_mask="u8",
                    out_weights=out, out_mean=out, out_std=out, raw="fp64", code="u8", parts="fp64",
                    status="i64", lengths="i64")  # fmt: skip
        sets = option_sets if (k, size) == (8, 16) and dtype == torch.float32 else option_sets[:2]
        for options, absent in sets:
            sig, cx = build(kernel, ptrs, absent, "i32", dict(meta, **options))
            yield "advantages_fwd", kernel, sig, cx, num_warps, f"shape{i}"
    kernel = adv_k.advantages_batchnorm_kernel
    for out in ("fp32", "fp64"):
        ptrs = dict(out_advantages=out, out_sample_mask="u8", raw="fp64", code="u8", parts="fp64")
        for clip in (False, True):
            for batch in (1, 2, 3):
                constexprs = dict(std=1, batch=batch, BLOCK_N=adv_launch.BATCH_BLOCK, BLOCK_P=1024)
                sig, cx = build(kernel, ptrs, set() if clip else {"clip"}, "i32", constexprs)
                yield "advantages_batchnorm", kernel, sig, cx, 4, out


# The kinds of the kernels' parameters named after a spec field (a float option is a float argument), and the
# parameters of the launchers' own that are floats or 64-bit integers.
SPEC_ARGS = {**LossSpec._arg, **LogitsSpec._arg, **AdvantageSpec._arg, **Derived._arg, **RolloutSpec._arg}
FLOAT_ARGS = {"inv_temp"}
INT64_ARGS = {"timeout_ns"}


def build(fn, pointers: dict, absent: set, index: str, constexprs: dict) -> tuple[dict, dict]:
    """(signature, constexprs) of a kernel whose parameters follow the package's conventions: pointers in
    pointers (name -> element type), the absent optional arguments in absent (None: a constexpr; their strides stay
    runtime integers: the launchers pass (0, 0)), strides tuples `<name>_strides` of type index, a parameter with a
    type annotation of that type (the advantage kernels' float64 options), the other float options of a spec (and
    FLOAT_ARGS) fp32 (a Python float reaches a kernel so), other integers of type index."""
    sig, cx = {}, dict(constexprs)
    for p in fn.params:
        n = p.name
        spec_arg = SPEC_ARGS.get(n)
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in absent and not p.annotation:  # a typed float stays a runtime value (NaN when absent)
            sig[n] = "constexpr"
            cx[n] = None
        elif n.endswith("_strides"):
            sig[n] = (index, index)
        elif n in pointers:
            sig[n] = f"*{pointers[n]}"
        elif p.annotation:
            sig[n] = p.annotation
        elif n in FLOAT_ARGS or (spec_arg is not None and spec_arg.kind == "float"):
            sig[n] = "fp32"
        elif n in INT64_ARGS:
            sig[n] = "i64"
        else:
            sig[n] = index
    return sig, cx


def loss_pointers(lp: str) -> dict:
    """The loss's tensors: log-prob dtype lp, a bool mask and offpolicy (bytes), float32 advantages / weights."""
    return dict(
        old_logp=lp, ref_logp=lp, mask="u8", offpolicy="u8", advantages="fp32", token_advantages="fp32",
        is_weights="fp32", stats="fp64", totals="fp64", parts="fp32", sampling_logp=lp, policy_mask="u8",
    )  # fmt: skip


ALL_ON: set = set()
PLAIN = {"token_advantages", "is_weights", "offpolicy", "dual_clip", "ratio_cap", "sampling_logp",
         "offpolicy_mask_threshold", "policy_mask"}  # fmt: skip
SEQUENCE_MODES = {_codes.MODE[m] for m in ("gspo", "gmpo", "vespo")}


def policy_loss_configs():
    """(name, kernel, signature, constexprs, num_warps, label) of the policy-loss kernels."""
    for lp in ("fp32", "bf16"):  # the token-level modes (one stands for all), the sequence ones, [B] or [B, T] weights
        for mode, offp, is_row in itertools.product((0, *sorted(SEQUENCE_MODES)), (False, True), (False, True)):
            ptrs = dict(loss_pointers(lp), logp=lp)
            absent = set() if offp else {"sampling_logp", "offpolicy_mask_threshold"}
            name = next((k for k, v in _codes.MODE.items() if v == mode))
            cx = dict(BLOCK_T=loss_launch.row_block(name), mode=mode, IS_ROW=is_row)
            sig, cx = build(loss_k.row_stats_kernel, ptrs, absent, "i32", cx)
            yield "policy_row_stats", loss_k.row_stats_kernel, sig, cx, 4, lp
    for agg in range(5):  # each aggregation, with its global counts given and not
        for given in (False, True):
            absent = set() if given else {"num_tokens", "num_sequences"}
            ptrs = dict(stats="fp64", totals="fp64")
            sig, cx = build(loss_k.totals_kernel, ptrs, absent, "i32", dict(agg=agg, BLOCK_B=1024))
            yield "policy_totals", loss_k.totals_kernel, sig, cx, 4, f"agg{agg}"
    ptrs = dict(parts="fp32", totals="fp64", out="fp64")
    sig, cx = build(loss_k.reduce_partials_kernel, ptrs, set(), "i32", dict(BLOCK_P=256))
    yield "policy_reduce", loss_k.reduce_partials_kernel, sig, cx, 4, ""
    for lp in ("fp32", "bf16", "fp16"):
        for mode in _codes.MODE.values():
            for agg in range(5):
                for kl in _codes.KL.values():
                    if (agg, kl) != (0, 3) and ((mode, lp) != (0, "fp32") or (agg > 0 and kl > 3)):
                        continue  # every mode x dtype at (token-mean, k3); for clip fp32 every agg, every kl
                    for off in (ALL_ON, PLAIN):
                        absent = set(off)
                        ptrs = dict(loss_pointers(lp), logp=lp, grad=lp)
                        cx = dict(mode=mode, agg=agg, kl=kl, kl_bias_correction=off is ALL_ON and mode != 1,
                                  BLOCK_T=pl_launch.BLOCK_T)  # fmt: skip
                        sig, cx = build(pl_k.policy_loss_fwd_kernel, ptrs, absent, "i32", cx)
                        yield "policy_loss_fwd", pl_k.policy_loss_fwd_kernel, sig, cx, pl_launch.FWD_WARPS, lp


def rollout_configs():
    """(name, kernel, signature, constexprs, num_warps, label) of the rollout-correction kernel: each level x mode,
    with and without the rejection criteria and the bounds."""
    kernel = ro_k.rollout_kernel
    for lp in ("fp32", "bf16"):
        for level, mode, reject in itertools.product((0, 1), (0, 1), (False, True)):
            ptrs = dict(old_logp=lp, rollout_logp=lp, mask="u8", reject="fp64", out_weights="fp32", out_mask="u8",
                        parts="fp64")  # fmt: skip
            absent = set() if reject else {"reject"}
            sig, cx = build(kernel, ptrs, absent, "i32", dict(level=level, mode=mode, BLOCK_T=ro_launch.BLOCK_T))
            yield "rollout", kernel, sig, cx, 4, lp


def logits_configs():
    """(name, kernel, signature, constexprs, num_warps, label) of the logits kernels, at the tile size of
    the launcher, for 16/32-bit logits and 32/64-bit strides ("i64" is what the launcher passes once an
    offset passes 2^31: the kernels must compile for it)."""
    block = lg_launch.BLOCK_V
    for z in ("bf16", "fp16", "fp32"):
        for index in ("i32", "i64"):
            label = f"{z}/{index}"
            base = dict(logits=z, tokens="i64", logp="fp32", stats="fp32", entropy="fp32", grad=z, x=z, g="fp32")
            for h in (False, True):
                absent = set() if h else {"entropy"}
                sig, cx = build(lg_k.logprobs_fwd_kernel, base, absent, index, dict(BLOCK_V=block))
                yield "logprobs_fwd", lg_k.logprobs_fwd_kernel, sig, cx, 8, label
                ptrs = dict(base, g_logp="fp32", g_entropy="fp32")
                absent = set() if h else {"g_entropy", "entropy"}
                sig, cx = build(lg_k.logprobs_bwd_kernel, ptrs, absent, index, dict(BLOCK_V=block))
                yield "logprobs_bwd", lg_k.logprobs_bwd_kernel, sig, cx, 8, label
            sig, cx = build(lg_k.scale_kernel, base, set(), index, dict(BLOCK_V=block))
            yield "logits_scale", lg_k.scale_kernel, sig, cx, 4, label
            for mode in _codes.MODE.values():
                if mode in SEQUENCE_MODES:
                    continue  # the sequence-level modes take the two-kernel path
                for coop in (False, True):
                    all_on = mode == 0
                    absent = set() if all_on else PLAIN | {"entropy"}
                    ptrs = dict(base, **loss_pointers(z), scratch="fp32", flags="i32")
                    cx = dict(mode=mode, agg=0, kl=3, kl_bias_correction=all_on, COOP=coop, SEQUENTIAL=False,
                              CHUNKS_P2=16, BLOCK_V=block)  # fmt: skip
                    sig, cx = build(lg_k.logits_loss_kernel, ptrs, absent, index, cx)
                    yield "logits_loss", lg_k.logits_loss_kernel, sig, cx, lg_launch.NUM_WARPS, label


def main() -> int:
    for name, fn, sig, constexprs, num_warps, shape in [
        *advantages_configs(),
        *policy_loss_configs(),
        *logits_configs(),
        *rollout_configs(),
    ]:
        for arch in ARCHS:
            maxnreg = {"logits_loss": lg_launch.LOSS_MAXNREG, "advantages_fwd": adv_launch.FWD_MAXNREG}.get(name)
            report = compile_kernel(fn, sig, constexprs, arch, num_warps, maxnreg)
            config = {k: (v if isinstance(v, (int, bool)) else str(v)) for k, v in constexprs.items()}
            print(
                json.dumps(
                    {"kernel": name, "arch": arch, "shape": shape, "num_warps": num_warps, "config": config, **report}
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
