"""The fused kernels' arguments by name: ctypes mirrors of args.h's structs (one per kernel:
its weights, then its geometry), and the check, made when a kernel is loaded, that each
mirror has the C struct's size and its fields' names, order, offsets and sizes.

A wrapper builds a kernel's struct once per bound call, by keyword (:meth:`Args.__init__`
refuses an unknown name and insists on every int field, so a field added in args.h and
here but not set by a wrapper is an error, not a silent zero), and passes it by pointer
(the forward function's first argtype is ``POINTER(<struct>)``: ctypes takes the struct
itself by reference, the cheapest way it converts a pointer argument)."""

from __future__ import annotations

import ctypes

__all__ = ["Args", "PdpArgs", "PcpArgs", "PlanarArgs", "TilesArgs", "StemArgs",
           "ArgsLayoutError", "check_layout", "c_layout", "py_layout"]

_PTR, _INT = ctypes.c_void_p, ctypes.c_int


class ArgsLayoutError(RuntimeError):
    """A kernel's ctypes Structure (args.py) does not match its C struct (args.h)."""


class Args(ctypes.Structure):
    """Base of the mirrors: weights are ``c_void_p`` fields (an address, or None for
    NULL), the geometry ``c_int`` ones. Fields are set by name only: an unknown name raises
    (ctypes would silently keep it as a plain attribute)."""

    _fields_: list = []

    def __init__(self, **fields) -> None:
        names = {name for name, _ in type(self)._fields_}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        missing = [name for name, kind in type(self)._fields_
                   if kind is _INT and name not in fields]
        if missing:
            raise TypeError(f"{type(self).__name__} needs every int field; missing "
                            f"{', '.join(missing)}")
        super().__init__(**fields)

    def __setattr__(self, name: str, value) -> None:
        if not any(name == field for field, _ in type(self)._fields_):
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        super().__setattr__(name, value)

    def copy(self, **fields) -> "Args":
        """A copy with ``fields`` (by name) replaced."""
        out = type(self).from_buffer_copy(self)
        for name, value in fields.items():
            setattr(out, name, value)
        return out


def _fields(weights: str, geometry: str) -> list:
    return [(n, _PTR) for n in weights.split()] + [(n, _INT) for n in geometry.split()]


class PdpArgs(Args):
    """pdp.c's PdpArgs (see args.h for each field)."""
    _fields_ = _fields("a bias1 d bias2 b bias map wr br wu bu",
                       "n h w c r kh kw sh sw ph pw dh dw o oh ow th nchw act1 act2 residual "
                       "se se_act gate")


class PcpArgs(Args):
    """pcp.c's PcpArgs (see args.h for each field)."""
    _fields_ = _fields("a k1 k2 b bias",
                       "n h w c r1 r2 r3 kh1 kw1 sh1 sw1 ph1 pw1 dh1 dw1 kw2 sw2 pw2 dw2 "
                       "o oh ow th z nchw")


class PlanarArgs(Args):
    """planar.c's PlanarArgs (see args.h for each field)."""
    _fields_ = _fields("a k1 k2 b bias",
                       "n h w c r1 r2 r3 kh1 kw1 sh1 ph1 pw1 dh1 dw1 kw2 pw2 dw2 o oh ow th z "
                       "depthwise nhwc wino tail pairs")


class TilesArgs(Args):
    """tiles.c's TilesArgs (see args.h for each field)."""
    _fields_ = _fields("a bias1 k bias2 b bias",
                       "n h w c xh xw k1 st1 r ks st depthwise o oh ow s group act1 act2 xnchw "
                       "ynchw")


class StemArgs(Args):
    """stem.c's StemArgs (see args.h for each field)."""
    _fields_ = _fields("a bias1 d bias2 b bias wr br wu bu",
                       "n h w c xsn xsc xsh xsw r k1 st1 k o oh ow th act1 act2 se se_act "
                       "gate")


def c_layout(lib: ctypes.CDLL) -> tuple[int, list[tuple[str, int, int]]]:
    """The C struct of the kernel ``lib`` as args.h lays it out: (sizeof, [(name, offset,
    size)] in order), from its ``args_names`` and ``args_layout`` exports."""
    names_fn, layout_fn = lib.args_names, lib.args_layout
    names_fn.argtypes, names_fn.restype = [], ctypes.c_char_p
    layout_fn.argtypes = [ctypes.POINTER(ctypes.c_long), ctypes.c_long]
    layout_fn.restype = ctypes.c_long
    names = names_fn().decode().split()
    out = (ctypes.c_long * (1 + 2 * len(names)))()
    count = layout_fn(out, len(out))
    if count != len(names):
        raise ArgsLayoutError(f"args_layout reports {count} fields, args_names {len(names)}")
    return out[0], [(n, out[1 + 2 * i], out[2 + 2 * i]) for i, n in enumerate(names)]


def py_layout(struct: type[ctypes.Structure]) -> tuple[int, list[tuple[str, int, int]]]:
    """(sizeof, [(name, offset, size)] in order) of a ctypes Structure."""
    return ctypes.sizeof(struct), [(name, getattr(struct, name).offset,
                                    getattr(struct, name).size)
                                   for name, _ in struct._fields_]


def check_layout(lib: ctypes.CDLL, struct: type[ctypes.Structure], kernel: str = "") -> None:
    """Raise :class:`ArgsLayoutError` unless ``struct`` has the size, field names, order,
    offsets and sizes of the C struct the loaded kernel ``lib`` reads (its ``args_layout``);
    the message names the first field that differs."""
    c_size, c_fields = c_layout(lib)
    py_size, py_fields = py_layout(struct)
    if c_fields == py_fields and c_size == py_size:
        return
    where = f"kernel {kernel!r}: " if kernel else ""
    problem = f"sizeof {c_size} in C, {py_size} in ctypes"
    for i in range(max(len(c_fields), len(py_fields))):
        c = c_fields[i] if i < len(c_fields) else None
        p = py_fields[i] if i < len(py_fields) else None
        if c != p:
            def show(f):
                return "nothing" if f is None else f"{f[0]!r} at byte {f[1]} ({f[2]} bytes)"
            problem = f"field {i}: C has {show(c)}, ctypes {show(p)}"
            break
    raise ArgsLayoutError(
        f"{where}{struct.__name__} (kernels/cpu/args.py) does not match the C struct in "
        f"kernels/cpu/args.h: {problem}. Edit both together (same names, order and types).")
