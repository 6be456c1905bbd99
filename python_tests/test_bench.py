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
