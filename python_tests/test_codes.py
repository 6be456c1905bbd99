"""moo_kernels/_codes.py and csrc/codes.h hold the same codes (the Python side and the C++ kernels agree)."""

import re
from pathlib import Path

import pytest
import torch

from moo_kernels import _codes

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "codes.h").read_text()

# C++ enum -> (Python table, enumerator name -> table key) for the names that are not the key in CamelCase
ENUMS = {
    "Normalize": (_codes.NORMALIZE, {"kNoNormalize": "none"}),
    "Std": (_codes.STD, {}),
    "Weighting": (_codes.WEIGHTING, {}),
    "NanPolicy": (_codes.NAN_POLICY, {"kIgnoreNan": "ignore", "kRaiseNan": "raise"}),
    "Column": (
        _codes.COLUMN,
        {
            "kColZScore": "zscore",
            "kColCenter": "center",
            "kColRloo": "rloo",
            "kColNone": "none",
            "kColPassk": "passk",
            "kColPasskUnscaled": "passk_unscaled",
            "kColOpo": "opo",
            "kColLooStd": "loo_std",
        },
    ),  # fmt: skip
    "Batch": (
        _codes.BATCH,
        {"kBatchNone": "none", "kBatchWhiten": "whiten", "kBatchScale": "scale", "kBatchGpg": "gpg"},
    ),  # fmt: skip
    "IsLevel": (_codes.IS_LEVEL, {"kIsToken": "token", "kIsSequence": "sequence"}),
    "IsMode": (_codes.IS_MODE, {"kIsTruncate": "truncate", "kIsMask": "mask"}),
    "Mode": (_codes.MODE, {}),
    "Agg": (_codes.AGG, {}),
    "Kl": (
        _codes.KL,
        {
            "kAbs": "abs",
            "kLowVarKl": "low_var_kl",
            "kK1St": "k1+",
            "kK3St": "k3+",
            "kLowVarKlSt": "low_var_kl+",
            "kAbsSt": "abs+",
        },
    ),  # fmt: skip
}


def enum(name: str) -> dict[str, int]:
    body = re.search(rf"enum {name}\b[^{{]*\{{([^}}]*)\}}", HEADER).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(",") if "=" in item)}


def key_of(enumerator: str) -> str:
    """kSeqMeanTokenMean -> seq-mean-token-mean, kZScore -> zscore, kK1 -> k1."""
    words = re.findall(r"[A-Z][a-z]*|\d+", enumerator[1:])
    return "-".join(w.lower() for w in words).replace("z-score", "zscore").replace("k-1", "k1").replace(
        "k-2", "k2").replace("k-3", "k3")  # fmt: skip


def test_option_codes_agree():
    for name, (table, aliases) in ENUMS.items():
        cpp = {aliases.get(k, key_of(k)): v for k, v in enum(name).items()}
        assert cpp == table, (name, cpp, table)


def test_dtype_codes_agree():
    cpp = enum("DType")
    names = {torch.float16: "kFloat16", torch.bfloat16: "kBFloat16", torch.float32: "kFloat32",
             torch.float64: "kFloat64", torch.bool: "kBool", torch.int32: "kInt32", torch.int64: "kInt64",
             torch.uint8: "kUInt8"}  # fmt: skip
    assert {dt: cpp[names[dt]] for dt in _codes.DTYPE} == _codes.DTYPE


def test_constants_and_metric_layout_agree():
    assert f"kNoError = int64_t(1) << {_codes.NO_ERROR.bit_length() - 1}" in HEADER
    assert 2 ** (_codes.NO_ERROR.bit_length() - 1) == _codes.NO_ERROR
    assert re.search(r"kLogRatioMax = ([\d.]+);", HEADER).group(1) == repr(_codes.LOG_RATIO_MAX)
    metrics = enum("Metric")
    assert metrics.pop("kNumMetrics") == len(_codes.METRICS)
    assert [key_of(k).replace("-", "_") for k, _ in sorted(metrics.items(), key=lambda kv: kv[1])] == list(
        _codes.METRICS
    )
    rollout = enum("RolloutMetric")
    assert rollout.pop("kNumMetrics") == len(_codes.ROLLOUT_METRICS)
    assert [key_of(k).replace("-", "_") for k, _ in sorted(rollout.items(), key=lambda kv: kv[1])] == list(
        _codes.ROLLOUT_METRICS
    )


# ---- the C++ boundary (csrc/args.h): every tensor checked, errors that name it --------------------------------


def _loss_call(**changes):
    """The C++ policy loss called as its launcher does, with some of the spec's fields or outputs replaced."""
    from moo_kernels._backend import cpp
    from moo_kernels.ops.loss.spec import loss_spec

    logp = -torch.rand(2, 3)
    spec = loss_spec((2, 3), logp.device, "logp", advantages=torch.ones(2), mask=torch.ones(2, 3, dtype=torch.bool))
    outputs = dict(logp=logp, grad=None, loss=torch.empty(()), metrics=torch.empty(len(_codes.METRICS)))
    for name, value in changes.items():
        if name in outputs:
            outputs[name] = value
        else:
            setattr(spec, name, value)  # past the Python checks: only the C++ ones stand
    cpp().policy_loss(outputs["logp"], outputs["grad"], spec, outputs["loss"], outputs["metrics"])
    return outputs


def test_cpp_boundary_accepts_what_the_launcher_passes():
    out = _loss_call()
    assert torch.isfinite(out["loss"]) and out["metrics"][_codes.METRICS.index("active_tokens")] == 6.0


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(advantages=torch.ones(3)), r"advantages must have shape \(2,\) or \(2, 3\), got \(3,\)"),
        (dict(mask=torch.ones(2, 3, dtype=torch.int64)), "mask: unsupported dtype code"),
        (dict(old_logp=torch.zeros(3, 2)), r"old_logp must have shape \(2, 3\)"),
        (dict(offpolicy=torch.ones(2)), "offpolicy: unsupported dtype code"),
        (dict(advantages=None), "advantages must be given"),
        (dict(metrics=torch.empty(3)), rf"metrics must have shape \({len(_codes.METRICS)},\)"),
        (dict(loss=torch.empty((), dtype=torch.float64)), "loss: unsupported dtype code"),
        (dict(grad=torch.empty(2, 4)), r"grad must have shape \(2, 3\)"),
        (dict(logp=torch.zeros(2, 3, 1, 1, 1)), "logp: a tensor of rank <= 4 expected"),
        (dict(agg="no-such-agg"), "no code for the option agg"),
    ],
)
def test_cpp_boundary_names_the_bad_tensor(changes, match):
    with pytest.raises(ValueError, match=match):
        _loss_call(**changes)


def test_cpp_boundary_reads_the_spec_by_name():
    from moo_kernels._backend import cpp

    with pytest.raises(ValueError, match="the spec has no argument advantages"):
        cpp().policy_loss(-torch.rand(2, 3), None, object(), torch.empty(()), torch.empty(len(_codes.METRICS)))


def test_absent_typed_floats_reach_triton_as_nan():
    """Triton types an annotated float parameter (x: tl.float64) whatever the value, and a GPU launch cannot pass
    None as a float (the interpreter can): every such parameter gets a float from the spec, NaN when absent."""
    import math

    from moo_kernels._spec import Context, typed_floats
    from moo_kernels.ops.advantages import triton_kernels as ak
    from moo_kernels.ops.advantages.spec import AdvantageSpec
    from moo_kernels.ops.loss import triton_kernels as lk
    from moo_kernels.ops.loss.spec import loss_spec

    loss = loss_spec((2, 3), torch.device("cpu"), "logp", advantages=torch.ones(2), mask=torch.ones(2, 3).bool())
    adv, _ = AdvantageSpec.prepare(Context({"N": 4, "K": 2}, torch.device("cpu"), "rewards"), group_size=2)
    for spec, kernel in (
        (loss, lk.totals_kernel),
        (adv, ak.advantages_fwd_kernel),
        (adv, ak.advantages_batchnorm_kernel),
    ):
        kwargs = spec.kernel_kwargs(kernel)
        typed = typed_floats(kernel) & set(kwargs)
        assert typed, kernel
        assert all(isinstance(kwargs[name], float) for name in typed), kwargs
    assert math.isnan(loss.kernel_kwargs(lk.totals_kernel)["num_tokens"])
    assert math.isnan(adv.kernel_kwargs(ak.advantages_fwd_kernel)["clip"])
