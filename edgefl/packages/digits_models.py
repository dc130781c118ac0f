"""The digits task's models as forward ONNX graphs, for packaging with ``onnx_autodiff``.

The softmax model is built here with ``onnx.helper`` (it is the canonical float64 model that
reproduces the numpy reference); the MLP and the CNN were exported once with torch by
``tools/export_digits_models.py`` and ship as small .onnx files, so nothing here needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MODELS_DIR = Path(__file__).with_name("models")
N_FEATURES, N_CLASSES = 64, 10


def digits_softmax_onnx(dtype: Any = np.float64) -> bytes:
    """Softmax regression 64->10 as ``logits = x @ W + b`` with W[64,10], b[10] at zero.

    Parameter names and shapes are the numpy reference model's (``W``, ``b``), so weights move
    freely between the numpy and the ONNX trainers. float64 reproduces the reference exactly.
    """
    from onnx import TensorProto, helper, numpy_helper

    np_dtype = np.dtype(dtype)
    if np_dtype not in (np.float32, np.float64):
        raise ValueError(f"digits_softmax_onnx supports float32 and float64, not {np_dtype}")
    elem = TensorProto.DOUBLE if np_dtype == np.float64 else TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xW"], name="matmul"),
            helper.make_node("Add", ["xW", "b"], ["logits"], name="add_bias"),
        ],
        "digits_softmax",
        [helper.make_tensor_value_info("x", elem, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info("logits", elem, ["batch", N_CLASSES])],
        initializer=[
            numpy_helper.from_array(np.zeros((N_FEATURES, N_CLASSES), np_dtype), "W"),
            numpy_helper.from_array(np.zeros(N_CLASSES, np_dtype), "b"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="edgefl"
    )
    return bytes(model.SerializeToString())


def _shipped(name: str) -> bytes:
    path = MODELS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; regenerate it with `python tools/export_digits_models.py`"
        )
    return path.read_bytes()


def digits_mlp_onnx() -> bytes:
    """The digits MLP 64->32->10 (float32, torch export; names W1, b1, W2, b2 as in numpy)."""
    return _shipped("digits_mlp.onnx")


def digits_cnn_onnx() -> bytes:
    """A small digits CNN over (batch, 1, 8, 8) inputs (float32, torch export):
    Conv 3x3 (8 channels) -> Relu -> MaxPool 2 -> Flatten -> Gemm 128->10."""
    return _shipped("digits_cnn.onnx")
