"""Parsing and validation of conv_einsum expressions.

Syntax: ``"bshw,oshw->bohw|hw"`` -- an einsum (one letter per mode, operands separated by
commas, an explicit ``->`` output) followed by ``|`` and the *convolved* modes. A convolved
mode appears in exactly two operands: the first of them (in expression order) is the
*signal*, the other the *kernel*; its output length is the usual convolution length
(:func:`convgap.ops.sizes.conv_length`). Like ``F.conv2d`` the operation is a
cross-correlation, so ``"bshw,oshw->bohw|hw"`` with padding 1 *is* ``F.conv2d(x, w,
padding=1)``.

Stride, padding and dilation are an int (every convolved mode) or a dict per convolved mode;
padding is also ``"same"`` (stride 1 only; the extra element of an even total goes right, as
in PyTorch) or a ``(left, right)`` pair per mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from ..errors import ConvgapError

__all__ = ["Expression", "ConvParams", "parse", "conv_params", "mode_sizes"]

IntOrDict = Union[int, Mapping[str, int]]
Padding = Union[int, str, Mapping[str, Union[int, str, Sequence[int]]]]


@dataclass(frozen=True)
class Expression:
    """A parsed expression: ``inputs`` (modes per operand), ``output`` and ``conv`` (the
    convolved modes, in the order written after ``|``)."""

    text: str
    inputs: tuple[str, ...]
    output: str
    conv: tuple[str, ...]

    @property
    def signal(self) -> dict[str, int]:
        """Convolved mode -> index of the operand holding the signal (the first holding it)."""
        return {m: next(i for i, ops in enumerate(self.inputs) if m in ops) for m in self.conv}

    @property
    def kernel(self) -> dict[str, int]:
        """Convolved mode -> index of the operand holding the kernel (the second holding it)."""
        return {m: [i for i, ops in enumerate(self.inputs) if m in ops][1] for m in self.conv}


@dataclass(frozen=True)
class ConvParams:
    """Per convolved mode: stride, (left, right) padding, dilation."""

    stride: tuple[tuple[str, int], ...]
    padding: tuple[tuple[str, tuple[int, int]], ...]
    dilation: tuple[tuple[str, int], ...]

    def of(self, mode: str) -> tuple[int, tuple[int, int], int]:
        return dict(self.stride)[mode], dict(self.padding)[mode], dict(self.dilation)[mode]


def _bad(expr: str, why: str) -> ConvgapError:
    return ConvgapError(f"einsum expression {expr!r}: {why}")


def parse(expr: str) -> Expression:
    """Parse and check ``expr`` (see the module docstring); raise ConvgapError naming the
    problem."""
    if not isinstance(expr, str):
        raise ConvgapError(f"an einsum expression is a string, got {type(expr).__name__}")
    text = "".join(expr.split())
    if text.count("|") > 1:
        raise _bad(expr, "more than one '|' (write the convolved modes once, after the output)")
    body, _, conv = text.partition("|")
    if "->" not in body:
        raise _bad(expr, "no '->': write the output modes explicitly, e.g. 'bshw,oshw->bohw|hw'")
    if body.count("->") > 1:
        raise _bad(expr, "more than one '->'")
    lhs, _, out = body.partition("->")
    inputs = tuple(lhs.split(","))
    if not lhs or any(not ops for ops in inputs):
        raise _bad(expr, "an operand has no modes (empty term between commas)")
    for part in (*inputs, out, conv):
        for ch in part:
            if not ch.isascii() or not ch.isalpha():
                raise _bad(expr, f"{ch!r} is not a mode: modes are single letters a-z, A-Z")
    for i, ops in enumerate(inputs):
        rep = sorted({m for m in ops if ops.count(m) > 1})
        if rep:
            raise _bad(expr, f"operand {i} ({ops!r}) repeats mode(s) {', '.join(rep)} "
                       "(diagonals are not supported)")
    for name, part in (("output", out), ("convolved modes", conv)):
        rep = sorted({m for m in part if part.count(m) > 1})
        if rep:
            raise _bad(expr, f"the {name} repeat(s) mode(s) {', '.join(rep)}")
    present = set("".join(inputs))
    missing = [m for m in out if m not in present]
    if missing:
        raise _bad(expr, f"output mode(s) {', '.join(missing)} appear in no operand")
    for m in conv:
        holders = [i for i, ops in enumerate(inputs) if m in ops]
        if len(holders) < 2:
            raise _bad(expr, f"convolved mode {m!r} appears in {len(holders)} operand(s); a "
                       "convolved mode needs a signal and a kernel operand")
        if len(holders) > 2:
            raise _bad(expr, f"convolved mode {m!r} appears in {len(holders)} operands; "
                       "convgap convolves a mode between exactly two operands (convolve the "
                       "kernels with each other in a separate call)")
    return Expression(text, inputs, out, tuple(conv))


def _per_mode(value, conv: Sequence[str], name: str, expr: str) -> dict:
    if isinstance(value, Mapping):
        extra = [m for m in value if m not in conv]
        if extra:
            raise _bad(expr, f"{name} given for mode(s) {', '.join(map(str, extra))}, which "
                       f"are not convolved (convolved: {', '.join(conv) or 'none'})")
        default = 0 if name == "padding" else 1
        return {m: value.get(m, default) for m in conv}
    return {m: value for m in conv}


def conv_params(e: Expression, stride: IntOrDict = 1, padding: Padding = 0,
                dilation: IntOrDict = 1, kernel_sizes: Mapping[str, int] | None = None
                ) -> ConvParams:
    """Normalise stride / padding / dilation to per-mode values; ``kernel_sizes`` (convolved
    mode -> kernel length) is needed to resolve ``"same"`` padding."""
    strides = _per_mode(stride, e.conv, "stride", e.text)
    dilations = _per_mode(dilation, e.conv, "dilation", e.text)
    pads = _per_mode(padding, e.conv, "padding", e.text)
    for name, vals, low in (("stride", strides, 1), ("dilation", dilations, 1)):
        for m, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise _bad(e.text, f"{name} for mode {m!r} must be an int >= {low}, got {v!r}")
    out_pads = {}
    for m, p in pads.items():
        if p == "same":
            if strides[m] != 1:
                raise _bad(e.text, f"padding 'same' needs stride 1 (mode {m!r} has stride "
                           f"{strides[m]})")
            total = dilations[m] * ((kernel_sizes or {}).get(m, 1) - 1)
            out_pads[m] = (total // 2, total - total // 2)
        elif p == "valid":
            out_pads[m] = (0, 0)
        elif isinstance(p, int) and not isinstance(p, bool) and p >= 0:
            out_pads[m] = (p, p)
        elif (isinstance(p, (tuple, list)) and len(p) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in p)):
            out_pads[m] = (int(p[0]), int(p[1]))
        else:
            raise _bad(e.text, f"padding for mode {m!r} must be an int >= 0, (left, right), "
                       f"'same' or 'valid'; got {p!r}")
    return ConvParams(tuple(strides.items()), tuple(out_pads.items()),
                      tuple(dilations.items()))


def mode_sizes(e: Expression, shapes: Sequence[Sequence[int]]) -> dict[str, int]:
    """Size of every non-convolved mode, checked across operands (convolved modes have a
    signal and a kernel length each; see :func:`conv_sizes`)."""
    if len(shapes) != len(e.inputs):
        raise _bad(e.text, f"it has {len(e.inputs)} operand(s) but {len(shapes)} were given")
    sizes: dict[str, int] = {}
    where: dict[str, int] = {}
    for i, (ops, shape) in enumerate(zip(e.inputs, shapes)):
        if len(shape) != len(ops):
            raise _bad(e.text, f"operand {i} ({ops!r}) has {len(ops)} modes but a tensor of "
                       f"{len(shape)} dimensions {tuple(shape)} was given")
        for m, n in zip(ops, shape):
            if m in e.conv:
                continue
            if m in sizes and sizes[m] != n:
                raise _bad(e.text, f"mode {m!r} has size {sizes[m]} in operand {where[m]} but "
                           f"{n} in operand {i}")
            sizes.setdefault(m, int(n))
            where.setdefault(m, i)
    return sizes


def conv_sizes(e: Expression, shapes: Sequence[Sequence[int]]) -> dict[str, tuple[int, int]]:
    """Convolved mode -> (signal length, kernel length)."""
    out = {}
    for m in e.conv:
        s, k = e.signal[m], e.kernel[m]
        out[m] = (int(shapes[s][e.inputs[s].index(m)]), int(shapes[k][e.inputs[k].index(m)]))
    return out
