"""The package against the committed snapshot of every op's outputs and gradients (bench/snapshot.py): the C++
kernels bit for bit, the reference and the Triton kernels to their tolerances.

The snapshot was taken before the internal restructuring of 0.3.0 and holds the package to "behaviour
unchanged" through it. A release that changes behaviour on purpose takes a new one (`python bench/snapshot.py
--out python_tests/data/snapshot.pt`) and says so in CHANGELOG.md.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import snapshot  # noqa: E402


@pytest.mark.skipif(HAS_CUDA, reason="the snapshot's Triton outputs come from the interpreter (CPU tensors)")
def test_outputs_equal_the_committed_snapshot():
    old = torch.load(ROOT / "python_tests" / "data" / "snapshot.pt")
    new = snapshot.take(("cpp", "reference", "triton"))
    assert set(new) == set(old), sorted(set(new) ^ set(old))[:5]
    problems = snapshot.compare(old, new)
    assert not problems, problems[:10]


def test_compare_finds_a_changed_bit():
    old = {"case": {"cpp": [snapshot.digest(torch.tensor([1.0, 2.0]))], "triton": [torch.tensor([1.0])]}}
    assert snapshot.compare(old, old) == []
    bumped = torch.nextafter(torch.tensor([1.0, 2.0]), torch.tensor(3.0))
    new = {"case": {"cpp": [snapshot.digest(bumped)], "triton": [torch.tensor([1.1])]}}
    assert len(snapshot.compare(old, new)) == 2
