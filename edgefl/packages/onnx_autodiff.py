"""Training ONNX models on devices that have only ``onnxruntime``: the public entry point.

``build_onnx_training`` turns a forward graph exported with ``torch.onnx.export`` into a
training-step graph (forward, loss, reverse-mode backward, optimizer update) and an eval graph,
both in standard ONNX ops. The gradient rules live in ``onnx_ops``, the graph assembly in
``onnx_training``; docs/onnx-training.md lists the supported ops and the graphs' inputs/outputs.
"""

from __future__ import annotations

from edgefl.packages.onnx_ops import NO_FLOAT64, RULES, UnsupportedModelError
from edgefl.packages.onnx_training import LOSSES, OPTIMIZERS, build_onnx_training

SUPPORTED_OPS: frozenset[str] = frozenset(RULES)
"""Op types that may lie between a trainable parameter and the loss."""

__all__ = [
    "LOSSES",
    "NO_FLOAT64",
    "OPTIMIZERS",
    "SUPPORTED_OPS",
    "UnsupportedModelError",
    "build_onnx_training",
]
