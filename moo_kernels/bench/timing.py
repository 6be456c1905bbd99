"""Timers of the benchmark suites (python -m moo_kernels.bench) and of bench/tune_logits.py.

CPU: `time_cpu` calls the function a few times to warm up, then times every repetition on its own
with time.perf_counter (garbage collection paused, as timeit does) and reports the median.
`time_cpu_interleaved` does the same for several functions, one call of each per repetition.

CUDA: `time_cuda` measures two things.
- Latency of one call: before each repetition the L2 cache is optionally flushed (a 256 MiB buffer
  is zeroed) and the device synchronised, so the device is idle when the start event is recorded;
  then start event, the Python call, end event. The elapsed time therefore covers the host-side
  cost of the call (argument checks, launches, any host synchronisation inside it) plus the device
  work, as a training step sees it. The median over the repetitions is reported.
- Throughput: `batch` calls back to back between one pair of events, divided by `batch`. For a
  fully asynchronous function this is max(host launch cost, device time) per call; for one that
  synchronises the host inside, it stays close to the latency.

`time_cuda_graph` measures the device time of an asynchronous function without the host-side
cost: the function is captured once in a CUDA graph and the graph replayed (L2 flushed and device
idle before each replay); what remains on top of the kernels is one graph launch (a few us).

`cuda_copy_bandwidth` measures the ceiling to compare against: a large device-to-device copy,
counting bytes read plus bytes written. `peak_memory` is the rise of max_memory_allocated over one call.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Timing:
    """Times of one function, in microseconds."""

    median_us: float
    min_us: float
    max_us: float
    mean_us: float
    reps: int
    batch_us: float | None = None  # time per call of `batch_calls` back-to-back calls (CUDA only)
    batch_calls: int = 0
    l2_flushed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summary(samples_us: list[float], **extra: Any) -> Timing:
    return Timing(
        median_us=statistics.median(samples_us),
        min_us=min(samples_us),
        max_us=max(samples_us),
        mean_us=statistics.fmean(samples_us),
        reps=len(samples_us),
        **extra,
    )


def time_cpu(
    fn: Callable[[], Any], *, warmup: int = 3, reps: int = 20, budget_s: float | None = None, min_reps: int = 1
) -> Timing:
    """Median wall-clock time of fn() on the host.

    budget_s stops the repetitions early once that many seconds have been spent timing (but never
    before min_reps repetitions), for slow functions such as per-sample Python loops.
    """
    return time_cpu_interleaved({"fn": fn}, warmup=warmup, reps=reps, budget_s=budget_s, min_reps=min_reps)["fn"]


def time_cpu_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    reps: int = 20,
    budget_s: float | None = None,
    min_reps: int = 1,
) -> dict[str, Timing]:
    """time_cpu for several functions at once, their repetitions interleaved.

    Each repetition calls every function once (each individually timed, the order rotating from one
    repetition to the next), so a burst of load from elsewhere on the machine falls on all of them
    alike and their ratio stays fair. budget_s bounds the time of all functions together.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        spent = 0.0
        for i in range(reps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[name]()
                dt = time.perf_counter() - t0
                samples[name].append(dt * 1e6)
                spent += dt
            if budget_s is not None and spent >= budget_s and i + 1 >= min_reps:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _summary(s) for name, s in samples.items()}


_flush_buffer: torch.Tensor | None = None


def flush_l2(device: torch.device | str = "cuda") -> None:
    """Evict the L2 cache by writing a buffer larger than it (asynchronous)."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    _flush_buffer.zero_()


def time_cuda(
    fn: Callable[[], Any], *, warmup: int = 10, reps: int = 100, batch: int = 100, flush: bool = True
) -> Timing:
    """Per-call latency (median of `reps` individually event-timed calls) and batched throughput.

    fn must run on the current CUDA device's current stream. See the module docstring for what
    the two figures include.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        if flush:
            flush_l2()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends, strict=True)]

    batch_us = None
    if batch > 0:
        b_start = torch.cuda.Event(enable_timing=True)
        b_end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        b_start.record()
        for _ in range(batch):
            fn()
        b_end.record()
        torch.cuda.synchronize()
        batch_us = b_start.elapsed_time(b_end) * 1e3 / batch
    return _summary(samples, batch_us=batch_us, batch_calls=batch, l2_flushed=flush)


def time_cuda_graph(
    fn: Callable[[], Any], *, warmup: int = 3, reps: int = 100, batch: int = 100, flush: bool = True
) -> Timing:
    """Device time of fn: median of individually event-timed replays of a CUDA graph of one call.

    fn must not synchronise the host (capture fails). batch_us is `batch` back-to-back replays / batch.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as graph capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    try:
        return time_cuda(graph.replay, warmup=0, reps=reps, batch=batch, flush=flush)
    finally:
        del graph


def cuda_copy_bandwidth(nbytes: int = 1 << 30, *, warmup: int = 3, reps: int = 20) -> dict[str, float]:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s), counting bytes read + bytes written.

    Copies `nbytes` from one buffer to another; the median event-timed copy is reported.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    median_us = statistics.median(samples)
    moved = 2 * nbytes
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_moved": float(moved), "median_us": median_us, "gbps": moved / (median_us * 1e-6) / 1e9}


def gbps(nbytes: int | float, us: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes/s) of moving nbytes in us microseconds."""
    return nbytes / (us * 1e-6) / 1e9


def time_on(device: str, fn: Callable[[], Any], timer: dict[str, Any]) -> Timing:
    """time_cuda on "cuda", time_cpu elsewhere, with the timer's keyword arguments."""
    return time_cuda(fn, **timer) if device == "cuda" else time_cpu(fn, **timer)


def speedups(timings: dict[str, Any], against: str, names: list[str], key: str = "median_us") -> dict[str, float]:
    """times[name] / times[against]: how many times faster `against` is than each name."""
    base = timings.get(against)
    if not isinstance(base, dict) or not base.get(key):
        return {}
    out = {}
    for name in names:
        tm = timings.get(name)
        if isinstance(tm, dict) and tm.get(key):
            out[name] = tm[key] / base[key]
    return out


def allow_recompiles(limit: int = 32) -> None:
    """torch.compile specialises an eager function once per size of a sweep: allow that many."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr) and getattr(cfg, attr) < limit:
            setattr(cfg, attr, limit)


def peak_memory(fn: Callable[[], Any], release: Callable[[], None] | None = None) -> dict[str, float]:
    """CUDA: bytes allocated by one call of fn at its peak, and still held after it (e.g. the gradient).

    release() runs first (and after), dropping what an earlier call left behind (a .grad).
    """
    if release is not None:
        release()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    held = torch.cuda.memory_allocated() - base
    if release is not None:
        release()
    return {"peak_bytes": float(peak), "peak_gb": peak / 1e9, "held_after_bytes": float(held)}
