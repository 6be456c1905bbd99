"""The arguments of an op, declared once.

An op's spec is a dataclass (made by the @spec decorator; read-only by convention) whose fields are its
arguments after the primary input (the log-probs, the logits, the rewards): tensors and options, each declared
with `tensor(...)` or `option(...)`: type, default, the checks of a valid value, a line of documentation.
Everything else comes from it:

- validation: `Spec.validate(context, **kwargs)` checks every argument once (types, ranges, choices, shapes,
  devices) and returns the canonical instance; a bad value raises a ValueError / TypeError naming it;
- the torch.library schema of the registered op (`Spec.schema()`) and the flat positional form the op takes
  (`spec.flat()`, `Spec.unflat(args)`);
- the reference's keyword arguments (`spec.kwargs()`);
- the keyword arguments of a Triton kernel (`spec.kernel_kwargs(kernel)`: every spec field the kernel names
  as a parameter, options as the integers of moo_kernels._codes, a tensor as its pointer plus a `<name>_strides`
  tuple when the kernel takes one); the C++ kernels take the spec object itself and read its fields by name
  (csrc/args.h);
- the public function's signature and the options part of its docstring (`with_spec`).

Adding an option to an op is then a field of its spec, its use in the reference and in the kernels.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from moo_kernels import _options as O

# ---- declarations ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arg:
    """How one argument is checked and passed on. kind: "tensor", "float", "int", "bool" or "str"."""

    kind: str
    doc: str
    optional: bool = False  # None is a valid value (then the argument is absent)
    low: float | None = None  # numbers: the smallest valid value ...
    low_inclusive: bool = True  # ... itself valid or not
    below: float | None = None  # numbers: values must be < this
    choices: dict[str, int] | None = None  # str: the valid values and the integers the kernels receive
    dtypes: tuple[torch.dtype, ...] = ()  # tensors: the accepted dtypes
    shapes: tuple[str, ...] = ()  # tensors: the accepted shapes, as strings of dimension names ("BT", "B")
    kernel: bool = True  # passed to the kernels (False: consumed by the Python side)


def option(default: Any, doc: str, kind: str, **checks) -> Any:
    """A field of a spec holding an option (a number, bool or string)."""
    return dataclasses.field(default=default, metadata={"arg": Arg(kind=kind, doc=doc, **checks)})


def tensor(doc: str, *, dtypes: tuple[torch.dtype, ...], shapes: tuple[str, ...], optional: bool = True) -> Any:
    """A field of a spec holding a tensor (None when optional and absent)."""
    arg = Arg(kind="tensor", doc=doc, optional=optional, dtypes=dtypes, shapes=shapes)
    return dataclasses.field(default=None, metadata={"arg": arg})


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ---- the spec base class ---------------------------------------------------------------------------------------


class Context(NamedTuple):
    """What validation checks tensors against: named dimension sizes, the device, and the primary input's name."""

    dims: dict[str, int]
    device: torch.device
    primary: str


def spec(cls):
    """Make a Spec subclass a dataclass and record its fields once (traced code cannot list a class's dataclass
    fields). Not frozen: a frozen dataclass builds itself through object.__setattr__, field by field, which costs
    microseconds on every call of an op; treat a spec as read-only all the same."""
    cls = dataclasses.dataclass(eq=False)(cls)
    cls._fields = tuple((f.name, f.metadata["arg"], f.default) for f in dataclasses.fields(cls))
    cls._args = tuple((name, arg) for name, arg, _ in cls._fields)
    cls._arg = dict(cls._args)
    cls._defaults = {name: default for name, _, default in cls._fields}
    cls._required = tuple(name for name, arg, default in cls._fields if default is None and not arg.optional)
    cls._options = tuple((name, arg.choices) for name, arg, _ in cls._fields if arg.kind != "tensor" and arg.kernel)
    return cls


class Spec:
    """Base class of the op specs (decorated with @spec; fields declared with tensor / option)."""

    _fields: tuple = ()  # (name, Arg, default) of every field, in order
    _arg: dict = {}  # name -> Arg
    _defaults: dict = {}  # name -> default
    _required: tuple = ()  # the fields without a default
    _args: tuple = ()  # (name, Arg)
    _options: tuple = ()  # (name, choices or None) of the options the kernels receive

    @classmethod
    def args(cls) -> tuple[tuple[str, Arg], ...]:
        return cls._args

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(name for name, _, _ in cls._fields)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dict(cls._defaults)

    # -- validation

    @classmethod
    def validate(cls, context: Context, **kwargs: Any):
        """The canonical spec of these arguments (missing ones take their defaults), or a ValueError / TypeError
        naming the first bad one (in the order given); then the spec's own cross-argument checks (`check`)."""
        return cls.make(cls.values(context, kwargs)).check(context)

    @classmethod
    def values(cls, context: Context, kwargs: dict[str, Any], checked: dict[str, Any] | None = None) -> dict:
        """Every field's value: kwargs checked one by one, then checked (values known to be valid, taken as they
        are), the defaults for the rest."""
        values = dict(cls._defaults)  # a default is valid by declaration (a required argument has none)
        args = cls._arg
        for name, value in kwargs.items():
            arg = args.get(name)
            if arg is None:
                raise TypeError(f"unexpected keyword argument {name!r} (valid: {', '.join(sorted(args))})")
            values[name] = None if value is None and arg.optional else _check(name, arg, value, context)
        if checked:
            values.update(checked)
        for name in cls._required:
            if values[name] is None:
                raise TypeError(f"{name} must be given")
        return values

    @classmethod
    def make(cls, values: dict[str, Any]):
        """The spec holding these values (every field's), without the dataclass __init__ in eager mode: that
        __init__ only sets the fields, and its call costs more than the rest of a small op's validation."""
        if torch.compiler.is_compiling():
            return cls(**values)
        obj = object.__new__(cls)
        obj.__dict__.update(values)
        return obj

    def check(self, context: Context):
        """Checks that involve several arguments; returns the (possibly completed) spec. Override as needed."""
        return self

    # -- the registered op

    @classmethod
    def schema(cls) -> str:
        """The arguments in torch.library schema syntax, in field order."""
        parts = []
        for name, arg in cls.args():
            kind = {"tensor": "Tensor", "float": "float", "int": "SymInt", "bool": "bool", "str": "str"}[arg.kind]
            parts.append(f"{kind}{'?' if arg.optional else ''} {name}")
        return ", ".join(parts)

    def flat(self) -> tuple:
        return tuple(getattr(self, name) for name, _, _ in self._fields)

    @classmethod
    def unflat(cls, args) -> Spec:
        """The spec from the flat arguments of the registered op (already validated)."""
        return cls(*args)

    @classmethod
    def count(cls) -> int:
        return len(cls._fields)

    # -- the implementations

    def kwargs(self) -> dict[str, Any]:
        """Every argument by name (the reference takes them so)."""
        return {name: getattr(self, name) for name, _, _ in self._fields}

    def codes(self) -> dict[str, Any]:
        """The options the kernels receive: strings as their integer codes, the rest as they are."""
        out = {}
        for name, choices in self._options:
            value = getattr(self, name)
            out[name] = choices[value] if choices is not None and value is not None else value
        return out

    def kernel_kwargs(self, kernel, **extra: Any) -> dict[str, Any]:
        """Keyword arguments of a Triton kernel: each parameter the kernel names that is a field of the spec
        (options as codes; a tensor as itself, a bool tensor viewed as uint8, None when absent; its
        `<name>_strides` parameter as the strides of its first two dimensions, a [B] tensor with a 0 token
        stride), then extra (which may override)."""
        params = set(kernel.arg_names)
        out: dict[str, Any] = {}
        codes = self.codes()
        for name, arg in self.args():
            if arg.kind == "tensor":
                x = getattr(self, name)
                if name in params:
                    out[name] = x.view(torch.uint8) if x is not None and x.dtype == torch.bool else x
                if f"{name}_strides" in params:
                    out[f"{name}_strides"] = strides2(x)
            elif name in params:
                value = codes[name]
                if value is None and name in typed_floats(kernel):
                    value = ABSENT_FLOAT  # a typed float parameter cannot take None on a GPU
                out[name] = value
        out.update(extra)
        return out


# An absent float option passed to a float parameter with a type annotation (x: tl.float64, for exact float64
# options): Triton gives such a parameter its annotated type whatever the value, and cannot pass None as a float on a
# GPU (the interpreter would), so an absent option arrives as NaN, which no option may hold (validation refuses it),
# and the kernel tests x == x.
ABSENT_FLOAT = float("nan")


def cached_tensor(cache: dict, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """cache[key], made when absent and then stored (outside traced code, which writes no state: it would break the
    graph; the cache is emptied past 64 entries): the tensors an op builds from option values (weights, thresholds),
    made and checked once per distinct value and device."""
    value = cache.get(key)
    if value is None:
        value = make()
        if not torch.compiler.is_compiling():
            if len(cache) > 64:
                cache.clear()
            cache[key] = value
    return value


def typed_floats(kernel) -> frozenset[str]:
    """The parameters of a Triton kernel declared with a float type annotation (x: tl.float64)."""
    found = getattr(kernel, "_moo_typed_floats", None)
    if found is None:  # the Python function's annotations: a JITFunction and the interpreter's wrapper both have it
        params = inspect.signature(kernel.fn).parameters.values()
        found = frozenset(p.name for p in params if str(p.annotation).startswith(("fp", "bf")))
        kernel._moo_typed_floats = found
    return found


def strides2(x: torch.Tensor | None) -> tuple[int, int]:
    """(stride of dimension 0, stride of dimension 1) of a [B] or [B, T] tensor (0 for a [B] tensor's second)."""
    if x is None:
        return (0, 0)
    return (x.stride(0), x.stride(1) if x.dim() > 1 else 0)


# ---- checks --------------------------------------------------------------------------------------------------------


def _check(name: str, arg: Arg, value: Any, context: Context) -> Any:
    if value is None:
        if arg.optional:
            return None
        raise TypeError(f"{name} must be given, got None")
    if type(value) is float and arg.kind == "float" and value == value and value - value == 0:  # the common case
        if (arg.low is None or value > arg.low or (value == arg.low and arg.low_inclusive)) and (
            arg.below is None or value < arg.below
        ):
            return value
    kind = arg.kind
    if kind == "tensor":
        return _check_tensor(name, arg, value, context)
    if type(value) is int and kind == "int" and (arg.low is None or value >= arg.low) and arg.below is None:
        return value
    if type(value) is bool and kind == "bool":
        return value
    if type(value) is str and kind == "str" and arg.choices is not None and value in arg.choices:
        return value
    if kind == "str":
        return _choice(name, value, arg.choices) if arg.choices is not None else value
    if kind == "bool":
        return O.check_bool(name, value)
    if kind == "int":
        value = O.check_int(name, value, low=int(arg.low) if arg.low is not None else -(2**62))
    else:
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a Python number, got a tensor")
        value = O.check_number(name, value, low=arg.low, low_inclusive=arg.low_inclusive)
    if arg.below is not None and not value < arg.below:
        raise ValueError(f"{name} must be < {arg.below}, got {value}")
    return value


def _choice(name: str, value: Any, choices: dict[str, int]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def _dtype_text(dtypes: tuple[torch.dtype, ...]) -> str:
    """ "float16, bfloat16, float32 or float64", "bool or float", "int64 or int32", ..."""
    names = [str(d).replace("torch.", "") for d in dtypes if d not in FLOATS]
    floats = [str(d).replace("torch.", "") for d in dtypes if d in FLOATS]
    if names and len(floats) == len(FLOATS):
        names.append("float")
    elif floats:
        names += floats
    if names == ["bool"]:
        return "a bool tensor"
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1]


def _check_tensor(name: str, arg: Arg, x: Any, context: Context) -> torch.Tensor:
    O.check_tensor(name, x)
    if x.dtype not in arg.dtypes:
        raise TypeError(f"{name} must be {_dtype_text(arg.dtypes)}, got {x.dtype}")
    if x.device != context.device:
        O.check_same_device(name, x, context.device, other=context.primary)
    shape, dims = x.shape, context.dims
    for s in arg.shapes:
        if len(shape) == len(s):
            for size, d in zip(shape, s, strict=True):  # a loop, not all(generator): this runs on every call of an op
                if size != dims[d]:
                    break
            else:
                return x
    want = " or ".join(str(tuple(dims[d] for d in s)) for s in arg.shapes)
    raise ValueError(f"{name} must have shape {want}, got {tuple(shape)}")


# ---- public functions -------------------------------------------------------------------------------------------


def with_spec(*specs: type[Spec], positional: tuple[str, ...] = ()) -> Callable:
    """Give a public function `f(primary, *positional, **options)` the signature of its specs (every field that
    is not positional, as a keyword with its default, in the specs' order) and fill the `{options}` placeholder
    of its docstring with the fields' documentation. The function itself takes **options and validates them with
    the specs."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        explicit = {p.name for p in params}
        for one in specs:
            hints = typing.get_type_hints(one)
            defaults = one.defaults()
            for name, _arg in one.args():
                if name in explicit or name in positional:
                    continue
                params.append(
                    inspect.Parameter(
                        name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name], annotation=hints.get(name)
                    )
                )
        fn.__signature__ = sig.replace(parameters=params)
        if fn.__doc__ and "{options}" in fn.__doc__:
            skip = explicit | set(positional)
            text = "\n".join(describe(one, skip) for one in specs).lstrip()
            fn.__doc__ = fn.__doc__.replace("{options}", text)
        return fn

    return wrap


def describe(spec: type[Spec], skip: set[str] = frozenset(), indent: str = "        ") -> str:
    """The documentation lines of a spec's fields (name: doc, wrapped), for a docstring."""
    import textwrap

    lines = []
    for name, arg in spec.args():
        if name not in skip:
            lines += textwrap.wrap(f"{name}: {arg.doc}", 112, initial_indent=indent, subsequent_indent=indent + "    ")
    return "\n".join(lines)
