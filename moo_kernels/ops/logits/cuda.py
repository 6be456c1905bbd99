"""Triton launchers of the logits ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Tuning knobs, read from the environment at import: MOO_KERNELS_LOGITS_CHUNK (vocabulary entries per program
of the fused loss), MOO_KERNELS_LOGITS_BLOCK (entries per tile), MOO_KERNELS_LOGITS_MAXNREG (register cap of
the fused kernel), MOO_KERNELS_LOGITS_TIMEOUT_S (the longest a program of the fused loss waits for its
siblings' statistics before it reports an error; 10 s) and MOO_KERNELS_LOGITS_SLOTS (the number of programs
of the fused kernel the GPU is taken to hold at once, in place of the number computed from the compiled
kernel and the device: to test the path without waiting).
"""

from __future__ import annotations

import os

import torch
import triton

from moo_kernels.ops.logits import triton_kernels as lk
from moo_kernels.ops.policy_loss import triton_kernels as pk
from moo_kernels.ops.policy_loss.cuda import NUM_METRICS, _strides
from moo_kernels.ops.policy_loss.problem import AGG_CODES, KL_CODES, MODE_CODES, PolicyLossProblem

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_V = int(os.environ.get("MOO_KERNELS_LOGITS_BLOCK", "2048"))
CHUNK_V = int(os.environ.get("MOO_KERNELS_LOGITS_CHUNK", "16384"))
TIMEOUT_NS = int(float(os.environ.get("MOO_KERNELS_LOGITS_TIMEOUT_S", "10")) * 1e9)
SLOTS = int(os.environ["MOO_KERNELS_LOGITS_SLOTS"]) if os.environ.get("MOO_KERNELS_LOGITS_SLOTS") else None
NUM_WARPS = 8
# The fused loss kernel's register cap: without it ptxas spills in the exchange of the chunks; at 96 it
# does not (checked ahead of time for every flag set, python_tests/aot_compile.py).
LOSS_MAXNREG = int(os.environ.get("MOO_KERNELS_LOGITS_MAXNREG", "96"))
MAX_CHUNKS = 64


def _tiles(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, chunk_v, n_chunks): tiles never wider than the row, chunks a multiple of the tile."""
    block = min(BLOCK_V, triton.next_power_of_2(V))
    chunk = max(block, CHUNK_V // block * block, triton.cdiv(V, MAX_CHUNKS * block) * block)
    return block, chunk, triton.cdiv(V, chunk)


def _whole_rows(V: int) -> tuple[int, int, int]:
    """(BLOCK_V, chunk_v, n_chunks) of the path without waiting: one program per row."""
    block, _, _ = _tiles(V)
    return block, triton.cdiv(V, block) * block, 1


def resident_programs(n_regs: int, shared: int, num_warps: int, props) -> int:
    """How many programs of a compiled kernel (registers per thread, shared memory per program, warps) the GPU
    whose properties are props holds at once: the SM count times the fewest programs an SM takes by threads,
    registers (allocated per warp in units of 256), shared memory (1 KiB reserved per program) and its limit
    of 32 programs."""
    threads = num_warps * 32
    per_sm = [getattr(props, "max_threads_per_multi_processor", 2048) // threads, 32]
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    per_sm.append(getattr(props, "regs_per_multiprocessor", 65536) // max(1, regs_per_warp * num_warps))
    if shared > 0:
        per_sm.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024))
    return props.multi_processor_count * max(0, min(per_sm))


_CAPACITY: dict[tuple, int] = {}


def _exchange_fits(kernel, grid: tuple, args: tuple, meta: dict, n_chunks: int, device: torch.device) -> bool:
    """Whether the GPU holds twice n_chunks programs of the compiled fused kernel at once (see triton_kernels.py:
    n_chunks make every wait finite; twice that leaves room for a second launch at the same time)."""
    if SLOTS is not None:
        return SLOTS >= 2 * n_chunks
    key = (device.index, args[0].dtype, tuple(sorted(meta.items())))
    if key not in _CAPACITY:
        compiled = kernel.warmup(*args, grid=grid, **meta)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        _CAPACITY[key] = resident_programs(
            compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, props
        )
    return _CAPACITY[key] >= 2 * n_chunks


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def token_logprobs_fwd_triton(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, want_entropy: bool):
    """(logp [B, T], row statistics [B, T, 2] (max of the logits, log l: what the backward needs), entropy
    [B, T] or None), in float32 (float64 for float64 logits)."""
    B, T, V = logits.shape
    dev = logits.device
    logp = torch.empty(B, T, dtype=_out_dtype(logits), device=dev)
    stats = torch.empty(B, T, 2, dtype=logp.dtype, device=dev)
    ent = torch.empty(B, T, dtype=logp.dtype, device=dev) if want_entropy else None
    block, _, _ = _tiles(V)
    lk._logprobs_fwd_kernel[(B * T,)](
        logits, tokens, logp, stats, ent if ent is not None else logp, T, V,
        logits.stride(0), logits.stride(1), tokens.stride(0), tokens.stride(1), 1.0 / temperature,
        WANT_ENTROPY=want_entropy, BLOCK_V=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    return logp, stats, ent


def token_logprobs_bwd_triton(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes d (g_logp logp + g_entropy H) / d logits into out (which may be logits itself), from the
    forward's row statistics (contiguous [B, T, 2])."""
    B, T, V = logits.shape
    block, chunk, n_chunks = _tiles(V)
    glp, s_lb, s_lt = _strides(g_logp, stats)
    gh, s_hb, s_ht = _strides(g_entropy, stats)
    lk._logprobs_bwd_kernel[(B * T, n_chunks)](
        logits, tokens, stats, entropy if entropy is not None else stats, glp, gh, out, T, V,
        logits.stride(0), logits.stride(1), tokens.stride(0), tokens.stride(1), out.stride(0), out.stride(1),
        s_lb, s_lt, s_hb, s_ht, 1.0 / temperature, chunk,
        HAS_GLP=g_logp is not None, HAS_H=g_entropy is not None, BLOCK_V=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def logits_loss_triton(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    p: PolicyLossProblem,
    temperature: float,
    want_entropy: bool,
    grad: torch.Tensor | None,
):
    """The fused loss (modes other than "gspo"): (loss, metrics[11], entropy or None); the gradient
    d loss / d logits for an incoming gradient of 1 is written into grad (None: not needed)."""
    B, T, V = logits.shape
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    f64 = dict(dtype=torch.float64, device=dev)  # the loss's row statistics and totals
    mask = p.mask.view(torch.uint8) if p.mask.dtype == torch.bool else p.mask
    stats = torch.empty(B, 2, **f64)
    totals = torch.empty(2, **f64)
    pk._row_stats_kernel[(B,)](
        mask, mask, mask, stats, T, 0, 0, 0, 0, mask.stride(0), mask.stride(1),
        BLOCK_T=min(triton.next_power_of_2(T), 2048), HAS_OLD=False, GSPO_MODE=False, num_warps=4,
    )  # fmt: skip
    pk._totals_kernel[(1,)](stats, totals, B, BLOCK_B=min(triton.next_power_of_2(B), 1024), num_warps=4)

    rows = B * T
    parts = torch.empty(rows, pk.NUM_PARTIALS.value, **f32)
    ent = torch.empty(B, T, **f32) if want_entropy else None
    old, s_ob, s_ot = _strides(p.old_logp, mask)
    ref, s_rb, s_rt = _strides(p.ref_logp, mask)
    adv, s_ab, s_at = _strides(p.advantages, mask)
    tadv, s_tb, s_tt = _strides(p.token_advantages, mask)
    isw, s_wb, s_wt = _strides(p.is_weights, mask)
    off = p.offpolicy.view(torch.uint8) if p.offpolicy is not None else mask
    g, s_gb, s_gt = (grad, grad.stride(0), grad.stride(1)) if grad is not None else (logits, 0, 0)

    def launch(chunking: tuple[int, int, int], check: bool) -> torch.Tensor | None:
        """Launch over chunks of chunk_v entries (n_chunks per row); check: first see that the GPU holds
        enough programs for the exchange (returns None when it does not, having launched nothing)."""
        block, chunk, n_chunks = chunking
        coop = n_chunks > 1
        # the chunks' published statistics; the flags, then the ticket counter and the error flag
        scratch = torch.empty(rows * n_chunks * 4 if coop else 1, **f32)
        flags = torch.zeros(rows * n_chunks + 2 if coop else 1, dtype=torch.int32, device=dev)
        grid = (rows * n_chunks,)
        args = (
            logits, tokens, mask, adv, tadv, old, ref, isw, off, stats, totals, g, parts,
            ent if ent is not None else parts, scratch, flags,
            T, V, logits.stride(0), logits.stride(1), tokens.stride(0), tokens.stride(1), mask.stride(0),
            mask.stride(1), s_ab, s_at, s_tb, s_tt, s_ob, s_ot, s_rb, s_rt, s_wb, s_wt, s_gb, s_gt,
            1.0 / temperature, p.beta, p.clip_low, p.clip_high, p.dual_clip or 0.0, p.ratio_cap or 0.0,
            p.offpolicy_gamma, p.norm_const(), chunk, n_chunks, TIMEOUT_NS,
        )  # fmt: skip
        meta = dict(
            MODE=MODE_CODES[p.mode], AGG=AGG_CODES[p.agg], KL=KL_CODES[p.kl],
            HAS_OLD=p.old_logp is not None, HAS_REF=p.ref_logp is not None, HAS_TADV=p.token_advantages is not None,
            HAS_ISW=p.is_weights is not None, HAS_OFF=p.offpolicy is not None, HAS_DUAL=p.dual_clip is not None,
            HAS_CAP=p.ratio_cap is not None, HAS_NUM_TOKENS=p.num_tokens is not None,
            WRITE_GRAD=grad is not None, WANT_ENTROPY=want_entropy, COOP=coop, SEQUENTIAL=INTERPRETED,
            CHUNKS_P2=triton.next_power_of_2(n_chunks), BLOCK_V=block, num_warps=NUM_WARPS,
            **({} if INTERPRETED else {"maxnreg": LOSS_MAXNREG}),
        )  # fmt: skip
        if check and not _exchange_fits(lk._logits_loss_kernel, grid, args, meta, n_chunks, dev):
            return None
        lk._logits_loss_kernel[grid](*args, **meta)
        return flags if coop else None

    chunking = _tiles(V)
    exchange = chunking[2] > 1
    if exchange and not INTERPRETED:
        flags = launch(chunking, check=True)
        if flags is None:  # the GPU cannot hold the exchange: one program per row
            launch(_whole_rows(V), check=False)
        else:
            torch._assert_async(
                flags[-1] == 0,
                "policy_loss_from_logits: a program of the fused logits kernel waited more than "
                f"MOO_KERNELS_LOGITS_TIMEOUT_S={TIMEOUT_NS / 1e9:g} s for its siblings (the GPU did not run them: "
                "another kernel or process holds it, or a partition is too small); its results are not valid",
            )
    else:
        launch(chunking, check=False)
    out = torch.empty(NUM_METRICS + 1, **f64)
    pk._reduce_partials_kernel[(1,)](
        parts, totals, out, rows, BLOCK_P=min(triton.next_power_of_2(rows), 256), num_warps=4
    )
    dt = _out_dtype(logits)
    return out[0].to(dt), out[1:].to(dt), ent


def scale_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x *= g in place ([B, T, V], unit stride on V), on the device: nothing is touched when g == 1."""
    B, T, V = x.shape
    block = min(4096, triton.next_power_of_2(V))
    lk._scale_kernel[(B * T, triton.cdiv(V, block))](x, g, T, V, x.stride(0), x.stride(1), BLOCK_V=block, num_warps=4)
    return x
