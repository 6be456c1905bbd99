"""Option parsing and input validation shared by every op: the one place errors are raised.

Modes travel to the kernels as small integers (constexpr in Triton, plain ints in C++); the
string names are the public API and are mapped here.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

try:  # numpy's bool is not a Python bool; numpy is optional
    from numpy import bool_ as np_bool
except ImportError:  # pragma: no cover
    np_bool = bool

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

NORMALIZE = {"zscore": 0, "center": 1, "rloo": 2, "none": 3}
STD = {"unbiased": 1, "population": 0}
WEIGHTING = {"scalarize": 0, "fixed": 1, "variance": 2}
NAN_POLICY = {"raise": 1, "ignore": 0}


def choice(name: str, value: object, table: dict[str, int]) -> int:
    """Map an option string to its integer code, or raise a ValueError listing the choices."""
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
    return table[value]


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_bool_tensor(
    name: str, x: object, shape: Sequence[int], device: torch.device, other: str = "rewards"
) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    check_same_device(name, x, device, other)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def check_same_device(name: str, x: torch.Tensor, device: torch.device, other: str = "rewards") -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {other} is on {device}; move them to one device")


def _real(name: str, value: object) -> float:
    """value as a Python float: an int, a float, or any other real number type (numpy scalars); not a bool."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool)):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_number(
    name: str, value: object, *, low: float | None = None, low_inclusive: bool = True, allow_inf: bool = False
) -> float:
    v = _real(name, value)
    # v != v (NaN) and v - v != 0 (NaN or infinite) rather than math.isnan / isinf: plain arithmetic also
    # traces when torch.compile passes a changing float (a global token count, a beta schedule) symbolically.
    if v != v or (v - v != 0 and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value!r}")
    return v


def check_int(name: str, value: object, *, low: int) -> int:
    """value as a Python int: an int or any other integral type (numpy integers); not a bool."""
    if isinstance(value, bool) or isinstance(value, np_bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """value as a Python bool: a bool or a numpy bool."""
    if not isinstance(value, (bool, np_bool)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)
