"""The tiny GRPO example (examples/tiny_grpo.py) runs end to end on the CPU in its quick mode."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_grpo_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "examples" / "tiny_grpo.py"), "--quick", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "tiny_grpo.json").read_text())
    assert (tmp_path / "tiny_grpo.png").stat().st_size > 0
    steps, seeds = data["config"]["steps"], data["config"]["seeds"]
    assert data["config"]["quick"] is True and steps >= 2
    assert set(data["runs"]) == {"scalarize", "fixed", "variance"}
    for weighting, by_seed in data["runs"].items():
        assert len(by_seed) == seeds, weighting
        for run in by_seed.values():
            for name, curve in run["curves"].items():
                assert len(curve) == steps, (weighting, name)
                assert all(math.isfinite(x) for x in curve), (weighting, name)
            for name in ("correctness", "format"):
                assert all(0.0 <= x <= 1.0 for x in run["curves"][name]), (weighting, name)
            # equal weights: scalarize and fixed give each objective half; variance moves it per group
            share = run["curves"]["format_weight_share"]
            if weighting != "variance":
                assert all(abs(x - 0.5) < 1e-6 for x in share), weighting
            else:
                assert all(0.0 <= x <= 1.0 for x in share)
        summary = data["summary"][weighting]
        assert all(math.isfinite(summary[k]["mean"]) for k in data["objectives"])
    # the same seed gives the same first batch (same initial policy, prompts and sampling noise) to every weighting
    first = {w: by_seed[str(data["config"]["seed"])]["curves"]["correctness"][0] for w, by_seed in data["runs"].items()}
    assert len(set(first.values())) == 1, first
