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

from moo_kernels._codes import out_dtype
from moo_kernels._spec import strides2
from moo_kernels.ops.logits import triton_kernels as lk
from moo_kernels.ops.loss.spec import LossSpec
from moo_kernels.ops.loss.triton_launch import partials, reduce, row_statistics

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


def _exchange_fits(kernel, grid: tuple, args: dict, meta: dict, n_chunks: int, device: torch.device) -> bool:
    """Whether the GPU holds twice n_chunks programs of the compiled fused kernel at once (see triton_kernels.py:
    n_chunks make every wait finite; twice that leaves room for a second launch at the same time)."""
    if SLOTS is not None:
        return SLOTS >= 2 * n_chunks
    constexprs = {p.name for p in kernel.params if p.is_constexpr}

    def shape_of(name, value):  # what the compiled kernel depends on: constexprs, and which tensors / dtypes
        if isinstance(value, torch.Tensor):
            return str(value.dtype)
        return value if name in constexprs or value is None else "runtime"

    key = (device.index, tuple(sorted((k, shape_of(k, v)) for k, v in args.items())))
    if key not in _CAPACITY:
        compiled = kernel.warmup(grid=grid, **args, **meta)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        _CAPACITY[key] = resident_programs(
            compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, props
        )
    return _CAPACITY[key] >= 2 * n_chunks


def token_logprobs_fwd_triton(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, want_entropy: bool):
    """(logp [B, T], row statistics [B, T, 2] (max of the logits, log l: what the backward needs), entropy
    [B, T] or None), in float32 (float64 for float64 logits)."""
    B, T, V = logits.shape
    dev = logits.device
    logp = torch.empty(B, T, dtype=out_dtype(logits), device=dev)
    stats = torch.empty(B, T, 2, dtype=logp.dtype, device=dev)
    ent = torch.empty(B, T, dtype=logp.dtype, device=dev) if want_entropy else None
    block, _, _ = _tiles(V)
    lk.logprobs_fwd_kernel[(B * T,)](
        logits, strides2(logits), tokens, strides2(tokens), logp, stats, ent, T, V, 1.0 / temperature, BLOCK_V=block,
        num_warps=NUM_WARPS,
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
    lk.logprobs_bwd_kernel[(B * T, n_chunks)](
        logits, strides2(logits), tokens, strides2(tokens), stats, entropy, g_logp, strides2(g_logp), g_entropy,
        strides2(g_entropy), out, strides2(out), T, V, 1.0 / temperature, chunk, BLOCK_V=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def logits_loss_triton(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    spec: LossSpec,
    temperature: float,
    want_entropy: bool,
    grad: torch.Tensor | None,
):
    """The fused loss (the token-level modes): (loss, metrics [len(METRICS)], entropy or None); the gradient
    d loss / d logits for an incoming gradient of 1 is written into grad (None: not needed)."""
    B, T, V = logits.shape
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    stats, totals = row_statistics(spec, None, B, T)
    rows = B * T
    parts = partials(rows, dev)
    ent = torch.empty(B, T, **f32) if want_entropy else None

    def launch(chunking: tuple[int, int, int], check: bool) -> torch.Tensor | None:
        """Launch over chunks of chunk_v entries (n_chunks per row); check: first see that the GPU holds
        enough programs for the exchange (returns None when it does not, having launched nothing)."""
        block, chunk, n_chunks = chunking
        coop = n_chunks > 1
        # the chunks' published statistics; the flags, then the ticket counter and the error flag
        scratch = torch.empty(rows * n_chunks * 4 if coop else 1, **f32)
        flags = torch.zeros(rows * n_chunks + 2 if coop else 1, dtype=torch.int32, device=dev)
        grid = (rows * n_chunks,)
        k = lk.logits_loss_kernel
        args = spec.kernel_kwargs(
            k, logits=logits, logits_strides=strides2(logits), tokens=tokens, tokens_strides=strides2(tokens),
            grad=grad, grad_strides=strides2(grad), stats=stats, totals=totals, parts=parts, entropy=ent,
            scratch=scratch, flags=flags, T=T, V=V, inv_temp=1.0 / temperature, chunk_v=chunk,
            n_chunks=n_chunks, timeout_ns=TIMEOUT_NS, COOP=coop, SEQUENTIAL=INTERPRETED,
            CHUNKS_P2=triton.next_power_of_2(n_chunks), BLOCK_V=block,
        )  # fmt: skip
        meta = dict(num_warps=NUM_WARPS, **({} if INTERPRETED else {"maxnreg": LOSS_MAXNREG}))
        if check and not _exchange_fits(k, grid, args, meta, n_chunks, dev):
            return None
        k[grid](**args, **meta)
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
    loss, metrics = reduce(parts, totals, logits)
    return loss, metrics, ent


def scale_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x *= g in place ([B, T, V], unit stride on V), on the device: nothing is touched when g == 1."""
    B, T, V = x.shape
    block = min(4096, triton.next_power_of_2(V))
    lk.scale_kernel[(B * T, triton.cdiv(V, block))](x, strides2(x), g, T, V, BLOCK_V=block, num_warps=4)
    return x
