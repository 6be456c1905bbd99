"""The one structure of every suite: cases (problem sizes) x implementations, each implementation checked
against the float64 reference on the benchmarked inputs first, then timed.

A suite (advantages.py, policy_loss.py, logits_loss.py) says what its sizes, inputs, implementations
and checks are; `run_suite` does the rest the same way for all: correctness before timing (a
disagreement stops the suite unless keep_going), CPU or CUDA timers, CUDA-graph device time, peak
memory, speedups as ratios of times measured in the same run, and bandwidth over the minimal traffic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import moo_kernels

from . import timing
from .report import Progress, load_average, run_meta

CPU_PAUSE_S = 0.2


@dataclass
class Impl:
    """One implementation of a case: fn() runs one call and returns what the case's check compares."""

    key: str  # stable key in the JSON; its display name is in the suite's names
    fn: Callable[[], Any]
    check: str = "main"  # which of the case's references it is compared with
    slow: bool = False  # CPU: the slow timer (per-sample Python loops)
    optional: bool = False  # a failure to run (torch.compile, Liger) is reported, not fatal
    graph: bool = True  # CUDA: also the device time alone, by CUDA-graph replay
    prepare: Callable[[], None] | None = None  # before the correctness call: fresh inputs for in-place steps
    release: Callable[[], None] | None = None  # drop what a call leaves behind (a .grad) between measurements


@dataclass
class Case:
    """One problem size of a suite, with its inputs held by the closures of its implementations."""

    size: dict[str, int]
    label: str
    x: float  # the size on the plot's axis
    impls: list[Impl]
    check: Callable[[Impl, Any], dict[str, Any]]  # {"ok": bool, "error": headline error, ...}
    nbytes: int  # minimal bytes moved by one call, for the effective bandwidth
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """The options of one run, shared by every suite."""

    device: str
    dtype: str  # "auto": each suite's default for the device
    quick: bool = False
    use_compile: bool = True
    keep_going: bool = False
    reps: int | None = None
    interleave: bool = False
    copy_gbps: float | None = None
    progress: Progress = field(default_factory=lambda: Progress(False))


class Suite:
    """What a suite defines; run_suite does the rest."""

    name = ""
    title = ""
    x_label = ""
    dims: tuple[str, ...] = ()  # the names of a size's numbers, in the order of "AxBxC" on the command line
    presets: dict[str, dict[str, list[tuple[int, ...]]]] = {}  # device -> preset -> sizes, the main one first
    dtypes: dict[str, str] = {"cpu": "float32", "cuda": "float32"}  # default per device
    supported_dtypes: tuple[str, ...] = ("float32",)
    error_kind = ""  # what the headline error of a check is
    bytes_formula = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.dtype = getattr(torch, ctx.dtype if ctx.dtype != "auto" else self.dtypes[ctx.device])
        self.names: dict[str, str] = {}  # key -> display name, in table order
        self.speedup_of: dict[str, list[str]] = {}  # moo key -> the baselines its speedups are reported against
        self.info: dict[str, Any] = {}  # what else the JSON records (backend, Liger, ...)
        self.notes: list[str] = []  # printed above the table

    def choose_backend(self, cpu_probe: Callable[[], Callable[[], Any]], kernel: str) -> str:
        """self.backend, recorded in info: the package's on CUDA; on the CPU cpu_backend of the step cpu_probe()
        builds (only there), with a note and info["moo_fallback_reason"] when the reference stands in."""
        if self.ctx.device == "cuda":
            self.backend = moo_kernels.get_backend()
        else:
            self.backend, reason = cpu_backend(cpu_probe(), kernel)
            if reason:
                self.notes.append(f"moo_kernels ran on the {self.backend} backend ({reason}): not the C++ kernel's")
            self.info["moo_fallback_reason"] = reason
        self.info["moo_backend"] = self.backend
        return self.backend

    def make_case(self, size: dict[str, int], seed: int, main: bool) -> Case:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {}

    def config_line(self, main: dict[str, Any] | None) -> str:
        return ""

    def targets(self, main: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def timers(self) -> dict[str, dict[str, Any]]:
        """Timer keyword arguments: "fast", "slow" (CPU) or "cuda"; --reps overrides the repetitions."""
        ctx = self.ctx
        if ctx.device == "cuda":
            t = {"warmup": 3, "reps": 10, "batch": 10} if ctx.quick else {"warmup": 10, "reps": 100, "batch": 100}
            if ctx.reps:
                t.update(reps=ctx.reps, batch=ctx.reps)
            return {"cuda": t}
        fast = {"warmup": 1, "reps": 10, "budget_s": 0.3} if ctx.quick else {"warmup": 3, "reps": 200, "budget_s": 1.5}
        slow = {"warmup": 0, "reps": 2, "budget_s": 0.5} if ctx.quick else {"warmup": 1, "reps": 5, "budget_s": 3.0}
        if ctx.reps:
            fast["reps"] = ctx.reps
            slow["reps"] = min(slow["reps"], ctx.reps)
        return {"fast": fast, "slow": slow}


# --------------------------------------------------------------------------------------------
# Helpers the suites share


def moo_label(device: str, backend: str) -> str:
    if device == "cuda":
        return "moo_kernels (Triton)" if backend != "reference" else "moo_kernels (reference backend)"
    return "moo_kernels (C++)" if backend in ("auto", "cpp") else f"moo_kernels ({backend} backend)"


def cpu_backend(probe: Callable[[], Any], kernel: str) -> tuple[str, str | None]:
    """The backend that runs an op on the CPU: the current one, or "reference" when its C++ kernel is missing.

    probe() calls the op once; kernel is a word of the AttributeError an extension built before the op
    existed raises. Returns (backend, why the reference is used instead, or None).
    """
    backend = moo_kernels.get_backend()
    if backend == "reference":
        return backend, "the backend is forced to 'reference' (MOO_KERNELS_BACKEND or set_backend)"
    try:
        probe()
    except ImportError as e:  # no moo_kernels._C, or no C++ launcher
        return "reference", f"{type(e).__name__}: {e}"
    except AttributeError as e:
        if kernel in str(e):
            return "reference", f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001 - the kernel is there but fails: the correctness check reports it
        pass
    return backend, None


def with_backend(impl: Impl, backend: str) -> Impl:
    """moo_kernels' calls run on the backend chosen at set-up (the reference when the C++ kernel is missing)."""
    if not impl.key.startswith("moo") or backend == moo_kernels.get_backend():
        return impl
    fn = impl.fn

    def on_backend() -> Any:
        with moo_kernels.use_backend(backend):
            return fn()

    impl.fn = on_backend
    return impl


def parse_sizes(suite: type[Suite], device: str, spec: str) -> list[dict[str, int]]:
    """A preset name ("small", "default", "large", "tiny") or sizes "AxB,AxB" (the first is the main size).

    A size may give fewer numbers than the suite's dims: the rest come from the default main size.
    """
    presets = suite.presets[device]
    if spec in presets:
        shapes = presets[spec]
    else:
        base = presets["default"][0]
        shapes = []
        for item in spec.split(","):
            try:
                nums = tuple(int(x) for x in item.lower().split("x"))
            except ValueError:
                raise ValueError(
                    f"{suite.name}: size {item!r} is neither a preset ({', '.join(presets)}) nor "
                    f"{'x'.join(d.upper() for d in suite.dims)}"
                ) from None
            if not 1 <= len(nums) <= len(suite.dims) or min(nums) < 1:
                raise ValueError(f"{suite.name}: size {item!r} must be up to {len(suite.dims)} positive numbers")
            shapes.append(nums + base[len(nums) :])
    return [dict(zip(suite.dims, s, strict=True)) for s in shapes]


# --------------------------------------------------------------------------------------------
# Running


def _check(case: Case, ctx: Context) -> tuple[dict[str, Any], list[str], list[Impl]]:
    """Run every implementation once and compare it with the reference.

    Returns ({key: errors or error text}, keys that disagree or crashed, implementations to time).
    """
    report: dict[str, Any] = {}
    bad: list[str] = []
    ok: list[Impl] = []
    for impl in case.impls:
        ctx.progress.update(step=f"checking {impl.key}")
        try:
            if impl.prepare is not None:
                impl.prepare()
            out = impl.fn()
            if ctx.device == "cuda":
                torch.cuda.synchronize()
            errs = case.check(impl, out)
        except Exception as e:  # noqa: BLE001 - report and decide below
            report[impl.key] = f"error: {type(e).__name__}: {e}"
            ctx.progress.log(f"  {impl.key}: FAILED to run: {type(e).__name__}: {e}")
            if not impl.optional:
                bad.append(impl.key)
            continue
        finally:
            out = None
            if impl.release is not None:
                impl.release()
        report[impl.key] = errs
        if errs["ok"]:
            ok.append(impl)
        else:
            bad.append(impl.key)
            ctx.progress.log(f"  {impl.key}: DISAGREES with the float64 reference: {errs.get('why', errs)}")
    return report, bad, ok


def _time(impls: list[Impl], timers: dict[str, dict[str, Any]], point: dict[str, Any], ctx: Context) -> None:
    cuda = ctx.device == "cuda"
    if not cuda and ctx.interleave:
        fast = [i for i in impls if not i.slow]
        ctx.progress.update(step="timing, interleaved")
        timer = dict(timers["fast"], budget_s=timers["fast"]["budget_s"] * len(fast))
        for key, tm in timing.time_cpu_interleaved({i.key: i.fn for i in fast}, **timer).items():
            point["timings"][key] = tm.as_dict()
        impls = [i for i in impls if i.slow]
    # CPU: the slow implementations last, each timing after a short pause, so that the burst of work before it
    # (a per-sample loop, the float64 reference) is not billed to the next one on a shared, throttled machine.
    for impl in sorted(impls, key=lambda i: i.slow):
        ctx.progress.update(step=f"timing {impl.key}")
        if not cuda:
            time.sleep(CPU_PAUSE_S)
        try:
            if cuda:
                point["memory"][impl.key] = timing.peak_memory(impl.fn, impl.release)
                tm = timing.time_cuda(impl.fn, **timers["cuda"])
            else:
                tm = timing.time_cpu(impl.fn, **timers["slow" if impl.slow else "fast"])
            point["timings"][impl.key] = tm.as_dict()
        except Exception as e:  # noqa: BLE001 - keep the other figures
            ctx.progress.log(f"  {impl.key}: timing failed: {type(e).__name__}: {e}")
        finally:
            if impl.release is not None:
                impl.release()
    # Graph captures last: a capture that fails cannot disturb the figures above.
    for impl in impls if cuda else []:
        if not impl.graph or impl.key not in point["timings"]:
            continue
        ctx.progress.update(step=f"CUDA graph {impl.key}")
        try:
            graph_timer = {k: timers["cuda"][k] for k in ("reps", "batch")}
            point["device_timings"][impl.key] = timing.time_cuda_graph(impl.fn, **graph_timer).as_dict()
        except Exception as e:  # noqa: BLE001 - a figure we can do without
            point["device_timings"][impl.key] = f"error: {type(e).__name__}: {e}"
            ctx.progress.log(f"  {impl.key}: CUDA graph timing failed: {type(e).__name__}: {e}")
        finally:
            if impl.release is not None:
                impl.release()
            torch.cuda.empty_cache()


def _bandwidth(point: dict[str, Any], copy_gbps: float | None) -> dict[str, Any]:
    """Effective GB/s (the case's minimal bytes / time) of every implementation from each of its timings."""
    out: dict[str, Any] = {}
    for key, tm in point["timings"].items():
        figures = [("latency", tm["median_us"]), ("batch", tm.get("batch_us"))]
        dev = point["device_timings"].get(key)
        if isinstance(dev, dict):
            figures += [("device", dev["median_us"]), ("device_batch", dev["batch_us"])]
        entry = {}
        for label, us in figures:
            if us:
                g = timing.gbps(point["bytes"], us)
                entry[label] = {"us": us, "gbps": g, "fraction_of_copy": g / copy_gbps if copy_gbps else None}
        out[key] = entry
    return out


def run_case(suite: Suite, case: Case, main: bool) -> dict[str, Any]:
    """Check every implementation of one case, then (when all agree, or keep_going) time them."""
    ctx = suite.ctx
    errors, bad, ok = _check(case, ctx)
    point: dict[str, Any] = {
        "size": case.size,
        "label": case.label,
        "x": case.x,
        "main": main,
        "bytes": case.nbytes,
        **case.summary,
        "errors": errors,
        "disagree": bad,
        "correct": not bad,
        "timings": {},
        "device_timings": {},
        "memory": {},
        "speedups": {},
        "device_speedups": {},
        "bandwidth": {},
    }
    if bad and not ctx.keep_going:
        return point
    # With keep_going, implementations that disagree are timed too (and still reported).
    ran = [i for i in case.impls if not str(errors.get(i.key, "")).startswith("error")]
    _time(ok if not ctx.keep_going else ran, suite.timers(), point, ctx)
    device_ok = {k: v for k, v in point["device_timings"].items() if isinstance(v, dict)}
    for moo, baselines in suite.speedup_of.items():
        point["speedups"][moo] = timing.speedups(point["timings"], moo, baselines)
        if device_ok:
            point["device_speedups"][moo] = timing.speedups(device_ok, moo, baselines)
    point["bandwidth"] = _bandwidth(point, ctx.copy_gbps)
    return point


def _pace(last_s: float, last: dict[str, int], size: dict[str, int]) -> float:
    """Seconds a size is expected to take at the pace of the last one: its time, scaled up by the ratio of
    the sizes' elements when the next is larger (never down: compiles and set-up do not shrink with size)."""
    ratio = math.prod(size.values()) / max(1, math.prod(last.values()))
    return last_s * max(1.0, ratio)


def run_suite(
    suite_cls: type[Suite],
    ctx: Context,
    sizes: list[dict[str, int]],
    deadline: float | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every size of one suite (the first is the main size, always run; the others while time is left).

    Returns every figure as a JSON-serialisable dict; result["correct"] is False when an
    implementation disagreed with the reference (the suite then stops unless ctx.keep_going).
    With a deadline, a size after the main one runs only when the time left covers it at the pace of
    the last size measured (_pace); the others are listed in result["skipped"]. on_point(result) is
    called after every size with the result so far (result["complete"] False, the sizes still to
    come in result["pending"]), so that a run stopped from outside keeps what it measured.
    """
    load_before = load_average()
    ctx.progress.update(suite=suite_cls.name, step="setting up")
    suite = suite_cls(ctx)
    meta = run_meta(suite.name, ctx.device, ctx.quick)
    points: list[dict[str, Any]] = []
    skipped: list[str] = []
    disagree: list[str] = []
    labels = [" x ".join(str(v) for v in size.values()) for size in sizes]
    last: tuple[float, dict[str, int]] | None = None  # (seconds, size) of the last size measured

    def result(pending: list[str]) -> dict[str, Any]:
        main = next((p for p in points if p["main"] and "error" not in p), None)
        meta["load_average_1min"] = {"before": load_before, "after": load_average()}
        return {
            "format": 2,
            "suite": suite.name,
            "title": suite.title,
            "device": ctx.device,
            "meta": meta,
            "config": {"dtype": str(suite.dtype).removeprefix("torch."), **suite.config()},
            "config_line": suite.config_line(main),
            "x_label": suite.x_label,
            "bytes_formula": suite.bytes_formula,
            "error_kind": suite.error_kind,
            "names": suite.names,
            "speedup_of": suite.speedup_of,
            "info": suite.info,
            "notes": suite.notes,
            "correct": not disagree,
            "disagree": disagree,
            "points": points,
            "skipped": skipped,
            "complete": not pending,
            "pending": pending,
            "targets": suite.targets(main),
        }

    for i, (size, label) in enumerate(zip(sizes, labels, strict=True)):
        if i > 0 and deadline is not None and last is not None:
            expected = _pace(*last, size)
            if time.monotonic() + expected > deadline:
                ctx.progress.log(f"{suite.name}: size {label} skipped, the time left is under its {expected:.0f} s")
                skipped.append(label)
                continue
        ctx.progress.update(case=f"{label} ({i + 1}/{len(sizes)})", step="making inputs and the reference")
        t0 = time.monotonic()
        try:
            case = suite.make_case(size, seed=i, main=i == 0)
            point = run_case(suite, case, main=i == 0)
            del case
        except Exception as e:  # noqa: BLE001 - keep the figures gathered so far
            ctx.progress.log(f"{suite.name}: size {label} failed: {type(e).__name__}: {e}")
            point = {"size": size, "label": label, "main": i == 0, "error": f"{type(e).__name__}: {e}",
                     "correct": False, "disagree": ["(the case failed)"], "timings": {}}  # fmt: skip
        finally:
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
        last = (time.monotonic() - t0, size)
        points.append(point)
        if not point["correct"]:
            disagree += [f"{suite.names.get(k, k)} ({point['label']})" for k in point["disagree"]]
            if not ctx.keep_going:
                break
        if on_point is not None and i + 1 < len(sizes):
            on_point(result(labels[i + 1 :]))
    return result([])
