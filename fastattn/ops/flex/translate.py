"""Translation of FlexAttention's plain-torch mods into ``@triton.jit`` functions.

A ``score_mod(score, b, h, q_idx, kv_idx)`` and a ``mask_mod(b, h, q_idx, kv_idx)`` are traced
once with ``torch.fx`` (the arguments become proxies that record every operation) and the
recorded graph is written out as Triton source: one module holding

* ``score_mod(score, b, h, q_idx, kv_idx, CAP, DIMS)``: the modified score;
* ``score_grad(score, b, h, q_idx, kv_idx, CAP, DIMS, grad)``: ``grad * d score_mod / d score``,
  by reverse-mode differentiation of the same graph (what the backward kernels need);
* ``mask_mod(b, h, q_idx, kv_idx, CAP, DIMS)``: True where the pair is kept.

In the kernels ``score`` is an fp32 (BLOCK_M, BLOCK_N) tile, ``b`` and ``h`` int64 scalars,
``q_idx`` (BLOCK_M, 1) and ``kv_idx`` (1, BLOCK_N) int32 positions. Tensors the mods capture
(closure variables, module attributes) are read in place: ``CAP`` is the tuple of them and
``DIMS`` a flat tuple of their sizes and strides (``Translation.dims``), so new values or new
lengths need no new compile. Indexing follows torch: negative indices count from the end; an
index out of range reads 0 (it can only happen at positions that are masked or past the
sequence, which the kernels never keep).

The module is written to a cache directory (``triton.jit`` reads its functions' source) and
imported once per distinct source, so a training loop that passes the same mods compiles its
kernels once. What cannot be translated raises ValueError naming the construct.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import operator
import os
import sys
import tempfile
import types
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
import torch.fx as fx
from torch import Tensor

SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")

_TL_DTYPES = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64", torch.int32: "tl.int32", torch.int64: "tl.int64", torch.int16: "tl.int16",
    torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}
_BINARY = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    operator.and_: "&", operator.or_: "|", operator.xor: "^",
    operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=", operator.gt: ">", operator.ge: ">=",
    torch.add: "+", torch.sub: "-", torch.mul: "*", torch.div: "/", torch.true_divide: "/",
    torch.eq: "==", torch.ne: "!=", torch.lt: "<", torch.le: "<=", torch.gt: ">", torch.ge: ">=",
    torch.logical_and: "&", torch.logical_or: "|", torch.bitwise_and: "&", torch.bitwise_or: "|",
}
_BINARY_METHODS = {
    "add": "+", "sub": "-", "mul": "*", "div": "/", "__add__": "+", "__sub__": "-", "__mul__": "*",
    "__truediv__": "/", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
    "logical_and": "&", "logical_or": "|", "__and__": "&", "__or__": "|",
}
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}
# Elementwise float functions: (Triton expression of x and y = the result, derivative dy/dx).
_UNARY = {
    "exp": ("tl.exp({x})", "{y}"),
    "exp2": ("tl.exp2({x})", "{y} * 0.6931471805599453"),  # d 2^x / dx = 2^x ln 2
    "log": ("tl.log({x})", "1.0 / {x}"),
    "log2": ("tl.log2({x})", "1.4426950408889634 / {x}"),
    "sqrt": ("tl.sqrt({x})", "0.5 / {y}"),
    "rsqrt": ("tl.rsqrt({x})", "-0.5 * {y} / {x}"),
    "sigmoid": ("tl.sigmoid({x})", "{y} * (1.0 - {y})"),
    "tanh": ("tanh({x})", "1.0 - {y} * {y}"),
    "sin": ("tl.sin({x})", "tl.cos({x})"),
    "cos": ("tl.cos({x})", "-tl.sin({x})"),
}
_INT_UNARY = {"floor": "tl.floor({x})", "ceil": "tl.ceil({x})", "sign": "sign({x})"}
_FUNCTIONS = {getattr(torch, name): name for name in (*_UNARY, *_INT_UNARY)}
_FUNCTIONS.update({torch.abs: "abs", torch.neg: "neg", torch.logical_not: "logical_not", torch.where: "where",
                   torch.minimum: "minimum", torch.maximum: "maximum", torch.clamp: "clamp", torch.clip: "clamp",
                   torch.floor_divide: "floor_divide", torch.remainder: "remainder", torch.fmod: "fmod",
                   torch.pow: "pow", torch.square: "square", operator.neg: "neg", operator.pos: "pos",
                   operator.invert: "invert", operator.floordiv: "floor_divide", operator.mod: "remainder",
                   operator.pow: "pow", operator.abs: "abs", torch.nn.functional.sigmoid: "sigmoid",
                   torch.special.expit: "sigmoid"})
_METHODS = {"to", "abs", "neg", "logical_not", "clamp", "clip", "minimum", "maximum", "remainder", "floor_divide",
            "pow", "square", "__neg__", "__invert__", "bitwise_not", "__floordiv__", "__mod__", "__pow__",
            "new_ones", "new_zeros", "__rsub__", "__radd__", "__rmul__", "__rtruediv__"}
# One-operand names `_unary` takes besides _UNARY and _INT_UNARY.
_ONE_OPERAND = {"neg", "__neg__", "pos", "logical_not", "invert", "__invert__", "bitwise_not", "abs", "square"}
_REFLECTED = {"__rsub__": "-", "__radd__": "+", "__rmul__": "*", "__rtruediv__": "/"}
_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
          "int": torch.int32, "long": torch.int64, "bool": torch.bool}


class Translation(NamedTuple):
    """The Triton side of a pair of mods.

    ``score_mod``, ``score_grad``, ``mask_mod``: the ``@triton.jit`` functions (module
    docstring); ``captures``: the captured tensors in ``CAP`` order (as the mods hold them, so
    that gradients reach them); ``dims``: ``DIMS``, each capture's sizes then strides, in
    order; ``source``: the generated module's text."""

    score_mod: Callable
    score_grad: Callable
    mask_mod: Callable
    captures: tuple
    dims: tuple
    source: str


class _Value(NamedTuple):
    """One node's value in the generated code: an expression (a variable name or a literal),
    its kind ("float", "int" or "bool"), and whether it depends on the score."""

    expr: str
    kind: str
    on_score: bool


def _literal(x) -> _Value:
    if isinstance(x, bool):
        return _Value(repr(x), "bool", False)
    if isinstance(x, int):
        return _Value(repr(x), "int", False)
    if isinstance(x, float):
        text = repr(x) if math.isfinite(x) else f'float("{x}")'
        return _Value(text, "float", False)
    raise ValueError(f"flex_attention: cannot translate the constant {x!r} ({type(x).__name__}) in a mod; "
                     f"use Python ints, floats, bools or captured tensors")


def _promote(*kinds: str) -> str:
    return "float" if "float" in kinds else "int" if "int" in kinds else "bool"


class _Writer:
    """Turns one traced graph into the lines of a Triton function body (``forward``) and,
    for a score_mod, the lines of its reverse-mode derivative (``backward``)."""

    def __init__(self, graph: fx.GraphModule, what: str, captures: dict, cap_dims: list):
        self.gm, self.what = graph, what
        self.captures, self.cap_dims = captures, cap_dims  # id(tensor) -> index; [(shape, strides)]
        self.values: dict = {}
        self.lines: list = []
        self.grad_rules: list = []  # (node name, [(input value, derivative expression)])
        self.count = 0

    def _fail(self, node: fx.Node, why: str):
        raise ValueError(f"flex_attention: cannot translate {self.what}: {why} (at `{node.format_node()}`); "
                         f"a mod may use arithmetic, comparisons, &, |, ~, torch.where, abs, exp, log, tanh, "
                         f"sigmoid, sqrt, minimum, maximum, clamp, integer division, and indexing of captured "
                         f"tensors by positions")

    def arg(self, a, node) -> _Value:
        if isinstance(a, fx.Node):
            value = self.values.get(a.name)
            if value is None:
                self._fail(node, f"`{a.name}` is a tensor used whole, not indexed by positions")
            return value
        if isinstance(a, (bool, int, float)):
            return _literal(a)
        self._fail(node, f"argument {a!r} of type {type(a).__name__}")

    def emit(self, expr: str, kind: str, on_score: bool) -> _Value:
        name = f"v{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {expr}")
        return _Value(name, kind, on_score)

    def as_float(self, v: _Value) -> str:
        """v's expression as fp32 (ints divide as floats, as in torch)."""
        if v.kind == "float":
            return v.expr
        if v.expr in ("True", "False") or v.expr.lstrip("-").isdigit():
            return repr(float(v.expr == "True" if v.expr in ("True", "False") else int(v.expr)))
        return f"({v.expr}).to(tl.float32)"

    def run(self, inputs: list) -> _Value:
        """Writes every node; returns the output's value."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.values[node.name] = inputs[len(self.values)]
            elif node.op == "get_attr":
                self.values[node.name] = self._capture(node)
            elif node.op == "output":
                out = node.args[0]
                if isinstance(out, (tuple, list)):
                    self._fail(node, "it returns several values")
                return self.arg(out, node)
            else:
                name = self._name(node)
                self.values[node.name] = self._op(node, name)
        raise AssertionError("a traced graph has an output node")

    def _capture(self, node) -> _Value:
        t = getattr(self.gm, node.target)
        if not isinstance(t, Tensor):
            self._fail(node, f"captured {type(t).__name__}")
        key = id(t)
        if key not in self.captures:
            self.captures[key] = (len(self.captures), t)
            self.cap_dims.append(None)
        return _Value(f"@cap{self.captures[key][0]}", "capture", False)

    def _name(self, node) -> str:
        if node.op == "call_function":
            if node.target in _BINARY:
                return _BINARY[node.target]
            if node.target in _FUNCTIONS:
                return _FUNCTIONS[node.target]
            if node.target is operator.getitem:
                return "getitem"
            self._fail(node, f"the function {getattr(node.target, '__name__', node.target)}")
        if node.op == "call_method":
            m = node.target
            if m in _BINARY_METHODS:
                return _BINARY_METHODS[m]
            if m == "__getitem__":
                return "getitem"
            if m in _CASTS or m in _UNARY or m in _INT_UNARY or m in _METHODS:
                return m
            self._fail(node, f"the method .{m}()")
        self._fail(node, f"a node of kind {node.op}")

    def _op(self, node, name) -> _Value:
        args, kw = node.args, dict(node.kwargs)
        if name == "getitem":
            return self._index(node, args[0], args[1])
        if name in _REFLECTED:
            name, args = _REFLECTED[name], (args[1], args[0])
        if name == "/" and kw.get("rounding_mode") is not None:
            mode = kw.pop("rounding_mode")
            if mode not in ("floor", "trunc"):
                self._fail(node, f"rounding_mode={mode!r}")
            name = "floor_divide" if mode == "floor" else "trunc_divide"
        kw.pop("rounding_mode", None)
        if name in ("+", "-") and "alpha" in kw:
            self._fail(node, "alpha=")
        if name in _COMPARE or name in ("+", "-", "*", "/", "&", "|", "^"):
            a, b = (self.arg(x, node) for x in args[:2])
            return self._binary(node, name, a, b)
        if name in _CASTS or name == "to":
            return self._cast(node, name, args, kw)
        if name in ("new_ones", "new_zeros"):
            dtype = kw.get("dtype")
            kind = "bool" if dtype == torch.bool else "float" if dtype is not None and dtype.is_floating_point \
                else self.arg(args[0], node).kind
            one = {"bool": "True", "int": "1", "float": "1.0"}[kind] if name == "new_ones" else \
                {"bool": "False", "int": "0", "float": "0.0"}[kind]
            return _Value(one, kind, False)
        x = self.arg(args[0], node)
        if kw and name not in ("clamp", "clip"):
            self._fail(node, f"keyword arguments {sorted(kw)}")
        if name in _UNARY or name in _INT_UNARY or name in _ONE_OPERAND:
            return self._unary(node, name, x)
        return self._operands(node, name, x, args, kw)

    def _unary(self, node, name, x: _Value) -> _Value:
        """The elementwise functions of one traced value (exp, neg, ~, abs, ...) and their derivatives."""
        if name in _UNARY:
            expr, deriv = _UNARY[name]
            y = self.emit(expr.format(x=self.as_float(x)), "float", x.on_score)
            self._rule(y, [(x, deriv.format(x=self.as_float(x), y=y.expr))])
            return y
        if name in _INT_UNARY:
            return self.emit(_INT_UNARY[name].format(x=self.as_float(x)), "float", x.on_score)
        if name in ("neg", "__neg__"):
            y = self.emit(f"-{x.expr}", x.kind, x.on_score)
            self._rule(y, [(x, "-1.0")])
            return y
        if name == "pos":
            return x
        if name in ("logical_not", "invert", "__invert__", "bitwise_not"):
            if x.kind != "bool":
                self._fail(node, "~ of a non-bool value")
            return self.emit(f"{x.expr} == 0", "bool", x.on_score)
        if name == "abs":
            y = self.emit(f"tl.abs({x.expr})", x.kind, x.on_score)
            # torch's derivative of |x| at 0 is 0
            self._rule(y, [(x, f"tl.where({x.expr} > 0, 1.0, tl.where({x.expr} < 0, -1.0, 0.0))")])
            return y
        if name == "square":
            y = self.emit(f"{x.expr} * {x.expr}", x.kind, x.on_score)
            self._rule(y, [(x, f"2.0 * {x.expr}")])
            return y
        self._fail(node, f"`{name}`")

    def _operands(self, node, name, x: _Value, args, kw) -> _Value:
        """The functions of x and further operands (where, minimum/maximum, clamp, integer division,
        powers) and their derivatives; anything else is refused."""
        if name == "where":
            c, a, b = x, self.arg(args[1], node), self.arg(args[2], node)
            y = self.emit(f"tl.where({c.expr}, {a.expr}, {b.expr})", _promote(a.kind, b.kind),
                          c.on_score or a.on_score or b.on_score)
            self._rule(y, [(a, f"tl.where({c.expr}, 1.0, 0.0)"), (b, f"tl.where({c.expr}, 0.0, 1.0)")])
            return y
        if name in ("minimum", "maximum"):
            a, b = x, self.arg(args[1], node)
            fn, less = ("tl.minimum", "<") if name == "minimum" else ("tl.maximum", ">")
            kind = _promote(a.kind, b.kind)
            nan = ", propagate_nan=tl.PropagateNan.ALL" if kind == "float" else ""
            y = self.emit(f"{fn}({a.expr}, {b.expr}{nan})", kind, a.on_score or b.on_score)
            # torch splits the gradient evenly between equal inputs
            self._rule(y, [(a, f"tl.where({a.expr} {less} {b.expr}, 1.0, tl.where({a.expr} == {b.expr}, 0.5, 0.0))"),
                           (b, f"tl.where({b.expr} {less} {a.expr}, 1.0, tl.where({a.expr} == {b.expr}, 0.5, 0.0))")])
            return y
        if name in ("clamp", "clip"):
            lo = kw.get("min", args[1] if len(args) > 1 else None)
            hi = kw.get("max", args[2] if len(args) > 2 else None)
            expr, keep = x.expr, []
            if lo is not None:
                lo = self.arg(lo, node)
                expr, keep = f"tl.maximum({expr}, {lo.expr})", keep + [f"({x.expr} >= {lo.expr})"]
            if hi is not None:
                hi = self.arg(hi, node)
                expr, keep = f"tl.minimum({expr}, {hi.expr})", keep + [f"({x.expr} <= {hi.expr})"]
            y = self.emit(expr, _promote(x.kind, *(v.kind for v in (lo, hi) if v is not None)), x.on_score)
            self._rule(y, [(x, f"tl.where({' & '.join(keep) or 'True'}, 1.0, 0.0)")])
            return y
        if name in ("floor_divide", "remainder", "__floordiv__", "__mod__", "trunc_divide", "fmod"):
            b = self.arg(args[1], node)
            kind = _promote(x.kind, b.kind)
            fn = {"floor_divide": "floordiv", "__floordiv__": "floordiv", "remainder": "remainder",
                  "__mod__": "remainder", "trunc_divide": "truncdiv", "fmod": "fmod"}[name]
            if kind == "float":
                fn = "f" + fn if fn != "fmod" else "ffmod"
            return self.emit(f"{fn}({x.expr}, {b.expr})", kind, x.on_score or b.on_score)
        if name in ("pow", "__pow__"):
            e = args[1]
            if not (isinstance(e, (int, float)) and not isinstance(e, bool) and float(e).is_integer() and 0 <= e <= 8):
                self._fail(node, "a power other than a constant integer 0..8")
            e = int(e)
            expr = " * ".join([x.expr] * e) if e else "1.0"
            y = self.emit(expr, _promote(x.kind, "int"), x.on_score)
            self._rule(y, [(x, f"{e}.0 * " + " * ".join([x.expr] * (e - 1)) if e > 1 else f"{float(e)}")])
            return y
        self._fail(node, f"`{name}`")

    def _binary(self, node, op, a: _Value, b: _Value) -> _Value:
        if "capture" in (a.kind, b.kind):
            self._fail(node, "a captured tensor used whole, not indexed by positions")
        if op in _COMPARE:
            return self.emit(f"{a.expr} {op} {b.expr}", "bool", a.on_score or b.on_score)
        if op in "&|^":
            if not (a.kind == b.kind == "bool" or "float" not in (a.kind, b.kind)):
                self._fail(node, f"`{op}` of float values")
            kind = _promote(a.kind, b.kind)
            # != 0: the interpreter gives int64 for a scalar bool & a tensor bool.
            expr = f"({a.expr} {op} {b.expr}) != 0" if kind == "bool" else f"{a.expr} {op} {b.expr}"
            return self.emit(expr, kind, a.on_score or b.on_score)
        kind = "float" if op == "/" else _promote(a.kind, b.kind)
        if kind == "bool":
            kind = "int"
        ea = self.as_float(a) if op == "/" else a.expr
        eb = self.as_float(b) if op == "/" else b.expr
        y = self.emit(f"{ea} {op} {eb}", kind, a.on_score or b.on_score)
        if op == "+":
            self._rule(y, [(a, "1.0"), (b, "1.0")])
        elif op == "-":
            self._rule(y, [(a, "1.0"), (b, "-1.0")])
        elif op == "*":
            self._rule(y, [(a, b.expr), (b, a.expr)])
        else:
            self._rule(y, [(a, f"1.0 / {eb}"), (b, f"-{y.expr} / {eb}")])
        return y

    def _cast(self, node, name, args, kw) -> _Value:
        x = self.arg(args[0], node)
        dtype = _CASTS.get(name) if name != "to" else kw.get("dtype", args[1] if len(args) > 1 else None)
        if not isinstance(dtype, torch.dtype) or dtype not in _TL_DTYPES:
            self._fail(node, f"a cast to {dtype!r}")
        kind = "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"
        if kind == "bool":
            return self.emit(f"{x.expr} != 0", "bool", x.on_score)
        y = self.emit(f"({x.expr}).to({_TL_DTYPES[dtype]})" if x.expr[0].isalpha() else
                      f"tl.full([], {x.expr}, {_TL_DTYPES[dtype]})", kind, x.on_score)
        self._rule(y, [(x, "1.0")])
        return y

    def _index(self, node, base, index) -> _Value:
        t = self.arg(base, node)
        if t.kind != "capture":
            self._fail(node, "indexing of a value that is not a captured tensor")
        k = int(t.expr[4:])
        tensor = self.captures_by_index(k)
        items = index if isinstance(index, tuple) else (index,)
        if len(items) != tensor.dim() or any(not isinstance(i, (fx.Node, int)) or isinstance(i, bool)
                                             for i in items):
            self._fail(node, f"indexing a captured tensor of {tensor.dim()} dims with {index!r}: index every dim "
                             f"by one position (slices, None, ... and tensor shapes are not translated)")
        self.cap_dims[k] = (tuple(tensor.shape), tuple(tensor.stride()))
        offset, oks, on_score = [], [], False
        for d, i in enumerate(items):
            n, s = f"DIMS[{self._dim_slot(k, d, 0)}]", f"DIMS[{self._dim_slot(k, d, 1)}]"
            if isinstance(i, int):
                if not -tensor.shape[d] <= i < tensor.shape[d]:
                    self._fail(node, f"index {i} out of range for dim {d} of size {tensor.shape[d]}")
                offset.append(f"{i % tensor.shape[d]} * {s}")
                continue
            v = self.arg(i, node)
            if v.kind == "float":
                self._fail(node, "indexing by a float value")
            on_score |= v.on_score
            j = self.emit(f"({v.expr}).to(tl.int64)", "int", v.on_score)
            j = self.emit(f"{j.expr} + ({j.expr} < 0).to(tl.int64) * {n}", "int", v.on_score)  # torch's wrap
            oks.append(f"({j.expr} >= 0) & ({j.expr} < {n})")
            offset.append(f"{j.expr} * {s}")
        # != 0: the interpreter gives int64 for a scalar bool & a tensor bool.
        mask = f", mask=({' & '.join(oks)}) != 0, other=0" if oks else ""
        load = f"tl.load(CAP[{k}] + {' + '.join(offset)}{mask})"
        if tensor.dtype == torch.bool:
            return self.emit(f"{load} != 0", "bool", on_score)
        kind = "float" if tensor.dtype.is_floating_point else "int"
        return self.emit(f"{load}.to(tl.float32)" if kind == "float" else load, kind, on_score)

    def captures_by_index(self, k: int) -> Tensor:
        return next(t for i, t in self.captures.values() if i == k)

    def _dim_slot(self, k: int, d: int, which: int) -> str:
        return f"@dim{k}_{d}_{which}"

    def _rule(self, y: _Value, parts: list):
        if y.on_score:
            self.grad_rules.append((y.expr, [(x, deriv) for x, deriv in parts if x.on_score]))

    def backward(self, out: _Value) -> list:
        """Lines that leave ``grad * d out / d score`` in ``g_score``."""
        if not out.on_score:
            return ["g_score = grad * 0.0"]
        lines = [f"g_{out.expr} = grad"]
        have = {out.expr}
        for y, parts in reversed(self.grad_rules):
            if y not in have:
                continue
            for x, deriv in parts:
                term = f"g_{y} * ({deriv})"
                lines.append(f"g_{x.expr} = g_{x.expr} + {term}" if x.expr in have else f"g_{x.expr} = {term}")
                have.add(x.expr)
        if "score" not in have:
            lines.append("g_score = grad * 0.0")
        return lines


def _trace(fn: Callable, names: tuple, what: str) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(_named(fn, names))
    except ValueError:
        raise
    except Exception as e:  # fx's TraceError, or what torch raises on a proxy it cannot take
        raise ValueError(f"flex_attention: cannot translate {what}: {type(e).__name__}: {e} (mods are traced "
                         f"once with symbolic values: no Python control flow on them, no .item(), no "
                         f"data-dependent shapes)") from e


def _named(fn: Callable, names: tuple) -> Callable:
    """``fn`` behind a function whose parameters have exactly ``names`` (fx reads them)."""
    src = f"def mod({', '.join(names)}):\n    return fn({', '.join(names)})\n"
    scope = {"fn": fn}
    exec(compile(src, "<flex mod>", "exec"), scope)
    return scope["mod"]


_HEADER = '''"""Generated by fastattn.ops.flex.translate from a user's FlexAttention mods. Do not edit."""
import triton
import triton.language as tl

from fastattn.ops._triton import tanh
from fastattn.ops.flex.mod_ops import (  # noqa: F401
    ffloordiv, ffmod, floordiv, fmod, fremainder, ftruncdiv, remainder, sign, truncdiv)

'''

_MODULES: dict = {}  # source hash -> imported module


def _cache_dir() -> str:
    return os.environ.get("FASTATTN_FLEX_CACHE") or os.path.join(tempfile.gettempdir(), f"fastattn-flex-{os.getuid()}")


def _load_module(source: str):
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    if digest not in _MODULES:
        directory = _cache_dir()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"flex_mods_{digest}.py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(source)
            os.replace(tmp, path)  # atomic: concurrent processes write the same text
        spec = importlib.util.spec_from_file_location(f"fastattn_flex_mods_{digest}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[digest] = module
    return _MODULES[digest]


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def _keep_all(b, h, q_idx, kv_idx):
    return q_idx >= 0


_TRANSLATIONS: "OrderedDict" = OrderedDict()  # (signature of the mods) -> Translation, most recent last
CACHED_TRANSLATIONS = 64


def _signature(obj, depth: int = 0):
    """What a traced mod depends on, as a hashable value: a function by its code, its closure
    cells, its defaults and the globals its code names (recursively: and_masks holds functions);
    a tensor by identity, dtype, shape and strides (the translation reads its sizes and strides
    at launch, but a cache entry must not outlive a rebinding); a module by its parameters and
    buffers; plain values by value; anything else by identity."""
    if depth > 6:
        return ("deep", id(obj))
    if isinstance(obj, Tensor):
        return ("tensor", id(obj), obj.dtype, tuple(obj.shape), tuple(obj.stride()), str(obj.device))
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype)):
        return obj
    if isinstance(obj, (tuple, list)):
        return tuple(_signature(x, depth + 1) for x in obj)
    if isinstance(obj, types.MethodType):
        return ("method", _signature(obj.__func__, depth + 1), _signature(obj.__self__, depth + 1))
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        cells = tuple(_signature(c.cell_contents, depth + 1) for c in obj.__closure__ or ())
        named = tuple((n, _signature(obj.__globals__[n], depth + 1)) for n in code.co_names if n in obj.__globals__)
        return ("function", id(code), cells, named, _signature(obj.__defaults__, depth + 1))
    if isinstance(obj, torch.nn.Module):
        return ("module", id(obj), tuple((n, _signature(t, depth + 1))
                                         for n, t in (*obj.named_parameters(), *obj.named_buffers())))
    return ("object", id(obj))


def translate(score_mod: Optional[Callable], mask_mod: Optional[Callable]) -> Translation:
    """The Triton translation of ``score_mod`` and ``mask_mod`` (None: identity / keep all),
    cached by what the mods depend on (``_signature``), so a training loop that passes the same
    mods traces them once.

    Raises:
        ValueError: a mod uses a construct that cannot be translated (the message names it)."""
    key = (_signature(score_mod), _signature(mask_mod))
    if key in _TRANSLATIONS:
        _TRANSLATIONS.move_to_end(key)
        return _TRANSLATIONS[key]
    tr = _translate(score_mod, mask_mod)
    _TRANSLATIONS[key] = tr
    if len(_TRANSLATIONS) > CACHED_TRANSLATIONS:
        _TRANSLATIONS.popitem(last=False)
    return tr


def _translate(score_mod: Optional[Callable], mask_mod: Optional[Callable]) -> Translation:
    captures: dict = {}
    cap_dims: list = []
    bodies = {}
    for fn, names, what, default in ((score_mod, SCORE_ARGS, "score_mod", _identity_score),
                                     (mask_mod, MASK_ARGS, "mask_mod", _keep_all)):
        gm = _trace(fn if fn is not None else default, names, what)
        w = _Writer(gm, what, captures, cap_dims)
        inputs = [_Value("score", "float", True)] if what == "score_mod" else []
        inputs += [_Value(n, "int", False) for n in ("b", "h", "q_idx", "kv_idx")]
        out = w.run(inputs)
        if out.kind == "capture":
            w._fail(next(iter(gm.graph.nodes)), "it returns a captured tensor whole")
        if what == "mask_mod" and out.kind != "bool":
            raise ValueError(f"flex_attention: mask_mod must return a bool value, got a {out.kind} one")
        bodies[what] = (w, out)
    # Each capture's sizes and strides get slots in DIMS in capture order.
    slots, dims = {}, []
    for k, entry in enumerate(cap_dims):
        shape, strides = entry if entry is not None else ((), ())
        for d in range(len(shape)):
            slots[f"@dim{k}_{d}_0"] = len(dims)
            dims.append(shape[d])
            slots[f"@dim{k}_{d}_1"] = len(dims)
            dims.append(strides[d])

    def fill(line: str) -> str:
        for key, slot in slots.items():
            line = line.replace(key, str(slot))
        return line

    score_w, score_out = bodies["score_mod"]
    mask_w, mask_out = bodies["mask_mod"]
    src = [_HEADER]
    src.append("@triton.jit\ndef score_mod(score, b, h, q_idx, kv_idx, CAP, DIMS):")
    src += [f"    {fill(line)}" for line in score_w.lines]
    src.append(f"    return {score_out.expr} + score * 0.0  # the tile's shape and fp32\n\n")
    src.append("@triton.jit\ndef score_grad(score, b, h, q_idx, kv_idx, CAP, DIMS, grad):")
    src += [f"    {fill(line)}" for line in score_w.lines]
    src += [f"    {line}" for line in score_w.backward(score_out)]
    src.append("    return g_score + grad * 0.0\n\n")
    src.append("@triton.jit\ndef mask_mod(b, h, q_idx, kv_idx, CAP, DIMS):")
    src += [f"    {fill(line)}" for line in mask_w.lines]
    src.append(f"    return {mask_out.expr}\n")
    source = "\n".join(src)
    module = _load_module(source)
    ordered = tuple(t for _, t in sorted(captures.values(), key=lambda e: e[0]))
    return Translation(module.score_mod, module.score_grad, module.mask_mod, ordered, tuple(dims), source)
