"""moo-bench runs end to end on the CPU at a tiny size, checks correctness before timing, writes valid JSON
and a PNG per suite; a wrong implementation stops its suite; the README's performance section is current."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("advantages", "policy_loss", "logits_loss")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "moo_kernels.bench", "--quick", "--device", "cpu", "--no-compile", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    return res, out


def test_quick_run_succeeds(quick_run):
    res, _ = quick_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for suite in SUITES:
        assert f"{suite}_cpu_" in res.stderr


@pytest.mark.parametrize("suite", SUITES)
def test_quick_run_json_and_png(quick_run, suite):
    _, out = quick_run
    (path,) = out.glob(f"{suite}_cpu_*.json")
    data = json.loads(path.read_text())
    assert data["format"] == 2 and data["suite"] == suite and data["device"] == "cpu"
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "python", "git_commit", "date", "num_threads", "command"):
        assert key in meta, key
    assert meta["quick"] is True and meta["torch"] == torch.__version__
    assert data["correct"] is True and not data["disagree"]
    assert "compiled" not in data["names"]  # --no-compile
    assert len(data["points"]) >= 2 and data["points"][0]["main"] is True
    for point in data["points"]:
        assert set(point["errors"]) == set(point["timings"]) and "moo" in point["timings"]
        assert all(e["ok"] is True for e in point["errors"].values())
        assert all(t["median_us"] > 0 for t in point["timings"].values())
        for moo, baselines in data["speedup_of"].items():
            ratios = point["speedups"][moo]
            assert set(ratios) == {b for b in baselines if b in point["timings"]} and ratios
            assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_wrong_implementation_stops_the_suite(tmp_path, monkeypatch):
    """An eager baseline that is off by a little fails the check: nothing is timed and the exit status is 1."""
    from moo_kernels.bench import __main__ as cli
    from moo_kernels.bench import advantages

    make = advantages.make_eager

    def wrong(weighting, group_size):
        right = make(weighting, group_size)
        return (lambda *args: right(*args) + 1e-3) if weighting == "fixed" else right

    monkeypatch.setattr(advantages, "make_eager", wrong)
    args = ["--quick", "--device", "cpu", "--no-compile", "--no-plot", "--no-progress", "--suites", "advantages"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("advantages_cpu_*.json")
    data = json.loads(path.read_text())
    label = data["points"][0]["label"]
    assert data["correct"] is False and data["disagree"] == [f"eager PyTorch (vectorised) ({label})"]
    assert len(data["points"]) == 1 and data["points"][0]["timings"] == {}
    assert data["points"][0]["errors"]["eager"]["ok"] is False and data["points"][0]["errors"]["moo"]["ok"] is True


def test_usage_errors():
    from moo_kernels.bench import __main__ as cli

    assert cli.main(["--suites", "nope", "--device", "cpu"]) == 2
    assert cli.main(["--suites", "advantages", "--dtype", "bfloat16", "--device", "cpu"]) == 2
    assert cli.main(["--sizes", "advantages=12xfoo", "--device", "cpu"]) == 2


def test_readme_performance_section_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "render_readme.py"), "--check"],
                         capture_output=True, text=True, env=_env(), timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr


def test_json_rewritten_after_every_size(tmp_path, monkeypatch):
    """Every size measured is on disk before the next starts: a run stopped from outside keeps it."""
    from moo_kernels.bench import __main__ as cli

    seen = []
    write = cli.write_json

    def recording(result, path):
        write(result, path)
        seen.append(json.loads(path.read_text()))

    monkeypatch.setattr(cli, "write_json", recording)
    args = ["--quick", "--device", "cpu", "--no-compile", "--no-plot", "--no-progress", "--suites", "policy_loss"]
    assert cli.main([*args, "--sizes", "8x64,8x32,8x16", "--out", str(tmp_path)]) == 0
    assert [len(d["points"]) for d in seen] == [1, 2, 3]
    assert [d["complete"] for d in seen] == [False, False, True]
    assert [d["pending"] for d in seen] == [["8 x 32", "8 x 16"], ["8 x 16"], []]
    assert all(d["meta"]["command"].startswith("moo-bench") for d in seen)
    assert not list(tmp_path.glob("*.tmp"))


def test_budget_skips_sizes_that_would_not_fit(tmp_path):
    """The main size always runs; a later one only when the time left covers it at the pace of the last."""
    from moo_kernels.bench import __main__ as cli

    args = ["--quick", "--device", "cpu", "--no-compile", "--no-plot", "--no-progress", "--suites", "policy_loss"]
    assert cli.main([*args, "--sizes", "8x64,8x32", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("policy_loss_cpu_*.json")
    data = json.loads(path.read_text())
    assert [p["size"] for p in data["points"]] == [{"b": 8, "t": 64}] and data["skipped"] == ["8 x 32"]
    assert data["complete"] is True and data["meta"]["budget_s"] == 0


def test_pace_scales_up_only():
    from moo_kernels.bench.core import _pace

    assert _pace(2.0, {"b": 8, "t": 64}, {"b": 8, "t": 256}) == 8.0
    assert _pace(2.0, {"b": 8, "t": 64}, {"b": 8, "t": 16}) == 2.0


def test_plot_command_draws_from_json(quick_run, tmp_path):
    """JSON that came back alone (from a GPU run) gets its PNG; --missing leaves current ones and other JSON."""
    from moo_kernels.bench import plot

    _, out = quick_run
    (src,) = out.glob("advantages_cpu_*.json")
    path = tmp_path / src.name
    path.write_text(src.read_text())
    other = tmp_path / "tune_logits_cpu_20260101.json"
    other.write_text('{"rows": []}')
    args = ["--missing", str(path), str(other)]
    assert plot.main(args) == 0
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC and not other.with_suffix(".png").exists()
    mtime = png.stat().st_mtime_ns
    assert plot.main(args) == 0 and png.stat().st_mtime_ns == mtime  # current: not drawn again
    assert plot.main([str(other)]) == 1  # named explicitly, a file that is not moo-bench's is an error


def test_readme_renders_gpu_results_copied_into_results(quick_run, tmp_path, monkeypatch):
    """A GPU run's JSON, copied into the results folder under the name it came with, gets the GPU paragraph."""
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "bench" / "render_readme.py")
    render_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_readme)
    monkeypatch.setattr(render_readme, "ROOT", tmp_path)
    _, out = quick_run
    (src,) = out.glob("policy_loss_cpu_*.json")
    data = json.loads(src.read_text())
    data["device"] = "cuda"
    data["meta"] |= {"device": "cuda", "quick": False, "device_name": "NVIDIA H200"}
    data["pending"] = ["32 x 256"]
    (tmp_path / "policy_loss_cuda_20261201.json").write_text(json.dumps(data))
    text = render_readme.render(tmp_path)
    section = text.split("### Policy loss", 1)[1].split("###", 1)[0]
    assert "**GPU**, " in section and "NVIDIA H200" in section and "not yet measured" in section  # CPU: none here
    assert "stopped before the sizes 32 x 256" in section
    assert "**GPU**: not yet measured" in text.split("### Policy loss", 1)[0]  # the other suites: no GPU JSON


def test_linear_loss_cut_cross_entropy_row(monkeypatch):
    """The Cut Cross-Entropy row of linear_loss (timed on CUDA only, where CCE's kernels run): its log-probs are
    -linear_cross_entropy(hidden / temperature, weight, tokens, reduction="none"), the loss on them eager's. A
    stand-in with CCE's signature and semantics (the per-token cross-entropy of e @ c.T) checks the wiring here."""
    import types

    from moo_kernels.bench import linear_loss
    from moo_kernels.bench.linear_loss import cce_linear_loss, eager_linear_loss, make_inputs

    monkeypatch.setattr(linear_loss, "TEMPERATURE", 0.8)  # the hidden / temperature branch

    def linear_cross_entropy(e, c, targets, reduction="mean"):
        assert reduction == "none"
        z = (e @ c.T).float()
        return torch.nn.functional.cross_entropy(z.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)

    monkeypatch.setitem(
        sys.modules, "cut_cross_entropy", types.SimpleNamespace(linear_cross_entropy=linear_cross_entropy)
    )
    out = []
    for fn in (cce_linear_loss, eager_linear_loss):
        inp = make_inputs(2, 8, 16, 64, torch.float32, "cpu")
        loss = fn(inp["hidden"], inp["weight"], inp)
        loss.backward()
        out.append((loss.detach(), inp["hidden"].grad, inp["weight"].grad))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert out[0][1].abs().sum() > 0
