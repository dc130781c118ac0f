"""The generated ONNX training step against torch autograd and torch.optim, op by op.

Every case exports a tiny torch module (or hand-builds the ONNX graph where torch does not emit
the op variant), runs the generated train-step graph in real onnxruntime, and compares the loss,
the updated parameters and the gradient implied by the update with torch on the same batch.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgefl.packages.artifacts import TrainingArtifacts
from edgefl.packages.digits_models import digits_cnn_onnx, digits_mlp_onnx, digits_softmax_onnx
from edgefl.packages.onnx_autodiff import UnsupportedModelError, build_onnx_training

TOL = 1e-4
TorchFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def export(
    module: torch.nn.Module, example: torch.Tensor, preserve: bool = False, opset: int = 17
) -> bytes:
    """Export as the edge teams do (legacy exporter, opset 17, dynamic batch)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            output_names=["out"],
            dynamic_axes={"x": {0: "batch"}, "out": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE if preserve else torch.onnx.TrainingMode.EVAL,
        )
    return buf.getvalue()


@dataclass
class Case:
    onnx_model: bytes
    torch_fn: TorchFn  # params by ONNX name, batch -> model output
    x: np.ndarray
    y: np.ndarray
    loss: str = "cross_entropy"
    head: str = "logits"  # how the model output meets the loss: logits | probs | log_probs


def module_case(
    module: torch.nn.Module, x: np.ndarray, classes: int, *, preserve: bool = False, **kw: Any
) -> Case:
    """A case from a torch module: ONNX initializer names are its parameter names."""
    module = module.to(torch.float64 if x.dtype == np.float64 else torch.float32).eval()
    model = export(module, torch.from_numpy(x), preserve)
    reference = copy.deepcopy(module).double()  # torch computes in float64: the exact side

    def fn(params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(reference, params, (xb,))

    y = np.random.default_rng(1).integers(0, classes, len(x))
    return Case(model, fn, x, y, **kw)


def rand(*shape: int, dtype: Any = np.float64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# --- ONNX side ------------------------------------------------------------------------------


def onnx_steps(
    art: TrainingArtifacts, x: np.ndarray, y: np.ndarray, lr: float, steps: int
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Run the train-step graph ``steps`` times on one batch, threading params and state."""
    tr = art.manifest["training"]
    sess = ort.InferenceSession(art.files["train_step.onnx"], providers=["CPUExecutionProvider"])
    dtype = art.manifest["parameters"][0]["dtype"]
    params = dict(art.initial_weights)
    state = {s["input"]: np.full(s["shape"], s["init"], dtype) for s in tr["state"]}
    outs = [p["output"] for p in tr["params"]] + [s["output"] for s in tr["state"]]
    losses = []
    for _ in range(steps):
        feeds = {tr["data_input"]: x, tr["label_input"]: y, tr["lr_input"]: np.array(lr, dtype)}
        got = sess.run([*outs, tr["loss_output"]], {**feeds, **params, **state})
        params = {p["name"]: v for p, v in zip(tr["params"], got, strict=False)}
        state = {s["input"]: v for s, v in zip(tr["state"], got[len(tr["params"]) :], strict=False)}
        losses.append(float(got[-1]))
    return params, losses


# --- torch side -----------------------------------------------------------------------------


def torch_loss(case: Case, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if case.loss == "mse":
        return torch.nn.functional.mse_loss(out, y)
    if case.head == "probs":
        return torch.nn.functional.nll_loss(torch.log(out), y)
    if case.head == "log_probs":
        return torch.nn.functional.nll_loss(out, y)
    return torch.nn.functional.cross_entropy(out, y)


def torch_optimizer(spec: dict[str, Any], params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if spec["name"] == "sgd":
        return torch.optim.SGD(params, lr=spec["lr"])
    if spec["name"] == "momentum":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec["momentum"])
    betas = (spec["beta1"], spec["beta2"])
    return torch.optim.Adam(params, lr=spec["lr"], betas=betas, eps=spec["eps"])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(b))), 1e-12)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b))) / scale


def check(case: Case, optimizer: dict[str, Any] | None = None, steps: int = 1) -> None:
    """ONNX and torch agree on the losses, the updated parameters and (for one SGD step) the
    gradient the update implies."""
    optimizer = optimizer or {"name": "sgd", "lr": 0.5}
    art = build_onnx_training(case.onnx_model, loss=case.loss, optimizer=optimizer)
    spec = art.manifest["optimizer"]
    params, losses = onnx_steps(art, case.x, case.y, spec["lr"], steps)

    w0 = {k: torch.tensor(v.astype(np.float64)) for k, v in art.initial_weights.items()}
    tparams = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    opt = torch_optimizer(spec, list(tparams.values()))
    xt = torch.from_numpy(case.x.astype(np.float64))
    yt = torch.from_numpy(case.y)
    for step in range(steps):
        opt.zero_grad()
        cast = {k: v.to(xt.dtype) for k, v in tparams.items()}
        loss = torch_loss(case, case.torch_fn(cast, xt), yt)
        loss.backward()
        if step == 0:
            grads = {k: v.grad.detach().numpy().copy() for k, v in tparams.items()}
        opt.step()
        assert rel_err(np.array(losses[step]), loss.detach().numpy()) <= TOL, (step, losses)
    for name, p in tparams.items():
        assert params[name].dtype == art.initial_weights[name].dtype
        assert params[name].shape == art.initial_weights[name].shape
        assert rel_err(params[name], p.detach().numpy()) <= TOL, name
        if steps == 1 and spec["name"] == "sgd":  # the gradient itself, not just w - lr*g
            w = art.initial_weights[name].astype(np.float64)
            implied = (w - params[name]) / spec["lr"]
            # w - lr*g is rounded to the parameter's precision: that bounds what we can see of g
            eps = np.finfo(params[name].dtype).eps
            noise = 4 * eps * max(float(np.max(np.abs(w))), 1.0) / spec["lr"]
            err = float(np.max(np.abs(implied - grads[name])))
            assert err <= TOL * float(np.max(np.abs(grads[name]))) + noise, (name, err)


# --- cases ----------------------------------------------------------------------------------


class Lambda(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def seq(*layers: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*layers)


class Broadcasts(torch.nn.Module):
    """Add/Sub/Mul/Div/Neg whose parameters broadcast against a 3-D activation."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(4, generator=g))
        self.b = torch.nn.Parameter(torch.randn(3, 1, generator=g))
        self.c = torch.nn.Parameter(torch.rand(1, 1, 4, generator=g) + 1.0)
        self.d = torch.nn.Parameter(torch.randn(3, 4, generator=g))
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = -((x * self.a - self.b) / self.c) + self.d
        return self.fc(torch.flatten(h * h, 1))


class Bilinear3D(torch.nn.Module):
    """MatMul with a shared 2-D weight on a 3-D input, then activation @ activation^T."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
        self.fc = torch.nn.Linear(25, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w  # [B, 5, 3]
        return self.fc(torch.flatten(h @ h.transpose(1, 2), 1))


class ViewReshape(torch.nn.Module):
    """x.view(x.size(0), -1) exports a Shape/Gather/Concat subgraph feeding Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.view(x.size(0), -1)).reshape(-1, 2, 3).unsqueeze(1)
        return self.fc2(torch.tanh(h).reshape(h.size(0), -1))


def conv_net(conv: torch.nn.Module, x: np.ndarray, tail: int, **kw: Any) -> Case:
    """Conv(1->4) -> Relu -> <conv under test> -> Flatten -> Linear: the second conv needs
    gradients for its input as well as its weights."""
    torch.manual_seed(0)
    first = (
        torch.nn.Conv2d(x.shape[1], 4, 3, padding=1)
        if x.ndim == 4
        else torch.nn.Conv1d(x.shape[1], 4, 3, padding=1)
    )
    net = torch.nn.Sequential(
        first, torch.nn.ReLU(), conv, torch.nn.Flatten(), torch.nn.LazyLinear(3)
    )
    net(torch.from_numpy(x))  # materialise the lazy layer
    return module_case(net, x, 3, **kw)


def _gemm_graph(trans_a: int, trans_b: int, c_shape: tuple[int, ...]) -> Case:
    """Hand-built: h = x W0^T; out = 0.7 op(h') op(W) + 1.3 C, h' = h^T when transA."""
    k, n = 5, 3
    w0, w = rand(k, 4, seed=1), rand(*((n, k) if trans_b else (k, n)), seed=2)
    c = rand(*c_shape, seed=3)
    nodes = [helper.make_node("Gemm", ["x", "W0"], ["h"], transB=1, name="first")]
    a_in = "h"
    if trans_a:
        nodes.append(helper.make_node("Transpose", ["h"], ["hT"], perm=[1, 0], name="t"))
        a_in = "hT"
    nodes.append(
        helper.make_node(
            "Gemm",
            [a_in, "W", "C"],
            ["out"],
            transA=trans_a,
            transB=trans_b,
            alpha=0.7,
            beta=1.3,
            name="gemm_under_test",
        )
    )
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.DOUBLE, ["batch", n])],
        initializer=[
            numpy_helper.from_array(v, k_) for k_, v in {"W0": w0, "W": w, "C": c}.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    alpha, beta = float(np.float32(0.7)), float(np.float32(1.3))  # ONNX float attributes

    def fn(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        h = xb @ p["W0"].T
        return alpha * h @ (p["W"].T if trans_b else p["W"]) + beta * p["C"]

    x = rand(7, 4)
    return Case(model.SerializeToString(), fn, x, np.arange(7) % n)


X2 = rand(8, 6)
X3 = rand(6, 3, 4)
XIMG = rand(5, 2, 9, 9, dtype=np.float32)

CASES: dict[str, Callable[[], Case]] = {
    "linear_gemm": lambda: module_case(seq(torch.nn.Linear(6, 4)), X2, 4),
    "gemm_transA": lambda: _gemm_graph(1, 0, (3,)),
    "gemm_transB": lambda: _gemm_graph(0, 1, (1, 3)),
    "gemm_transAB": lambda: _gemm_graph(1, 1, ()),
    "gemm_plain": lambda: _gemm_graph(0, 0, (1,)),
    "matmul_add": lambda: Case(
        digits_softmax_onnx(),
        lambda p, xb: xb @ p["W"] + p["b"],
        rand(9, 64),
        np.arange(9) % 10,
    ),
    "matmul_3d": lambda: module_case(Bilinear3D(), rand(6, 5, 4), 4),
    "add_sub_mul_div_neg": lambda: module_case(Broadcasts(), X3, 5),
    "relu": lambda: module_case(
        seq(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), X2, 3
    ),
    "sigmoid": lambda: module_case(
        seq(torch.nn.Linear(6, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 3)), X2, 3
    ),
    "tanh": lambda: module_case(
        seq(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)), X2, 3
    ),
    "softmax_inside": lambda: module_case(
        seq(torch.nn.Linear(6, 8), torch.nn.Softmax(dim=1), torch.nn.Linear(8, 3)), X2, 3
    ),
    "log_softmax_inside": lambda: module_case(
        seq(torch.nn.Linear(6, 8), torch.nn.LogSoftmax(dim=-1), torch.nn.Linear(8, 3)), X2, 3
    ),
    "softmax_head": lambda: module_case(
        seq(torch.nn.Linear(6, 4), torch.nn.Softmax(dim=1)), X2, 4, head="probs"
    ),
    "log_softmax_head": lambda: module_case(
        seq(torch.nn.Linear(6, 4), torch.nn.LogSoftmax(dim=1)), X2, 4, head="log_probs"
    ),
    "flatten": lambda: module_case(seq(torch.nn.Flatten(), torch.nn.Linear(12, 3)), X3, 3),
    "reshape_unsqueeze": lambda: module_case(ViewReshape(), rand(6, 2, 3), 3),
    "mse": lambda: Case(
        export(
            seq(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double(),
            torch.from_numpy(X2),
        ),
        lambda p, xb: (
            torch.tanh(xb @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]
        ),
        X2,
        rand(8, 2, seed=5),
        loss="mse",
    ),
    "conv": lambda: conv_net(torch.nn.Conv2d(4, 3, 3, stride=2, padding=1), XIMG, 3),
    "conv_dilated": lambda: conv_net(torch.nn.Conv2d(4, 3, 3, padding=2, dilation=2), XIMG, 3),
    "conv_odd_strides": lambda: conv_net(
        torch.nn.Conv2d(4, 3, (3, 2), stride=(2, 3), padding=(1, 0)), XIMG, 3
    ),
    "conv_group": lambda: conv_net(torch.nn.Conv2d(4, 6, 3, stride=2, groups=2), XIMG, 3),
    "conv_depthwise": lambda: conv_net(torch.nn.Conv2d(4, 4, 3, padding=1, groups=4), XIMG, 3),
    "conv1d": lambda: conv_net(
        torch.nn.Conv1d(4, 3, 3, stride=2), rand(5, 2, 11, dtype=np.float32), 3
    ),
    "maxpool": lambda: conv_net(torch.nn.MaxPool2d(2), XIMG, 3),
    "maxpool_overlap": lambda: conv_net(torch.nn.MaxPool2d(3, stride=2, padding=1), XIMG, 3),
    "avgpool": lambda: conv_net(torch.nn.AvgPool2d(2), XIMG, 3),
    "avgpool_pad_counted": lambda: conv_net(torch.nn.AvgPool2d(3, 2, padding=1), XIMG, 3),
    "avgpool_pad_excluded": lambda: conv_net(
        torch.nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), XIMG, 3
    ),
    "global_avgpool": lambda: conv_net(torch.nn.AdaptiveAvgPool2d(1), XIMG, 3),
    "batchnorm2d": lambda: conv_net(_bn(torch.nn.BatchNorm2d(4)), XIMG, 3, preserve=True),
    "batchnorm1d": lambda: module_case(
        seq(
            torch.nn.Linear(6, 5),
            _bn(torch.nn.BatchNorm1d(5)),
            torch.nn.ReLU(),
            torch.nn.Linear(5, 3),
        ),
        X2,
        3,
        preserve=True,
    ),
}


def _bn(bn: torch.nn.Module) -> torch.nn.Module:
    """A BatchNorm with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.normal_(generator=g)
        bn.bias.normal_(generator=g)
    return bn


@pytest.mark.parametrize("name", list(CASES))
def test_one_sgd_step_matches_torch(name: str) -> None:
    check(CASES[name]())


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "momentum", "lr": 0.1, "momentum": 0.9},
        {"name": "adam", "lr": 0.01},
        {"name": "adam", "lr": 0.05, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6},
    ],
    ids=["momentum", "adam", "adam_custom"],
)
def test_stateful_optimizers_match_torch(optimizer: dict[str, Any]) -> None:
    case = module_case(seq(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), X2, 3)
    check(case, optimizer, steps=4)


def test_exported_mlp_matches_torch_over_steps() -> None:
    case = module_case(
        seq(
            torch.nn.Linear(6, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 8),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 4),
        ),
        rand(12, 6, dtype=np.float32),
        4,
    )
    check(case, {"name": "sgd", "lr": 0.2}, steps=5)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_exported_cnn_matches_torch_over_steps(batchnorm: bool) -> None:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(1, 4, 3, padding=1)]
    if batchnorm:
        layers.append(_bn(torch.nn.BatchNorm2d(4)))
    layers += [torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 10)]
    x = rand(10, 1, 8, 8, dtype=np.float32)
    case = module_case(torch.nn.Sequential(*layers), x, 10, preserve=batchnorm)
    ops = set(build_onnx_training(case.onnx_model).manifest["ops"])
    assert ({"BatchNormalization"} <= ops) == batchnorm
    check(case, {"name": "sgd", "lr": 0.1}, steps=4)


def test_an_older_opset_is_converted_first() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(18, 3),
        torch.nn.Softmax(dim=1),
    ).eval()
    x = rand(6, 1, 8, 8, dtype=np.float32)
    case = module_case(net, x, 3, head="probs")
    case.onnx_model = export(net, torch.from_numpy(x), opset=11)
    assert onnx.load_from_string(case.onnx_model).opset_import[0].version == 11
    assert build_onnx_training(case.onnx_model).manifest["training"]["opset"] == 17
    check(case)


def test_shipped_digits_models_train_like_torch() -> None:
    """The committed .onnx files load, package, and step like torch would."""
    mlp = Case(
        digits_mlp_onnx(),
        lambda p, xb: torch.relu(xb @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"],
        rand(16, 64, dtype=np.float32),
        np.arange(16) % 10,
    )
    check(mlp, {"name": "sgd", "lr": 0.1}, steps=3)

    def cnn(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.conv2d(xb, p["conv.weight"], p["conv.bias"], padding=1)
        h = torch.flatten(torch.nn.functional.max_pool2d(torch.relu(h), 2), 1)
        return h @ p["fc.weight"].T + p["fc.bias"]

    check(
        Case(digits_cnn_onnx(), cnn, rand(16, 1, 8, 8, dtype=np.float32), np.arange(16) % 10),
        {"name": "sgd", "lr": 0.1},
        steps=3,
    )


# --- the artifacts ----------------------------------------------------------------------------


def test_manifest_describes_the_graphs() -> None:
    art = build_onnx_training(digits_cnn_onnx(), optimizer={"name": "adam", "lr": 0.01})
    m = art.manifest
    assert art.framework == "onnx"
    assert set(art.files) == {"model.onnx", "train_step.onnx", "eval.onnx"}
    assert art.files["model.onnx"] == digits_cnn_onnx()
    assert [p["name"] for p in m["parameters"]] == [
        "conv.weight",
        "conv.bias",
        "fc.weight",
        "fc.bias",
    ]
    assert m["parameters"][0] == {"name": "conv.weight", "dtype": "float32", "shape": [8, 1, 3, 3]}
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 1, 8, 8]}]
    assert m["labels"]["dtype"] == "int64"
    assert m["labels"]["shape"] == [-1]
    assert m["optimizer"] == {"name": "adam", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    assert m["ops"] == sorted(["Conv", "Relu", "MaxPool", "Flatten", "Gemm"])
    tr = m["training"]
    assert len(tr["state"]) == 1 + 2 * 4  # step + (m, v) per parameter
    for name in ("train_step.onnx", "eval.onnx"):
        onnx.checker.check_model(onnx.load_from_string(art.files[name]))
        sess = ort.InferenceSession(art.files[name], providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        assert {p["name"] for p in m["parameters"]} <= names
    train = ort.InferenceSession(art.files["train_step.onnx"], providers=["CPUExecutionProvider"])
    assert {i.name for i in train.get_inputs()} == {
        tr["data_input"],
        tr["label_input"],
        tr["lr_input"],
        *(p["input"] for p in tr["params"]),
        *(s["input"] for s in tr["state"]),
    }
    assert {o.name for o in train.get_outputs()} == {
        tr["loss_output"],
        *(p["output"] for p in tr["params"]),
        *(s["output"] for s in tr["state"]),
    }
    for name, w in art.initial_weights.items():
        assert w.dtype == np.float32
        assert list(w.shape) == next(p["shape"] for p in m["parameters"] if p["name"] == name)


def test_eval_graph_gives_loss_and_logits() -> None:
    case = CASES["relu"]()
    art = build_onnx_training(case.onnx_model)
    tr = art.manifest["training"]
    sess = ort.InferenceSession(art.files["eval.onnx"], providers=["CPUExecutionProvider"])
    loss, logits = sess.run(
        [tr["eval_loss_output"], tr["eval_logits_output"]],
        {tr["data_input"]: case.x, tr["eval_label_input"]: case.y, **art.initial_weights},
    )
    w = {k: torch.from_numpy(v) for k, v in art.initial_weights.items()}
    ref = case.torch_fn(w, torch.from_numpy(case.x))
    assert rel_err(logits, ref.detach().numpy()) <= TOL
    ref_loss = torch.nn.functional.cross_entropy(ref, torch.from_numpy(case.y))
    assert rel_err(np.array(loss), ref_loss.detach().numpy()) <= TOL


def test_bn_running_stats_are_frozen_and_explicit_trainable_is_honoured() -> None:
    case = CASES["batchnorm1d"]()
    default = build_onnx_training(case.onnx_model).manifest["parameters"]
    names = [p["name"] for p in default]
    assert "1.weight" in names
    assert "1.bias" in names
    assert not any("running" in n for n in names)
    only_head = build_onnx_training(case.onnx_model, trainable=["3.weight", "3.bias"])
    params, _ = onnx_steps(only_head, case.x, case.y, 0.5, 1)
    assert set(params) == {"3.weight", "3.bias"}
    with pytest.raises(UnsupportedModelError, match="running mean/var"):
        build_onnx_training(case.onnx_model, trainable=["1.running_mean"])
    with pytest.raises(ValueError, match="not an initializer"):
        build_onnx_training(case.onnx_model, trainable=["nope"])


# --- what it refuses --------------------------------------------------------------------------


def _einsum_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "W"], ["out"], equation="bi,ij->bj", name="mix")],
        "einsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(rand(4, 3, dtype=np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


class Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 5, batch_first=True)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


def test_unsupported_ops_are_named() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Einsum.*'mix'"):
        build_onnx_training(_einsum_model())
    lstm = export(Recurrent(), torch.zeros(2, 6, 4))
    with pytest.raises(UnsupportedModelError, match="LSTM"):
        build_onnx_training(lstm)


def test_weight_behind_an_op_without_gradient_rule_is_refused() -> None:
    """A trainable weight reached only through Concat cannot be differentiated."""
    graph = helper.make_graph(
        [
            helper.make_node("Concat", ["x", "extra"], ["cat"], axis=1, name="join"),
            helper.make_node("Gemm", ["cat", "W"], ["out"], name="head"),
        ],
        "concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(rand(2, 2, dtype=np.float32), "extra"),
            numpy_helper.from_array(rand(6, 3, dtype=np.float32), "W"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match=r"Concat node 'join'"):
        build_onnx_training(model, trainable=["extra", "W"])
    art = build_onnx_training(model)  # by default only W (a Gemm weight) trains
    assert [p["name"] for p in art.manifest["parameters"]] == ["W"]


def test_float64_conv_is_refused_with_the_reason() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    model = export(net.double(), torch.zeros(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(UnsupportedModelError, match="no float64 kernel for Conv"):
        build_onnx_training(model)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_onnx_training(digits_softmax_onnx(), optimizer={"name": "lbfgs"})
    with pytest.raises(ValueError, match=r"no setting\(s\) \['beta1'\]"):
        build_onnx_training(digits_softmax_onnx(), optimizer={"name": "sgd", "beta1": 0.9})
    with pytest.raises(ValueError, match="unknown loss"):
        build_onnx_training(digits_softmax_onnx(), loss="hinge")
