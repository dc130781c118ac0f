"""Reverse-mode gradient rules for the ONNX ops that ``torch.onnx.export`` emits for MLPs and
small CNNs, written as plain ONNX ops so that any ``onnxruntime`` can run the backward pass.

Each rule receives the forward node, the name of the gradient of its (single differentiable)
output and which inputs need a gradient, and emits the nodes that compute those input gradients.
The builder in ``onnx_training`` walks the graph backwards and calls these rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str | None
Shape = tuple[Dim, ...]


class UnsupportedModelError(ValueError):
    """The forward graph uses an op, attribute or structure the training-graph builder cannot
    differentiate. The message names the op type and the node."""


def describe(node: onnx.NodeProto) -> str:
    """A node as error messages name it: op type and node name (or its first output)."""
    label = node.name or (f"producing {node.output[0]!r}" if node.output else "<unnamed>")
    return f"{node.op_type} node {label!r}" if node.name else f"{node.op_type} node {label}"


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes as Python values (strings decoded)."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


class Emitter:
    """Appends uniquely named nodes and constants to a graph under construction."""

    def __init__(self, taken: set[str], elem_type: int) -> None:
        self.taken = taken
        self.elem_type = elem_type
        self.np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._shapes: dict[str, str] = {}

    def name(self, hint: str) -> str:
        """A tensor/node name not used anywhere in the graph yet."""
        base, i = hint, 0
        while hint in self.taken:
            i += 1
            hint = f"{base}_{i}"
        self.taken.add(hint)
        return hint

    def op(self, op_type: str, inputs: Sequence[str], hint: str = "", **kw: Any) -> str:
        """Emit one single-output node; return its output name."""
        return self.op_n(op_type, inputs, 1, hint, **kw)[0]

    def op_n(
        self, op_type: str, inputs: Sequence[str], n_out: int, hint: str = "", **kw: Any
    ) -> list[str]:
        """Emit one node with ``n_out`` outputs."""
        stem = hint or f"t/{op_type}"
        outs = [self.name(stem if n_out == 1 else f"{stem}.{i}") for i in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=self.name(f"n/{op_type}"), **kw)
        self.nodes.append(node)
        return outs

    def const(self, value: Any, dtype: Any = None, hint: str = "c") -> str:
        """A constant initializer (model dtype unless ``dtype`` says otherwise), deduplicated."""
        arr = np.asarray(value, dtype=dtype if dtype is not None else self.np_dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            name = self.name(f"const/{hint}")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, shapes, pads)."""
        return self.const(list(values), np.int64, "ints")

    def shape_of(self, x: str) -> str:
        """The runtime shape of ``x`` (one Shape node per tensor)."""
        if x not in self._shapes:
            self._shapes[x] = self.op("Shape", [x], f"shape/{x}")
        return self._shapes[x]

    def zeros_like(self, x: str) -> str:
        """Zeros of the model dtype with the runtime shape of ``x``."""
        zero = helper.make_tensor("zero", self.elem_type, [1], [0])
        return self.op("ConstantOfShape", [self.shape_of(x)], "zeros", value=zero)


@dataclass
class Ctx:
    """What gradient rules may use: the emitter, static shapes, and per-node extras."""

    emit: Emitter
    shapes: dict[str, Shape]
    extras: dict[str, list[str]] = field(default_factory=dict)  # node key -> extra outputs

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def static(self, name: str, node: onnx.NodeProto, what: str) -> tuple[int, ...]:
        """The fully static shape of ``name``, or an error naming what needed it."""
        shp = self.shapes.get(name)
        if shp is None or not all(isinstance(d, int) for d in shp[1:]):
            raise UnsupportedModelError(
                f"{describe(node)}: the gradient needs the static {what} shape of {name!r} "
                f"(got {shp}); export with fixed non-batch dimensions"
            )
        return tuple(d if isinstance(d, int) else -1 for d in shp)


Rule = Callable[[Ctx, onnx.NodeProto, str, list[bool]], list[str | None]]


def node_key(node: onnx.NodeProto) -> str:
    return node.output[0]


def reduce_to(ctx: Ctx, g: str, out: str, target: str) -> str:
    """Sum a broadcast result's gradient ``g`` (shaped like ``out``) back to ``target``'s shape.

    Dims of ``target`` that are 1 (or missing in front) are summed; symbolic dims are assumed
    not broadcast. When shapes are unknown the gradient is reshaped to the runtime shape, which
    fails loudly rather than silently if a broadcast did happen.
    """
    e = ctx.emit
    tshape, oshape = ctx.shape(target), ctx.shape(out)
    if tshape is None or oshape is None:
        return e.op("Reshape", [g, e.shape_of(target)], f"d/{target}")
    lead = len(oshape) - len(tshape)
    axes = list(range(lead)) + [
        lead + i for i, d in enumerate(tshape) if d == 1 and oshape[lead + i] != 1
    ]
    if not axes:
        return g
    summed = e.op("ReduceSum", [g, e.ints(axes)], keepdims=1)
    if all(isinstance(d, int) for d in tshape):
        return e.op("Reshape", [summed, e.ints([int(d) for d in tshape])])  # type: ignore[arg-type]
    return e.op("Reshape", [summed, e.shape_of(target)])


# --- elementwise arithmetic -------------------------------------------------------------------


def _add(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    a, b = n.input[0], n.input[1]
    return [
        reduce_to(ctx, g, n.output[0], a) if need[0] else None,
        reduce_to(ctx, g, n.output[0], b) if need[1] else None,
    ]


def _sub(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    a, b = n.input[0], n.input[1]
    db = None
    if need[1]:
        db = ctx.emit.op("Neg", [reduce_to(ctx, g, n.output[0], b)])
    return [reduce_to(ctx, g, n.output[0], a) if need[0] else None, db]


def _mul(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, (a, b), y = ctx.emit, n.input[:2], n.output[0]
    return [
        reduce_to(ctx, e.op("Mul", [g, b]), y, a) if need[0] else None,
        reduce_to(ctx, e.op("Mul", [g, a]), y, b) if need[1] else None,
    ]


def _div(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, (a, b), y = ctx.emit, n.input[:2], n.output[0]
    da = reduce_to(ctx, e.op("Div", [g, b]), y, a) if need[0] else None
    db = None
    if need[1]:  # d(a/b)/db = -y/b
        db = e.op("Neg", [reduce_to(ctx, e.op("Mul", [g, e.op("Div", [y, b])]), y, b)])
    return [da, db]


def _neg(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    return [ctx.emit.op("Neg", [g])]


def _identity(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    return [g] + [None] * (len(n.input) - 1)


def _reshape_like_input(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    """Flatten, Reshape, Squeeze, Unsqueeze only move elements: reshape back."""
    x = n.input[0]
    return [ctx.emit.op("Reshape", [g, ctx.emit.shape_of(x)], f"d/{x}")] + [None] * (
        len(n.input) - 1
    )


def _transpose(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    perm = attrs(n).get("perm")
    if perm is None:
        shp = ctx.shape(n.input[0])
        if shp is None:
            raise UnsupportedModelError(f"{describe(n)}: Transpose without perm needs a known rank")
        perm = list(reversed(range(len(shp))))
    inverse = [int(i) for i in np.argsort(perm)]
    return [ctx.emit.op("Transpose", [g], perm=inverse)]


# --- activations ------------------------------------------------------------------------------


def _relu(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e = ctx.emit
    zero = e.const(0.0, hint="zero")
    return [e.op("Where", [e.op("Greater", [n.input[0], zero]), g, zero])]


def _sigmoid(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, y = ctx.emit, n.output[0]
    slope = e.op("Mul", [y, e.op("Sub", [e.const(1.0, hint="one"), y])])
    return [e.op("Mul", [g, slope])]


def _tanh(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, y = ctx.emit, n.output[0]
    slope = e.op("Sub", [e.const(1.0, hint="one"), e.op("Mul", [y, y])])
    return [e.op("Mul", [g, slope])]


def _softmax(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, y = ctx.emit, n.output[0]
    axis = e.ints([int(attrs(n).get("axis", -1))])
    inner = e.op("ReduceSum", [e.op("Mul", [g, y]), axis], keepdims=1)
    return [e.op("Mul", [y, e.op("Sub", [g, inner])])]


def _log_softmax(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, y = ctx.emit, n.output[0]
    axis = e.ints([int(attrs(n).get("axis", -1))])
    total = e.op("ReduceSum", [g, axis], keepdims=1)
    return [e.op("Sub", [g, e.op("Mul", [e.op("Exp", [y]), total])])]


# --- dense layers -----------------------------------------------------------------------------


def _gemm(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, at = ctx.emit, attrs(n)
    a, b = n.input[0], n.input[1]
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
    da = db = dc = None
    if need[0]:  # A' = op(A): dA' = alpha g B'^T
        if ta:
            da = e.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1)
        else:
            da = e.op("Gemm", [g, b], alpha=alpha, transB=1 - tb)
    if need[1]:  # dB' = alpha A'^T g
        if tb:
            db = e.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta)
        else:
            db = e.op("Gemm", [a, g], alpha=alpha, transA=1 - ta)
    if len(need) > 2 and need[2]:
        scaled = g if beta == 1.0 else e.op("Mul", [g, e.const(beta, hint="beta")])
        dc = reduce_to(ctx, scaled, n.output[0], n.input[2])
    return [da, db, dc]


def _swap_last(ctx: Ctx, x: str, rank: int) -> str:
    perm = [*range(rank - 2), rank - 1, rank - 2]
    return ctx.emit.op("Transpose", [x], perm=perm)


def _matmul(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, (a, b), y = ctx.emit, n.input[:2], n.output[0]
    sa, sb, sy = ctx.shape(a), ctx.shape(b), ctx.shape(y)
    if sa is None or sb is None or sy is None:
        raise UnsupportedModelError(f"{describe(n)}: MatMul gradients need the operands' ranks")
    if len(sa) < 2 or len(sb) < 2:
        raise UnsupportedModelError(f"{describe(n)}: MatMul with a 1-D operand is not supported")
    da = db = None
    if len(sb) == 2:  # a weight matrix: fold A's batch dims into rows and use Gemm's transposes
        # (Gemm, not MatMul(Transpose): older onnxruntime fuses the latter into a float-only op)
        a2 = a if len(sa) == 2 else e.op("Flatten", [a], axis=len(sa) - 1)
        g2 = g if len(sy) == 2 else e.op("Flatten", [g], axis=len(sy) - 1)
        if need[0]:
            da = e.op("Gemm", [g2, b], transB=1)
            if len(sa) > 2:
                da = e.op("Reshape", [da, e.shape_of(a)], f"d/{a}")
        if need[1]:
            db = e.op("Gemm", [a2, g2], transA=1)
        return [da, db]
    if need[0]:
        full = e.op("MatMul", [g, _swap_last(ctx, b, len(sb))])
        ctx.shapes[full] = tuple(sy[:-2]) + tuple(sa[-2:])
        da = reduce_to(ctx, full, full, a)
    if need[1]:
        full = e.op("MatMul", [_swap_last(ctx, a, len(sa)), g])
        ctx.shapes[full] = tuple(sy[:-2]) + tuple(sb[-2:])
        db = reduce_to(ctx, full, full, b)
    return [da, db]


# --- convolution and pooling ------------------------------------------------------------------


@dataclass
class Window:
    """Static geometry of a sliding-window op (explicit pads; auto_pad resolved)."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begin: list[int]
    end: list[int]
    in_sp: list[int]
    out_sp: list[int]

    @property
    def pads(self) -> list[int]:
        return self.begin + self.end

    def output_padding(self) -> list[int]:
        """What ConvTranspose must add so that its output regains the input's spatial size."""
        return [
            i + b + e - ((o - 1) * s + (k - 1) * d + 1)
            for i, b, e, o, s, k, d in zip(
                self.in_sp,
                self.begin,
                self.end,
                self.out_sp,
                self.strides,
                self.kernel,
                self.dilations,
                strict=True,
            )
        ]


def window(ctx: Ctx, n: onnx.NodeProto, kernel: list[int]) -> Window:
    """Resolve a Conv/Pool node's window attributes against the static input shape."""
    at = attrs(n)
    in_sp = list(ctx.static(n.input[0], n, "input")[2:])
    k = len(in_sp)
    strides = list(at.get("strides", [1] * k))
    dil = list(at.get("dilations", [1] * k))
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(at.get("pads", [0] * 2 * k))
        begin, end = pads[:k], pads[k:]
    elif auto == "VALID":
        begin, end = [0] * k, [0] * k
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i, s, kk, d in zip(in_sp, strides, kernel, dil, strict=True):
            total = max((-(-i // s) - 1) * s + (kk - 1) * d + 1 - i, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
    else:
        raise UnsupportedModelError(f"{describe(n)}: auto_pad={auto!r} is not supported")
    ceil = int(at.get("ceil_mode", 0))
    out_sp = []
    for i, b, e_, kk, s, d in zip(in_sp, begin, end, kernel, strides, dil, strict=True):
        span = i + b + e_ - ((kk - 1) * d + 1)
        out_sp.append((-(-span // s) if ceil else span // s) + 1)
    return Window(kernel, strides, dil, begin, end, in_sp, out_sp)


def _conv(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, x, w = ctx.emit, n.input[0], n.input[1]
    wshape = ctx.static(w, n, "weight")
    group = int(attrs(n).get("group", 1))
    geo = window(ctx, n, list(wshape[2:]))
    nsp = len(geo.kernel)
    swap = [1, 0, *range(2, 2 + nsp)]
    dx = dw = db = None
    if need[0]:
        dx = e.op(
            "ConvTranspose",
            [g, w],
            strides=geo.strides,
            dilations=geo.dilations,
            pads=geo.pads,
            group=group,
            output_padding=geo.output_padding(),
        )
    if need[1]:
        # dW[m, c] = sum over batch and positions of g[:, m] * x[:, c] (shifted): a Conv with
        # the batch as channels, strides and dilations trading places.
        cross = e.op(
            "Conv",
            [e.op("Transpose", [x], perm=swap), e.op("Transpose", [g], perm=swap)],
            strides=geo.dilations,
            dilations=geo.strides,
            pads=geo.pads,
        )
        cross = e.op("Transpose", [cross], perm=swap)  # [M, C, k'...]
        got = [
            (i + b + en - ((o - 1) * s + 1)) // d + 1
            for i, b, en, o, s, d in zip(
                geo.in_sp, geo.begin, geo.end, geo.out_sp, geo.strides, geo.dilations, strict=True
            )
        ]
        if got != geo.kernel:
            axes = list(range(2, 2 + nsp))
            cross = e.op("Slice", [cross, e.ints([0] * nsp), e.ints(geo.kernel), e.ints(axes)])
        if group > 1:  # keep only the blocks where output group == input group
            m, cg = wshape[0], wshape[1]
            mg = m // group
            full = e.op("Reshape", [cross, e.ints([group, mg, group, cg, *geo.kernel])])
            mask = np.eye(group).reshape([group, 1, group, 1] + [1] * nsp)
            diag = e.op("ReduceSum", [e.op("Mul", [full, e.const(mask)]), e.ints([2])], keepdims=0)
            cross = e.op("Reshape", [diag, e.ints(list(wshape))])
        dw = cross
    if len(need) > 2 and need[2]:
        db = e.op("ReduceSum", [g, e.ints([0, *range(2, 2 + nsp)])], keepdims=0)
    return [dx, dw, db]


def patch_maxpool(ctx: Ctx, n: onnx.NodeProto) -> None:
    """Ask the forward MaxPool for its argmax indices (its optional second output)."""
    if len(n.output) == 1:
        n.output.append(ctx.emit.name(f"{n.output[0]}.indices"))
    ctx.extras[node_key(n)] = [n.output[1]]


def _maxpool(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    if int(attrs(n).get("storage_order", 0)) != 0:
        raise UnsupportedModelError(f"{describe(n)}: storage_order=1 is not supported")
    e, x = ctx.emit, n.input[0]
    idx = ctx.extras[node_key(n)][0]
    flat = e.ints([-1])
    size = e.op("Reshape", [e.op("Size", [x]), e.ints([1])])
    zero = helper.make_tensor("zero", e.elem_type, [1], [0])
    zeros = e.op("ConstantOfShape", [size], value=zero)
    scattered = e.op(
        "ScatterElements",
        [zeros, e.op("Reshape", [idx, flat]), e.op("Reshape", [g, flat])],
        axis=0,
        reduction="add",
    )
    return [e.op("Reshape", [scattered, e.shape_of(x)], f"d/{x}")]


def _avgpool(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    at, e, x = attrs(n), ctx.emit, n.input[0]
    if int(at.get("ceil_mode", 0)) or any(d != 1 for d in at.get("dilations", [])):
        raise UnsupportedModelError(f"{describe(n)}: ceil_mode=1 and dilations are not supported")
    geo = window(ctx, n, list(at["kernel_shape"]))
    # divisor of each output position: the window's size, or only its part inside the input
    counts = np.ones(geo.out_sp)
    for ax, (i, b, k, s) in enumerate(
        zip(geo.in_sp, geo.begin, geo.kernel, geo.strides, strict=True)
    ):
        starts = np.arange(geo.out_sp[ax]) * s - b
        inside = np.minimum(starts + k, i) - np.maximum(starts, 0)
        per_axis = np.full(geo.out_sp[ax], k) if int(at.get("count_include_pad", 0)) else inside
        counts = counts * per_axis.reshape([-1 if j == ax else 1 for j in range(len(geo.out_sp))])
    scaled = e.op("Div", [g, e.const(counts)])
    single = e.op("Reshape", [scaled, e.ints([-1, 1, *geo.out_sp])])
    ones = e.const(np.ones([1, 1, *geo.kernel]))
    spread = e.op(
        "ConvTranspose",
        [single, ones],
        strides=geo.strides,
        pads=geo.pads,
        output_padding=geo.output_padding(),
        kernel_shape=geo.kernel,
    )
    return [e.op("Reshape", [spread, e.shape_of(x)], f"d/{x}")]


def _global_avgpool(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    e, x = ctx.emit, n.input[0]
    area = e.op(
        "Cast", [e.op("Div", [e.op("Size", [x]), e.op("Size", [n.output[0]])])], to=e.elem_type
    )
    return [e.op("Expand", [e.op("Div", [g, area]), e.shape_of(x)], f"d/{x}")]


def _batchnorm(ctx: Ctx, n: onnx.NodeProto, g: str, need: list[bool]) -> list[str | None]:
    at, e = attrs(n), ctx.emit
    if int(at.get("training_mode", 0)) or len(n.output) > 1:
        raise UnsupportedModelError(f"{describe(n)}: only inference-mode BatchNormalization")
    if len(need) > 3 and (need[3] or (len(need) > 4 and need[4])):
        raise UnsupportedModelError(
            f"{describe(n)}: running mean/var are frozen statistics, not trainable parameters"
        )
    x, scale = n.input[0], n.input[1]
    shp = ctx.shape(x)
    if shp is None:
        raise UnsupportedModelError(f"{describe(n)}: the input's rank must be known")
    rank = len(shp)
    bcast = e.ints([0, *range(2, rank)])  # axes to unsqueeze [C] -> [1, C, 1, ...]; also reduce
    std = e.op("Sqrt", [e.op("Add", [n.input[4], e.const(float(at.get("epsilon", 1e-5)))])])
    dx = dscale = dbias = None
    if need[0]:
        dx = e.op("Mul", [g, e.op("Unsqueeze", [e.op("Div", [scale, std]), bcast])])
    if need[1]:
        centred = e.op("Sub", [x, e.op("Unsqueeze", [n.input[3], bcast])])
        xhat = e.op("Div", [centred, e.op("Unsqueeze", [std, bcast])])
        dscale = e.op("ReduceSum", [e.op("Mul", [g, xhat]), bcast], keepdims=0)
    if need[2]:
        dbias = e.op("ReduceSum", [g, bcast], keepdims=0)
    return [dx, dscale, dbias, None, None]


RULES: dict[str, Rule] = {
    "Add": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "Neg": _neg,
    "Identity": _identity,
    "Dropout": _identity,  # inference mode: identity
    "Flatten": _reshape_like_input,
    "Reshape": _reshape_like_input,
    "Squeeze": _reshape_like_input,
    "Unsqueeze": _reshape_like_input,
    "Transpose": _transpose,
    "Relu": _relu,
    "Sigmoid": _sigmoid,
    "Tanh": _tanh,
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avgpool,
    "BatchNormalization": _batchnorm,
}
"""Differentiable ops and their gradient rules."""

PATCHES: dict[str, Callable[[Ctx, onnx.NodeProto], None]] = {"MaxPool": patch_maxpool}
"""Forward nodes that must expose extra outputs for their gradient."""

NON_DIFFERENTIABLE = frozenset(
    {
        "Constant",
        "Shape",
        "Size",
        "Gather",
        "Concat",
        "Slice",
        "Cast",
        "ConstantOfShape",
        "Range",
        "Equal",
        "Greater",
        "Less",
        "Not",
        "Where",
        "Expand",
        "ReduceProd",
    }
)
"""Ops allowed off the gradient path only (shape arithmetic that feeds Reshape)."""

WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "Div": (0, 1),
    "Conv": (1, 2),
    "BatchNormalization": (1, 2),
}
"""Input slots whose float initializers are trained by default (BN stats are slots 3 and 4)."""

NO_FLOAT64 = frozenset({"Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool"})
"""Ops onnxruntime 1.32's CPU provider has no double kernel for (forward or backward)."""

ELEM_TYPES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64"}
