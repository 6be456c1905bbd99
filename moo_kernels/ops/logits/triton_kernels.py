"""Triton kernels of the logits ops (kernels only; see triton_launch.py for the launchers).

A vocabulary row of the logits is split into chunks of chunk_v entries (a multiple of BLOCK_V). Each
chunk's softmax statistics are taken relative to its maximum m of the raw logits z, on x = (z - m) / tau
(computed as (z - m) * (1 / tau): a huge 1 / tau never overflows z / tau): (m, l = sum exp(x),
q = sum exp(x) x). Merging them (rescaling to the larger maximum M: l' = a l, q' = a (q + delta l) with
delta = (m - M) / tau, a = exp(delta)) gives the row's (M, l, q), and then
    logp = (z_y - M) / tau - log l,   H = log l - q / l,   p_v = exp((z_v - M) / tau - log l),
never s_y - lse (which loses the digits of a log-prob below the magnitude of lse). A row without a finite
logit has M = -inf: log-prob -inf, entropy 0, gradient 0. A row holding +inf or NaN gives NaN. A row whose
incoming gradients are 0 gets an exact 0 gradient whatever its logits hold (selected, p never formed).
The backward needs (M, log l) per row: the forward saves them, [B, T, 2].

1. _logprobs_fwd_kernel   one program per row: log-prob, row statistics (max, log l) and entropy (one
                          read of the row).
2. _logprobs_bwd_kernel   grid (row, chunk): d/dz of g_logp logp + g_H H (one read, one write).
3. _logits_loss_kernel    the fused loss, grid (row, chunk): the normaliser of the loss is known before
                          the loss (it depends on the mask only), so the gradient d loss / d logp of a
                          token is known as soon as its log-prob is, and one launch computes the loss,
                          its metrics and d loss / d logits: each program reads its chunk (first pass),
                          the chunks of a row exchange their statistics, then each program writes the
                          gradient of its chunk (second pass, walking the chunk backwards so that the most
                          recently read tiles come first, from L2). The chunks in flight, not whole rows,
                          must fit in L2: that is what lets the logits be read from HBM once.
4. _scale_kernel          the backward's rescale by the incoming gradient; a no-op when it is 1 (decided
                          on the device, no host synchronisation).

The exchange between the chunks of a row: each program publishes its statistics (m, l, q and the raw
logit of the row's token when the chunk holds it, else 0) in a scratch slot and sets its flag (release),
then waits until every sibling's flag is set and merges the published statistics in chunk order (every
program of a row gets the same bits, and so does every run).

Waiting, on a GPU: the flags are polled with plain volatile loads, backing off with nanosleep (32 ns
doubling to 1 us), then read once with acquire semantics. Programs take their (row, chunk) from a ticket
counter when they start, not from their launch index, so every ticket below a running program's belongs to
a program that has started: only the row of the newest ticket can be incomplete, its started programs hold
fewer slots than n_chunks, and the other rows finish and make room for the rest of it. The wait is therefore
finite whenever the GPU holds n_chunks programs of this kernel at once; the launcher checks that it holds
twice as many (from the compiled kernel's registers, shared memory and warps and the device's SM count) and
takes a path without any waiting (one program per row) when it does not. Whatever else shares the GPU
(MIG / MPS partitions, concurrent launches), a wait is bounded: past timeout_ns a program sets the launch's
error flag, which the launcher turns into an error (an asynchronous device-side assertion): never a hang,
never a silent recompute.

SEQUENTIAL (the interpreter, which runs programs one after another in ticket order): nothing waits. A sibling
of a lower chunk has finished and published; one of a higher chunk has not started, so its chunk still holds
the logits (in place too: a chunk is only overwritten by its own program), and its statistics are computed
from it by the same code.
"""

import triton
import triton.language as tl

from moo_kernels.ops.loss.triton_kernels import (
    NUM_PARTIALS,
    at,
    flag_at,
    mask_weight,
    store_partials,
    token_inputs,
    token_terms,
    token_weights,
)


@triton.jit
def _rescale(m, l, q, safe, inv_temp):
    """(l, q) of statistics taken relative to the maximum m, rescaled to the maximum safe >= m (finite)."""
    delta = (m - safe) * inv_temp  # <= 0; -inf when m = -inf (then l = q = 0)
    a = tl.exp(delta)
    return l * a, tl.where(a > 0, a * (q + delta * l), 0.0)


@triton.jit
def _merge(m, l, q, m2, l2, q2, inv_temp):
    """Merge two (max of z, sum exp(x), sum exp(x) x) triples, x = (z - max) / tau."""
    mx = tl.maximum(m, m2)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    l, q = _rescale(m, l, q, safe, inv_temp)
    l2, q2 = _rescale(m2, l2, q2, safe, inv_temp)
    return mx, l + l2, q + q2


@triton.jit
def _chunk_stats(z_row, v_lo, chunk_v, V, tok, inv_temp, BLOCK_V: tl.constexpr):
    """Softmax statistics (m, l, q) of the raw logits z over [v_lo, v_lo + chunk_v) within [0, V) (see the
    top), and z_tok when the chunk holds token tok (else 0): read here, before any program may overwrite
    the chunk in place."""
    v_hi = tl.minimum(v_lo + chunk_v, V)
    mine = (tok >= v_lo) & (tok < v_hi)
    z_tok = tl.load(z_row + tl.where(mine, tok, v_lo), mask=mine, other=0.0).to(tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    q = tl.zeros([], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < v_hi, other=float("-inf")).to(tl.float32)
        mx = tl.maximum(m, tl.max(z, axis=0))
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        l, q = _rescale(m, l, q, safe, inv_temp)
        x = (z - safe) * inv_temp
        e = tl.exp(x)
        l += tl.sum(e, axis=0)
        q += tl.sum(tl.where(e > 0, e * x, 0.0), axis=0)
        m = mx
    return m, l, q, z_tok


@triton.jit
def _clock(zero):
    """The GPU's global nanosecond timer (zero: an int64 0 the instruction is tied to)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [zero], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _nanosleep(ns):
    """Suspend the thread for about ns nanoseconds (ns: int32); returns 0."""
    return tl.inline_asm_elementwise(
        "nanosleep.u32 $1;\n\tmov.u32 $0, 0;", "=r,r", [ns], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _await_flags(row_flags, n_chunks, error_ptr, timeout_ns, CHUNKS_P2: tl.constexpr):
    """Wait until the n_chunks flags at row_flags are all set (see the top): volatile polls with back-off, then
    one acquire read of each; past timeout_ns, set the error flag and stop waiting."""
    lanes = tl.arange(0, CHUNKS_P2)
    present = lanes < n_chunks
    zero = tl.zeros([], dtype=tl.int64)
    start = _clock(zero)
    ready = tl.sum(tl.load(row_flags + lanes, mask=present, other=0, volatile=True), axis=0)
    pause = tl.full([], 32, tl.int32)
    late = start < zero  # False
    while (ready < n_chunks) & (~late):
        _nanosleep(pause)
        pause = tl.minimum(pause * 2, 1024)
        ready = tl.sum(tl.load(row_flags + lanes, mask=present, other=0, volatile=True), axis=0)
        late = _clock(zero) - start > timeout_ns
    tl.atomic_add(row_flags + lanes, 0, mask=present, sem="acquire", scope="gpu")
    if ready < n_chunks:
        tl.atomic_xchg(error_ptr, 1)


@triton.jit
def _published(scratch_ptr, slot):
    """The statistics (m, l, q, z_tok) a program published in its scratch slot."""
    base = scratch_ptr + slot * 4
    return (
        tl.load(base + 0, volatile=True),
        tl.load(base + 1, volatile=True),
        tl.load(base + 2, volatile=True),
        tl.load(base + 3, volatile=True),
    )


@triton.jit
def _row_stats(
    z_row,
    row,
    c,
    V,
    tok,
    inv_temp,
    chunk_v,
    n_chunks,
    scratch_ptr,
    flags_ptr,
    error_ptr,
    timeout_ns,
    COOP: tl.constexpr,
    SEQUENTIAL: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(M, log l, q / l, z_tok) of the row (see the top), from this program's chunk c and its siblings'.
    tok: the row's token id (int32, -1 when out of range: z_tok is then 0)."""
    m, l, q, z_tok = _chunk_stats(z_row, (c * chunk_v).to(tl.int32), chunk_v, V, tok, inv_temp, BLOCK_V)
    if COOP:
        slot = row * n_chunks + c
        tl.store(scratch_ptr + slot * 4 + 0, m)
        tl.store(scratch_ptr + slot * 4 + 1, l)
        tl.store(scratch_ptr + slot * 4 + 2, q)
        tl.store(scratch_ptr + slot * 4 + 3, z_tok)
        tl.debug_barrier()
        tl.atomic_xchg(flags_ptr + slot, 1, sem="release", scope="gpu")
        if not SEQUENTIAL:
            _await_flags(flags_ptr + row * n_chunks, n_chunks, error_ptr, timeout_ns, CHUNKS_P2)
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], dtype=tl.float32)
        q = tl.zeros([], dtype=tl.float32)
        z_tok = tl.zeros([], dtype=tl.float32)
        for j in range(0, n_chunks):
            mj, lj, qj, tj = _published(scratch_ptr, row * n_chunks + j)
            if SEQUENTIAL:
                if j > c:  # not started yet: its chunk still holds the logits
                    mj, lj, qj, tj = _chunk_stats(
                        z_row, (j * chunk_v).to(tl.int32), chunk_v, V, tok, inv_temp, BLOCK_V
                    )  # fmt: skip
            m, l, q = _merge(m, l, q, mj, lj, qj, inv_temp)
            z_tok += tj  # one chunk holds the token, the others add an exact 0
    return m, tl.log(l), q / l, z_tok


@triton.jit
def _logp_entropy(m, log_l, mean_x, z_tok, inv_temp):
    """(logp, H) of a row from its statistics: -inf and 0 for a row without a finite logit (m = -inf,
    log l = -inf; a NaN logit makes log l NaN)."""
    empty = (m == float("-inf")) & (log_l == float("-inf"))
    logp = tl.where(empty, float("-inf"), (z_tok - tl.where(empty, 0.0, m)) * inv_temp - log_l)
    return logp, tl.where(empty, 0.0, log_l - mean_x)


@triton.jit
def _write_grad_chunk(
    z_row, g_row, v_lo, chunk_v, V, tok, m, log_l, mean_x, c_lp, c_h, inv_temp, HAS_H: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """g_row[v] = (c_lp (1[v = tok] - p_v) - c_h p_v (x_v - mean_x)) / tau over the chunk, last tile first,
    x = (z - m) / tau, p = exp(x - log l); exactly 0 when c_lp = c_h = 0 or the row has no finite logit."""
    v_hi = tl.minimum(v_lo + chunk_v, V)
    n_tiles = tl.cdiv(v_hi - v_lo, BLOCK_V)
    live = ((c_lp != 0) | (c_h != 0)) & ((m != float("-inf")) | (log_l != float("-inf")))
    safe = tl.where(live, m, 0.0)
    for i in range(0, n_tiles):
        cols = v_lo + (n_tiles - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        ok = cols < v_hi
        x = (tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32) - safe) * inv_temp
        p = tl.exp(x - log_l)
        gv = tl.where(cols == tok, c_lp, 0.0) - c_lp * p
        if HAS_H:
            gv -= c_h * tl.where(p > 0, p * (x - mean_x), 0.0)
        gv = tl.where(live, gv * inv_temp, 0.0)
        tl.store(g_row + cols, gv.to(g_row.dtype.element_ty), mask=ok)


@triton.jit
def logprobs_fwd_kernel(
    logits, logits_strides, tokens, tokens_strides, logp, stats, entropy, T, V, inv_temp, BLOCK_V: tl.constexpr
):
    """One program per row: log-prob, row statistics (max, log l) and, when entropy is given, the entropy."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    z_row = logits + b * logits_strides[0] + t * logits_strides[1]
    tok = tl.load(tokens + b * tokens_strides[0] + t * tokens_strides[1]).to(tl.int64)
    valid = (tok >= 0) & (tok < V)
    tok = tl.where(valid, tok, -1).to(tl.int32)
    m, log_l, mean_x, z_tok = _row_stats(
        z_row, row, 0, V, tok, inv_temp, V, 1, z_row, tokens, tokens, 0, False, False, 1, BLOCK_V
    )  # fmt: skip
    lp, ent = _logp_entropy(m, log_l, mean_x, z_tok, inv_temp)
    tl.store(logp + row, tl.where(valid, lp, float("nan")).to(logp.dtype.element_ty))
    tl.store(stats + row * 2, m.to(stats.dtype.element_ty))
    tl.store(stats + row * 2 + 1, log_l.to(stats.dtype.element_ty))
    if entropy is not None:
        tl.store(entropy + row, ent.to(entropy.dtype.element_ty))


@triton.jit
def logprobs_bwd_kernel(
    logits, logits_strides, tokens, tokens_strides, stats, entropy, g_logp, g_logp_strides, g_entropy,
    g_entropy_strides, grad, grad_strides, T, V, inv_temp, chunk_v, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (row, chunk): d (g_logp logp + g_entropy H) / d logits of the chunk (absent incoming gradients: 0)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    b = row // T
    t = row % T
    z_row = logits + b * logits_strides[0] + t * logits_strides[1]
    g_row = grad + b * grad_strides[0] + t * grad_strides[1]
    m = tl.load(stats + row * 2).to(tl.float32)
    log_l = tl.load(stats + row * 2 + 1).to(tl.float32)
    c_lp = tl.zeros([], dtype=tl.float32)
    if g_logp is not None:
        c_lp = tl.load(g_logp + b * g_logp_strides[0] + t * g_logp_strides[1]).to(tl.float32)
    c_h = tl.zeros([], dtype=tl.float32)
    mean_x = tl.zeros([], dtype=tl.float32)
    if g_entropy is not None:
        c_h = tl.load(g_entropy + b * g_entropy_strides[0] + t * g_entropy_strides[1]).to(tl.float32)
        mean_x = log_l - tl.load(entropy + row).to(tl.float32)
    tok = tl.load(tokens + b * tokens_strides[0] + t * tokens_strides[1]).to(tl.int64)
    tok = tl.where((tok >= 0) & (tok < V), tok, -1).to(tl.int32)
    v_lo = (c * chunk_v).to(tl.int32)
    _write_grad_chunk(
        z_row, g_row, v_lo, chunk_v, V, tok, m, log_l, mean_x, c_lp, c_h, inv_temp, g_entropy is not None, BLOCK_V
    )  # fmt: skip


@triton.jit
def logits_loss_kernel(
    logits, logits_strides, tokens, tokens_strides, grad, grad_strides, stats, totals, parts, entropy, scratch,
    flags, T, V, inv_temp, chunk_v, n_chunks, timeout_ns,
    advantages, advantages_strides, mask, mask_strides, old_logp, old_logp_strides, ref_logp, ref_logp_strides,
    token_advantages, token_advantages_strides, is_weights, is_weights_strides, offpolicy, offpolicy_strides,
    policy_mask, policy_mask_strides,
    beta, kl: tl.constexpr, kl_bias_correction: tl.constexpr, clip_low, clip_high, dual_clip, ratio_cap,
    mode: tl.constexpr, offpolicy_gamma, sapo_tau_pos, sapo_tau_neg,
    agg: tl.constexpr,
    COOP: tl.constexpr, SEQUENTIAL: tl.constexpr, CHUNKS_P2: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """The fused loss, grid (row, chunk) (see the top): the loss's partial sums, the entropy when entropy is
    given, and d loss / d logits into grad when grad is given."""
    if COOP:
        # work in the order programs start, not in launch order: see the top of the file
        pid = tl.atomic_add(flags + tl.num_programs(0), 1, sem="relaxed", scope="gpu").to(tl.int64)
    else:
        pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    c = pid % n_chunks
    b = row // T
    t = row % T
    v_lo = (c * chunk_v).to(tl.int32)
    z_row = logits + b * logits_strides[0] + t * logits_strides[1]
    m, active = mask_weight(mask, mask_strides, b, t, t < T)  # float64 weight
    compute = active
    if entropy is not None:
        compute = active | True
    # every program of a row takes the same branch, so the exchange inside _row_stats is all or nothing
    if compute:
        tok = tl.load(tokens + b * tokens_strides[0] + t * tokens_strides[1]).to(tl.int64)
        valid = (tok >= 0) & (tok < V)
        tok = tl.where(valid, tok, -1).to(tl.int32)
        m_z, log_l, mean_x, z_tok = _row_stats(
            z_row, row, c, V, tok, inv_temp, chunk_v, n_chunks, scratch, flags, flags + tl.num_programs(0) + 1,
            timeout_ns, COOP, SEQUENTIAL, CHUNKS_P2, BLOCK_V,
        )  # fmt: skip
        lp, ent = _logp_entropy(m_z, log_l, mean_x, z_tok, inv_temp)
        lp = tl.where(valid, lp, float("nan"))

        adv, raw = token_inputs(
            b, t, t < T, lp, advantages, advantages_strides, token_advantages, token_advantages_strides, old_logp,
            old_logp_strides,
        )  # fmt: skip
        off = flag_at(offpolicy, offpolicy_strides, b)
        w_is = at(is_weights, is_weights_strides, b, t, t < T)
        ref = at(ref_logp, ref_logp_strides, b, t, t < T)
        keep = None  # the token-level modes only: the sequence-level ones take the two-kernel path
        dropped = tl.full([], 0, tl.int1)
        if policy_mask is not None:
            keep = tl.load(policy_mask + b * policy_mask_strides[0] + t * policy_mask_strides[1]) != 0
            dropped = keep == 0
        loss_tok, pg, g, k, rho, d, clipped, low, high, dual = token_terms(
            lp, raw, adv, active, 1.0, 0.0, 0.0, off, w_is, ref, beta, clip_low, clip_high, dual_clip, ratio_cap,
            offpolicy_gamma, mode, kl, kl_bias_correction, sapo_tau_pos, sapo_tau_neg, keep,
        )  # fmt: skip
        wl, wmean = token_weights(m, stats, totals, b, agg)
        if grad is not None:
            g_row = grad + b * grad_strides[0] + t * grad_strides[1]
            c_lp = tl.where(active, g * wl, 0.0)
            zero = tl.zeros([], dtype=tl.float32)
            _write_grad_chunk(
                z_row, g_row, v_lo, chunk_v, V, tok, m_z, log_l, mean_x, c_lp, zero, inv_temp, False, BLOCK_V
            )  # fmt: skip
        if c == 0:
            one = tl.full([1], 1.0, tl.float32)  # the row as a block of one token
            store_partials(
                parts + row * NUM_PARTIALS, loss_tok * one, pg * one, k * one, wl * one, wmean * one,
                tl.where(active, one, 0.0) > 0, tl.where(clipped, one, 0.0) > 0, tl.where(low, one, 0.0) > 0,
                tl.where(high, one, 0.0) > 0, tl.where(dual, one, 0.0) > 0, rho * one, d * one,
                tl.where(dropped, one, 0.0) > 0,
            )  # fmt: skip
            if entropy is not None:
                tl.store(entropy + row, ent)
    else:
        if grad is not None:
            g_row = grad + b * grad_strides[0] + t * grad_strides[1]
            v_hi = tl.minimum(v_lo + chunk_v, V)
            for v0 in range(v_lo, v_hi, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=cols < v_hi)
        if c == 0:
            base = parts + row * NUM_PARTIALS
            for j in range(0, NUM_PARTIALS):
                tl.store(base + j, tl.where(j == 8, float("inf"), tl.where(j == 9, float("-inf"), 0.0)))


@triton.jit
def scale_kernel(x, x_strides, g, T, V, BLOCK_V: tl.constexpr):
    """x[b, t, :] *= g, skipped entirely (nothing read or written) when g == 1."""
    gv = tl.load(g).to(tl.float32)
    if gv != 1.0:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        ptr = x + (row // T) * x_strides[0] + (row % T) * x_strides[1] + cols
        xv = tl.load(ptr, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(ptr, (xv * gv).to(x.dtype.element_ty), mask=cols < V)
