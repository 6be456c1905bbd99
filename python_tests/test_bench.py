"""The benchmarks run end to end on the CPU at a tiny size, check correctness first and write valid JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bench", ["advantages", "policy_loss"])
def test_benchmark_quick_cpu(bench, tmp_path):
    out = tmp_path / f"{bench}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(ROOT / "bench" / f"bench_{bench}.py"), "--device", "cpu", "--quick",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["correct"] is True and not data["disagree"]
    assert data["meta"]["quick"] is True and data["device"] == "cpu"
    assert all(t["median_us"] > 0 for t in data["timings"].values())


def test_logits_benchmark_quick_cpu(tmp_path):
    """The loss-from-logits benchmark: every implementation checked against float64, JSON and plot written."""
    out, png = tmp_path / "logits_loss.json", tmp_path / "logits_loss.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = ["--device", "cpu", "--quick", "--no-compile", "--json", str(out), "--plot", str(png)]
    script = str(ROOT / "bench" / "bench_logits_loss.py")
    res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    for key in ("meta", "config", "names", "errors", "timings", "bandwidth", "speedup_of_moo", "sweep", "liger"):
        assert key in data, key
    assert data["correct"] is True and not data["disagree"] and data["moo_available"] is True
    assert data["meta"]["quick"] is True and data["meta"]["benchmark"] == "logits_loss" and data["device"] == "cpu"
    names = data["names"]
    for key in ("moo", "moo_inplace", "eager"):
        assert data["errors"][names[key]]["ok"] is True
        assert data["timings"][names[key]]["median_us"] > 0
    assert names["compiled"] not in data["timings"]  # --no-compile
    assert len(data["sweep"]) >= 2 and data["sweep"][0]["main"] is True
    assert png.stat().st_size > 0
