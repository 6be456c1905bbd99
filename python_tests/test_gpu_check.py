"""bench/gpu_check.sh: its CPU rehearsal runs every step and writes the files a GPU run brings back (each one
whole and holding checked results), its GPU plan fits the lease, and the `gpu` marker selects exactly the tests
that touch a CUDA device."""

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["environment", "build_cpp", "liger_kernel", "tests", "bench_advantages", "bench_policy_loss",
         "bench_logits_loss", "bench_linear_loss", "tune_logits"]  # fmt: skip
SUITES = ("advantages", "policy_loss", "logits_loss", "linear_loss")
GPU_BUDGET_S = 8 * 60
MAX_FILES = 8  # what the GPU machine's output folder gives back
FLAT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MOO_GPU_CHECK_PLAN", "MOO_GPU_CHECK_REHEARSAL")}
    return env | {"PY": sys.executable, **extra}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env=_env(MOO_GPU_CHECK_REHEARSAL="1", OUT=str(out)))  # fmt: skip
    return res, out, time.monotonic() - t0


def test_rehearsal_succeeds(rehearsal):
    res, out, seconds = rehearsal
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.rstrip().endswith("gpu_check: every step succeeded")
    print(f"rehearsal: {seconds:.0f} s")


def test_rehearsal_files(rehearsal):
    _, out, _ = rehearsal
    names = sorted(p.name for p in out.iterdir())
    (day,) = {m.group(1) for n in names if (m := re.match(r"advantages_cpu_(\d{8})\.json$", n))}
    expected = {"gpu_check.log", "gpu_check_summary.json", "junit.xml", f"tune_logits_cpu_{day}.json"}
    expected |= {f"{suite}_cpu_{day}.json" for suite in SUITES}
    assert set(names) == expected
    assert len(names) <= MAX_FILES and all(FLAT_NAME.match(n) for n in names)
    assert all((out / n).is_file() and (out / n).stat().st_size > 0 for n in names)


def test_rehearsal_summary(rehearsal):
    res, out, _ = rehearsal
    summary = json.loads((out / "gpu_check_summary.json").read_text())
    assert summary["mode"] == "rehearsal" and summary["device"] == "cpu"
    assert summary["complete"] is True and summary["ok"] is True and summary["failed"] == []
    assert [s["name"] for s in summary["steps"]] == STEPS
    wheel = any((ROOT / "bench" / "wheels").glob("liger_kernel-*.whl"))
    for s in summary["steps"]:
        skipped = s["name"] == "liger_kernel" and not wheel
        assert s["status"] == ("skipped" if skipped else "ok") and s["rc"] == 0, s
        assert 0 <= s["seconds"] <= s["timeout_s"] or skipped, s
    log = (out / "gpu_check.log").read_text()
    for name in STEPS:
        assert f"== {name}" in log
    assert "every step succeeded" in log


def test_rehearsal_benchmark_json(rehearsal):
    _, out, _ = rehearsal
    for suite in SUITES:
        (path,) = out.glob(f"{suite}_cpu_*.json")
        data = json.loads(path.read_text())
        assert data["format"] == 2 and data["suite"] == suite and data["device"] == "cpu"
        assert data["complete"] is True and data["pending"] == []
        assert data["correct"] is True and not data["disagree"]
        assert data["points"] and data["points"][0]["main"] is True
        for point in data["points"]:
            assert point["errors"] and all(e["ok"] is True for e in point["errors"].values())
            assert "moo" in point["timings"] and all(t["median_us"] > 0 for t in point["timings"].values())


def test_rehearsal_tuning_json(rehearsal):
    _, out, _ = rehearsal
    (path,) = out.glob("tune_logits_cpu_*.json")
    data = json.loads(path.read_text())
    assert data["complete"] is True and data["meta"]["interpreted"] is True
    defaults = data["defaults"]
    shapes = {tuple(r["shape"]) for r in data["rows"]}
    assert len(shapes) == 2 and len(data["best"]) == 2
    for shape in shapes:
        rows = [r for r in data["rows"] if tuple(r["shape"]) == shape]
        # every shape starts from the launcher's defaults, whatever the shape before ended on
        first = rows[0]
        assert first["default"] is True
        assert (first["chunk"], first["block"]) == (defaults["CHUNK_V"], defaults["BLOCK_V"])
        assert len(rows) >= 2 and all(r["correct"] is True and r["us"] > 0 for r in rows)
        assert any(r["chunks"] > 1 for r in rows)  # the chunk exchange was swept too


def test_rehearsal_junit(rehearsal):
    _, out, _ = rehearsal
    root = ET.parse(out / "junit.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests")) for s in suites)
    assert tests >= 20
    assert sum(int(s.get("failures")) + int(s.get("errors")) for s in suites) == 0
    cases = list(root.iter("testcase"))
    assert len(cases) == tests and all("triton" in c.get("name") for c in cases)  # the interpreted kernels
    assert not any(c.find("skipped") is not None for c in cases)


def test_gpu_plan_fits_the_lease():
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=_env(MOO_GPU_CHECK_PLAN="1"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "plan (gpu)" in res.stdout
    planned, worst = map(int, re.search(r"planned_s (\d+) worst_case_s (\d+)", res.stdout).groups())
    assert 0 < planned < worst < GPU_BUDGET_S  # even when no step stops at its timeout's signal


SAMPLE_TESTS = """
import pytest

@pytest.mark.parametrize("backend,device", [("cpp", "cpu"), ("triton", "cpu"), ("auto", "cuda")])
def test_op(backend, device):
    pass

@pytest.mark.gpu
def test_marked():
    pass

@pytest.mark.skipif(True, reason="mixing devices needs a CUDA device")
def test_mixed():
    pass

@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backend_only(backend):
    pass

def test_plain():
    pass
"""


@pytest.mark.parametrize(
    "marker,expected",
    [
        ("gpu", ["test_op[auto-cuda]", "test_marked", "test_mixed"]),
        ("triton_cpu", ["test_op[triton-cpu]", "test_backend_only[triton]"]),
    ],
)
def test_markers_select_what_touches_the_gpu(tmp_path, marker, expected):
    """conftest.py marks at collection, before -m deselects: the cuda parametrisation, the gpu-marked tests and
    those skipped for want of a CUDA device are `gpu`; the Triton-on-CPU parametrisations `triton_cpu`."""
    (tmp_path / "conftest.py").write_text((ROOT / "python_tests" / "conftest.py").read_text())
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                          marker, "test_sample.py"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=_env())  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    got = [line.split("::", 1)[1] for line in res.stdout.splitlines() if line.startswith("test_sample.py::")]
    assert sorted(got) == sorted(expected)


EXTENSION_PROBE = """
import os, sys, torch
import moo_kernels as mk
from moo_kernels._backend import cpp
assert cpp().__file__ == os.environ["MOO_KERNELS_EXTENSION"], cpp().__file__
assert sys.modules["moo_kernels._C"] is cpp() and mk._C is cpp()
with mk.use_backend("cpp"):
    out = mk.brier_reward(torch.tensor([1.0, 0.0]), torch.tensor([0.75, 0.25]))
print(float(out.sum()))
"""


def test_extension_named_by_environment_is_loaded(tmp_path):
    """MOO_KERNELS_EXTENSION (make sanitize's build) is what cpp() loads; a wrong path is a clear ImportError."""
    pytest.importorskip("moo_kernels._C")
    import moo_kernels._C as built

    copy = tmp_path / Path(built.__file__).name
    copy.write_bytes(Path(built.__file__).read_bytes())
    cmd = [sys.executable, "-c", EXTENSION_PROBE]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=_env(MOO_KERNELS_EXTENSION=str(copy), PYTHONPATH=str(ROOT)))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) == pytest.approx(1.0 - 2 * 0.25**2)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=_env(MOO_KERNELS_EXTENSION=str(tmp_path / "nope.so"), PYTHONPATH=str(ROOT)))  # fmt: skip
    assert res.returncode != 0 and "MOO_KERNELS_EXTENSION" in res.stderr
