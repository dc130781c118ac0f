"""Derive a training-step graph and an eval graph from an exported forward ONNX graph.

The training step is forward + loss + reverse-mode backward (rules in ``onnx_ops``) + optimizer
update, all standard ONNX ops, so a device trains with a plain ``onnxruntime.InferenceSession``.
Parameters and optimizer state are graph inputs whose updated values are graph outputs; the
learning rate is a runtime input. See docs/onnx-training.md.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefl.packages.artifacts import TrainingArtifacts
from edgefl.packages.onnx_ops import (
    ELEM_TYPES,
    NO_FLOAT64,
    NON_DIFFERENTIABLE,
    PATCHES,
    RULES,
    WEIGHT_SLOTS,
    Ctx,
    Emitter,
    Shape,
    UnsupportedModelError,
    attrs,
    describe,
)

MIN_OPSET = 17  # ScatterElements(reduction="add") needs 16; 17 is what we test
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
}
GRAD_BLOCKERS = frozenset({"Shape", "Size", "Equal", "Greater", "Less", "Not"})
"""Non-differentiable ops whose outputs carry no gradient even if their input does."""


def _load(forward: onnx.ModelProto | bytes | str | pathlib.Path) -> onnx.ModelProto:
    if isinstance(forward, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(forward)
        return model
    if isinstance(forward, (bytes, bytearray)):
        return onnx.load_from_string(bytes(forward))
    return onnx.load(str(forward))


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise UnsupportedModelError("the model imports no default-domain (ai.onnx) opset")


def _upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    version = _opset(model)
    if version >= MIN_OPSET:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise UnsupportedModelError(
            f"cannot convert the model from opset {version} to {MIN_OPSET}: {exc}"
        ) from exc


def _shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    out: dict[str, Shape] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in t.shape.dim
            )
    for init in g.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    return out


def _dims(shape: Shape | None) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in (shape or ())]


def _fill_optimizer(optimizer: Mapping[str, Any] | None) -> dict[str, Any]:
    spec = dict(optimizer or {"name": "sgd"})
    name = spec.pop("name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    unknown = sorted(set(spec) - set(OPTIMIZERS[name]))
    if unknown:
        raise ValueError(f"optimizer {name!r} has no setting(s) {unknown}")
    filled: dict[str, Any] = {"name": name}
    filled.update({k: float(spec.get(k, v)) for k, v in OPTIMIZERS[name].items()})
    return filled


@dataclass
class _Analysis:
    """Facts about the forward graph shared by the train and eval graph builders."""

    model: onnx.ModelProto
    elem: int
    data: onnx.ValueInfoProto
    output: str
    params: list[str]
    frozen: list[onnx.TensorProto]
    shapes: dict[str, Shape]
    loss: str


def _select_trainable(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    elem: int,
    trainable: Sequence[str] | None,
) -> list[str]:
    producers = {o: n for n in graph.node for o in n.output}

    def source(t: str) -> str:
        while t in producers and producers[t].op_type == "Identity":
            t = producers[t].input[0]
        return t

    if trainable is not None:
        for name in trainable:
            if name not in inits:
                raise ValueError(f"trainable {name!r} is not an initializer of the model")
            if inits[name].data_type != elem:
                raise ValueError(
                    f"trainable {name!r} has ONNX dtype {inits[name].data_type}, "
                    f"the model computes in {ELEM_TYPES.get(elem, elem)}"
                )
        return list(dict.fromkeys(trainable))
    chosen: set[str] = set()
    frozen: set[str] = set()
    for node in graph.node:
        slots = WEIGHT_SLOTS.get(node.op_type, ())
        for i, t in enumerate(node.input):
            s = source(t)
            if s not in inits or inits[s].data_type != elem:
                continue
            elementwise = node.op_type in ("Add", "Sub", "Mul", "Div")
            if i in slots and not (elementwise and len(inits[s].dims) == 0):
                chosen.add(s)
            elif node.op_type == "BatchNormalization" and i in (3, 4):
                frozen.add(s)
    return [i.name for i in graph.initializer if i.name in chosen - frozen]


def _analyse(forward: onnx.ModelProto, loss: str, trainable: Sequence[str] | None) -> _Analysis:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
    model = _upgrade(forward)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    data = [vi for vi in graph.input if vi.name not in inits]
    if len(data) != 1:
        raise UnsupportedModelError(
            f"the model must have exactly one data input, it has {[d.name for d in data]}"
        )
    if len(graph.output) != 1:
        raise UnsupportedModelError(
            f"the model must have exactly one output, it has {[o.name for o in graph.output]}"
        )
    dims = data[0].type.tensor_type.shape.dim
    if len(dims) >= 2 and dims[0].HasField("dim_value"):  # exported with a fixed batch size
        dims[0].dim_param = "batch"  # trains on any batch size unless a Reshape pins it
    elem = data[0].type.tensor_type.elem_type
    if elem not in ELEM_TYPES:
        raise UnsupportedModelError(
            f"data input {data[0].name!r} has ONNX dtype {elem}; only float32 and float64"
        )
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or (
            node.op_type not in RULES and node.op_type not in NON_DIFFERENTIABLE
        ):
            raise UnsupportedModelError(f"unsupported op {node.op_type} ({describe(node)})")
        if elem == TensorProto.DOUBLE and node.op_type in NO_FLOAT64:
            raise UnsupportedModelError(
                f"{describe(node)}: onnxruntime's CPU provider has no float64 kernel for "
                f"{node.op_type}; export this model in float32"
            )
    params = _select_trainable(graph, inits, elem, trainable)
    if not params:
        raise UnsupportedModelError("the model has no trainable float initializers")
    frozen = [i for i in graph.initializer if i.name not in set(params)]
    return _Analysis(
        model, elem, data[0], graph.output[0].name, params, frozen, _shapes(model), loss
    )


def _grad_path(a: _Analysis) -> set[str]:
    """Tensors that depend on trainable parameters through differentiable ops."""
    rg = set(a.params)
    for node in a.model.graph.node:
        hit = [t for t in node.input if t in rg]
        if not hit or node.op_type in GRAD_BLOCKERS:
            continue
        if node.op_type not in RULES:
            raise UnsupportedModelError(
                f"{describe(node)} has no gradient rule but its input {hit[0]!r} depends on "
                f"trainable parameters"
            )
        rg.add(node.output[0])
    return rg


def _emit_loss(
    a: _Analysis, e: Emitter, nodes: list[onnx.NodeProto], labels: str, want_grad: bool
) -> tuple[str, str, str | None]:
    """Emit the loss; return (loss, tensor the backward pass starts at, its gradient)."""
    out, shp = a.output, a.shapes.get(a.output)
    if a.loss == "mse":
        diff = e.op("Sub", [out, labels])
        count = e.op("Cast", [e.op("Size", [out])], to=a.elem)
        total = e.op("ReduceSum", [e.op("Mul", [diff, diff])], keepdims=0)
        loss = e.op("Div", [total, count], "loss")
        grad = e.op("Div", [e.op("Mul", [diff, e.const(2.0, hint="two")]), count])
        return loss, out, grad if want_grad else None
    if shp is None or len(shp) != 2:
        raise UnsupportedModelError(
            f"cross_entropy needs (batch, classes) logits; output {out!r} has shape {shp}"
        )
    start = out
    last = next((n for n in nodes if out in n.output), None)
    if (
        last is not None
        and last.op_type in ("Softmax", "LogSoftmax")
        and int(attrs(last).get("axis", -1)) in (1, -1)
    ):
        start = last.input[0]  # the model ends in (log-)softmax: the loss takes its input
    log_p = e.op("LogSoftmax", [start], axis=1)
    col = e.op("Unsqueeze", [labels, e.ints([1])])
    picked = e.op("GatherElements", [log_p, col], axis=1)
    batch = e.op("Cast", [e.op("Gather", [e.shape_of(start), e.ints([0])])], to=a.elem)
    total = e.op("ReduceSum", [picked, e.ints([0, 1])], keepdims=0)
    loss = e.op("Neg", [e.op("Div", [total, e.op("Squeeze", [batch])])], "loss")
    if not want_grad:
        return loss, start, None
    classes = shp[1]
    if isinstance(classes, int):
        ids = e.ints(list(range(classes)))
    else:
        n_cls = e.op("Squeeze", [e.op("Gather", [e.shape_of(start), e.ints([1])])])
        ids = e.op("Range", [e.const(0, np.int64), n_cls, e.const(1, np.int64)])
    onehot = e.op("Cast", [e.op("Equal", [col, ids])], to=a.elem)
    probs = e.op("Softmax", [start], axis=1)
    return loss, start, e.op("Div", [e.op("Sub", [probs, onehot]), batch])


def _backward(
    a: _Analysis, ctx: Ctx, nodes: list[onnx.NodeProto], start: str, seed: str, rg: set[str]
) -> dict[str, str]:
    e = ctx.emit
    for node in nodes:
        if node.op_type in PATCHES and node.output[0] in rg:
            PATCHES[node.op_type](ctx, node)
    grads: dict[str, list[str]] = {start: [seed]}

    def total(name: str) -> str:
        parts = grads[name]
        return parts[0] if len(parts) == 1 else e.op("Sum", parts, f"d/{name}")

    for node in reversed(nodes):
        y = node.output[0]
        if y not in rg or y not in grads or node.op_type in GRAD_BLOCKERS:
            continue
        need = [t in rg for t in node.input]
        grads_in = RULES[node.op_type](ctx, node, total(y), need)
        for t, d in zip(node.input, grads_in[: len(node.input)], strict=True):
            if d is not None and t in rg:
                grads.setdefault(t, []).append(d)
    missing = [p for p in a.params if p not in grads]
    if missing:
        raise UnsupportedModelError(
            f"parameter(s) {missing} do not reach the loss through differentiable ops"
        )
    return {p: total(p) for p in a.params}


def _optimizer_step(
    a: _Analysis, e: Emitter, opt: dict[str, Any], grads: dict[str, str], lr: str
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Emit the update; return param -> updated output and the optimizer-state records."""
    new: dict[str, str] = {}
    state: list[dict[str, Any]] = []
    dtype = ELEM_TYPES[a.elem]

    def slot(hint: str, shape: list[int], param: str | None) -> str:
        name = e.name(hint)
        state.append({"input": name, "shape": shape, "dtype": dtype, "init": 0.0, "param": param})
        return name

    step = t = bc1 = bc2 = None
    if opt["name"] == "adam":
        one = e.const(1.0, hint="one")
        step = slot("adam.step", [], None)
        t = e.op("Add", [step, one], "adam.step.updated")
        bc1 = e.op("Sub", [one, e.op("Pow", [e.const(opt["beta1"]), t])])
        bc2 = e.op("Sub", [one, e.op("Pow", [e.const(opt["beta2"]), t])])
        state[-1]["output"] = t
    for p in a.params:
        g, shape = grads[p], _dims(a.shapes[p])
        if opt["name"] == "sgd":
            delta = e.op("Mul", [lr, g])
        elif opt["name"] == "momentum":  # torch.optim.SGD(momentum=mu, dampening=0)
            buf = slot(f"{p}.momentum", shape, p)
            upd = e.op(
                "Add", [e.op("Mul", [e.const(opt["momentum"]), buf]), g], f"{p}.momentum.updated"
            )
            state[-1]["output"] = upd
            delta = e.op("Mul", [lr, upd])
        else:  # torch.optim.Adam
            assert bc1 is not None and bc2 is not None
            m_in, v_in = slot(f"{p}.adam_m", shape, p), slot(f"{p}.adam_v", shape, p)
            b1, b2 = opt["beta1"], opt["beta2"]
            m = e.op(
                "Add",
                [e.op("Mul", [e.const(b1), m_in]), e.op("Mul", [e.const(1 - b1), g])],
                f"{p}.adam_m.updated",
            )
            g2 = e.op("Mul", [e.op("Mul", [e.const(1 - b2), g]), g])
            v = e.op("Add", [e.op("Mul", [e.const(b2), v_in]), g2], f"{p}.adam_v.updated")
            state[-2]["output"], state[-1]["output"] = m, v
            denom = e.op(
                "Add", [e.op("Div", [e.op("Sqrt", [v]), e.op("Sqrt", [bc2])]), e.const(opt["eps"])]
            )
            delta = e.op("Mul", [e.op("Div", [lr, bc1]), e.op("Div", [m, denom])])
        new[p] = e.op("Sub", [p, delta], f"{p}.updated")
    return new, state


def _vi(name: str, elem: int, shape: Sequence[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [d if d != -1 else None for d in shape])


def _graph(a: _Analysis, opt: dict[str, Any] | None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The train-step graph (``opt`` given) or the eval graph, and its names for the manifest."""
    g = a.model.graph
    nodes = []
    for n in g.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        nodes.append(copy)
    taken = {t for n in g.node for t in [*n.input, *n.output, n.name]}
    taken |= {i.name for i in g.initializer} | {v.name for v in [*g.input, *g.output]}
    e = Emitter(taken, a.elem)
    labels, lr = e.name("labels"), e.name("lr")
    out_shape = a.shapes.get(a.output) or ()
    batch = out_shape[0] if out_shape else "batch"
    if a.loss == "cross_entropy":
        label_vi = helper.make_tensor_value_info(labels, TensorProto.INT64, [batch])
    else:
        label_vi = helper.make_tensor_value_info(labels, a.elem, list(out_shape))
    loss, start, seed = _emit_loss(a, e, nodes, labels, want_grad=opt is not None)
    params = [_vi(p, a.elem, _dims(a.shapes[p])) for p in a.params]
    inputs = [a.data, label_vi]
    names: dict[str, Any] = {"label_input": labels, "loss_output": loss}
    outputs = [helper.make_tensor_value_info(loss, a.elem, [])]
    if opt is None:
        outputs.append(next(o for o in g.output))
        inputs += params
        names["logits_output"] = a.output
    else:
        rg = _grad_path(a)
        assert seed is not None
        grads = _backward(a, Ctx(e, dict(a.shapes)), nodes, start, seed, rg)
        new, state = _optimizer_step(a, e, opt, grads, lr)
        inputs += [helper.make_tensor_value_info(lr, a.elem, []), *params]
        inputs += [_vi(s["input"], a.elem, s["shape"]) for s in state]
        outputs = [_vi(new[p], a.elem, _dims(a.shapes[p])) for p in a.params]
        outputs += [_vi(s["output"], a.elem, s["shape"]) for s in state] + [
            helper.make_tensor_value_info(loss, a.elem, [])
        ]
        names.update(lr_input=lr, updated={p: new[p] for p in a.params}, state=state)
    graph = helper.make_graph(
        nodes + e.nodes,
        f"{g.name or 'model'}_{'train_step' if opt else 'eval'}",
        inputs,
        outputs,
        initializer=[*a.frozen, *e.initializers],
    )
    opsets = list(a.model.opset_import)
    ir = max(a.model.ir_version, helper.find_min_ir_version_for(opsets))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir)
    onnx.checker.check_model(model)
    return model, names


def build_onnx_training(
    forward: onnx.ModelProto | bytes | str | pathlib.Path,
    *,
    loss: str = "cross_entropy",
    optimizer: Mapping[str, Any] | None = None,
    trainable: Sequence[str] | None = None,
) -> TrainingArtifacts:
    """Turn an exported forward graph into the files a device trains with.

    Raises ``UnsupportedModelError`` (naming the op and node) when some part of the graph
    between the trainable parameters and the loss cannot be differentiated, and ``ValueError``
    for bad arguments. ``initial_weights`` are the exported values of the trainable parameters.
    """
    source = _load(forward)
    forward_bytes = (
        bytes(forward) if isinstance(forward, (bytes, bytearray)) else source.SerializeToString()
    )
    opt = _fill_optimizer(optimizer)
    a = _analyse(source, loss, trainable)
    train_model, train_names = _graph(a, opt)
    eval_model, eval_names = _graph(a, None)
    inits = {i.name: i for i in a.model.graph.initializer}
    dtype = ELEM_TYPES[a.elem]
    data_shape = [
        d.dim_value if d.HasField("dim_value") else -1 for d in a.data.type.tensor_type.shape.dim
    ]
    out_shape = a.shapes.get(a.output) or ()
    classes = out_shape[1] if loss == "cross_entropy" and isinstance(out_shape[1], int) else None
    label_shape = [-1] if loss == "cross_entropy" else _dims(out_shape)
    manifest: dict[str, Any] = {
        "parameters": [
            {"name": p, "dtype": dtype, "shape": [int(d) for d in inits[p].dims]} for p in a.params
        ],
        "inputs": [{"name": a.data.name, "dtype": dtype, "shape": data_shape}],
        "labels": {
            "name": train_names["label_input"],
            "dtype": "int64" if loss == "cross_entropy" else dtype,
            "shape": label_shape,
        },
        "loss": loss,
        "optimizer": opt,
        "ops": sorted({n.op_type for n in source.graph.node}),
        "training": {
            "model": "model.onnx",
            "train_step": "train_step.onnx",
            "eval": "eval.onnx",
            "opset": _opset(a.model),
            "data_input": a.data.name,
            "label_input": train_names["label_input"],
            "lr_input": train_names["lr_input"],
            "params": [
                {"name": p, "input": p, "output": train_names["updated"][p]} for p in a.params
            ],
            "state": train_names["state"],
            "loss_output": train_names["loss_output"],
            "eval_label_input": eval_names["label_input"],
            "eval_loss_output": eval_names["loss_output"],
            "eval_logits_output": eval_names["logits_output"],
            "classes": classes,
            "train_ops": sorted({n.op_type for n in train_model.graph.node}),
        },
    }
    return TrainingArtifacts(
        framework="onnx",
        files={
            "model.onnx": forward_bytes,
            "train_step.onnx": train_model.SerializeToString(),
            "eval.onnx": eval_model.SerializeToString(),
        },
        manifest=manifest,
        initial_weights={p: numpy_helper.to_array(inits[p]).copy() for p in a.params},
    )
