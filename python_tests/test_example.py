"""The tiny GRPO example (examples/tiny_grpo.py) runs end to end on the CPU in its quick mode: every task, setting
and run kind, on two worker processes, with the same result per seed as a run in this process."""

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
KINDS = ["scalarize", "fixed", "variance", "fixed+floor0.01"]
SWEEP = ["fixed", "fixed+floor0.01", "fixed+floor0.05", "fixed+floor0.2"]


def _load_example():
    spec = importlib.util.spec_from_file_location("tiny_grpo_example", ROOT / "examples" / "tiny_grpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_grpo")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "examples" / "tiny_grpo.py"), "--quick", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return out, json.loads((out / "tiny_grpo.json").read_text()), res.stdout


def test_every_run_kind_present(quick):
    out, data, _ = quick
    assert (out / "tiny_grpo.png").stat().st_size > 10_000
    cfg = data["config"]
    assert cfg["quick"] is True and cfg["steps"] >= 2 and cfg["seeds"] == 1 and cfg["workers"] == 2
    assert set(data["runs"]) == {"a_noise1", "b_cost0.001", "a_noise3", "b_cost0.02"}
    for key in ("a_noise1", "b_cost0.001"):
        assert sorted(data["runs"][key]) == sorted(set(KINDS) | set(SWEEP)), key
    for key in ("a_noise3", "b_cost0.02"):
        assert sorted(data["runs"][key]) == sorted(KINDS), key
    assert [[e["setting"] for e in group] for group in data["experiments"].values()] == [
        ["a_noise1", "b_cost0.001"],
        ["a_noise1", "b_cost0.001"],
        ["a_noise3", "b_cost0.02"],
    ]


def test_curves(quick):
    _, data, _ = quick
    steps, length = data["config"]["steps"], data["config"]["length"]
    for key, kinds in data["runs"].items():
        task = data["settings"][key]["task"]
        second = "format" if task == "a" else "length"
        for name, by_seed in kinds.items():
            assert list(by_seed) == [str(data["config"]["seed"])], (key, name)
            curves = by_seed["0"]["curves"]
            expected = {"correctness", second, f"{second}_weight_share", f"{second}_spread_share"}
            expected |= {"clip_frac", "loss", "adv_std", "format_observed" if task == "a" else "stop"}
            assert set(curves) == expected, (key, name)
            for curve_name, curve in curves.items():
                assert len(curve) == steps and all(math.isfinite(x) for x in curve), (key, name, curve_name)
            for curve_name in ("correctness", f"{second}_weight_share", f"{second}_spread_share", "clip_frac"):
                assert all(0.0 <= x <= 1.0 for x in curves[curve_name]), (key, name, curve_name)
            if task == "a":
                assert all(0.0 <= x <= 1.0 for x in curves["format"]), (key, name)
            else:
                cost = data["settings"][key]["length_cost"]
                assert all(0.0 <= x <= length + 1 for x in curves["stop"]), (key, name)
                # the length reward is -cost x stop position: its batch mean too
                for reward, stop in zip(curves["length"], curves["stop"], strict=True):
                    assert reward == pytest.approx(-cost * stop, abs=1e-6), (key, name)
            # equal weights: the op gives each objective half with scalarize and fixed (with or without a floor);
            # variance moves it per group
            share = curves[f"{second}_weight_share"]
            if name != "variance":
                assert all(x == 0.5 for x in share), (key, name)
            else:
                assert any(x != 0.5 for x in share), (key, name)


def test_same_first_batch_per_seed(quick):
    """Same seed: same initial policy, prompts and sampling, so the same first batch in every run of a task."""
    _, data, _ = quick
    for task in ("a", "b"):
        names = ["correctness", "format" if task == "a" else "stop"]
        first = {
            (key, name): tuple(by_seed["0"]["curves"][c][0] for c in names)
            for key, kinds in data["runs"].items()
            if data["settings"][key]["task"] == task
            for name, by_seed in kinds.items()
        }
        assert len(first) >= 4 and len(set(first.values())) == 1, first
        # and a policy that ignores the prompt is near chance (1 / 16 per digit)
        assert 0.0 < next(iter(first.values()))[0] < 0.2


def test_spread_share_separates_the_weightings(quick):
    """The length cost's share of the advantage: fixed gives it unit scale, the floor and scalarize shrink it."""
    _, data, _ = quick
    first = {name: runs["0"]["curves"]["length_spread_share"][0] for name, runs in data["runs"]["b_cost0.001"].items()}
    assert first["scalarize"] == pytest.approx(first["variance"], abs=1e-4)  # same spread, same shares
    assert first["fixed"] > first["fixed+floor0.01"] > first["fixed+floor0.05"] > first["fixed+floor0.2"]
    assert first["scalarize"] < first["fixed"]


def test_tables(quick, tmp_path):
    _, data, stdout = quick
    tables = data["tables_markdown"]
    assert tables in stdout.replace("\r", "")
    rows = [line for line in tables.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 + len(KINDS) + len(SWEEP) + len(KINDS)  # three header rows and one row per run
    for name in KINDS:
        assert sum(line.startswith(f"| `{name}` |") for line in rows) == 2, name
    # the main table's `fixed` row: (a) correctness, format, share, (b) correctness, stop, share
    cells = [c.strip() for c in next(line for line in rows if line.startswith("| `fixed` |")).split("|")[2:-1]]
    main = data["summary"]
    assert cells[0].split()[0] == f"{main['a_noise1']['fixed']['correctness']['mean']:.3f}"
    assert cells[3].split()[0] == f"{main['b_cost0.001']['fixed']['correctness']['mean']:.3f}"
    assert cells[4] == f"{main['b_cost0.001']['fixed']['stop']['mean']:.2f}"

    # the README's block between the markers is replaced, the rest kept
    example = _load_example()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{example.README_BEGIN}\nold table\n{example.README_END}\nafter\n")
    assert example.update_readme(readme, tables)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{example.README_END}\nafter\n")
    assert "old table" not in text and tables in text
    readme.write_text("no markers\n")
    assert not example.update_readme(readme, tables) and readme.read_text() == "no markers\n"


def test_worker_processes_do_not_change_a_run(quick):
    """A run in this process (one thread) gives the curves the worker process gave it."""
    _, data, _ = quick
    example = _load_example()
    args = example.parse_args(["--quick", "--steps", "3"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for setting, kind in [(example.Setting("b", length_cost=0.001), example.Kind("fixed", 0.01))]:
            run = example.train(setting, kind, args, 0)
            worker = data["runs"][setting.key][kind.name]["0"]["curves"]
            for name, curve in run["curves"].items():
                assert curve == worker[name][:3], name
    finally:
        torch.set_num_threads(threads)
