"""Build the trainable LiteRT (TFLite) digits model that edgefl federates.

A workstation tool: it needs TensorFlow, and edgefl never imports it. It follows TensorFlow's
on-device training guide (a ``tf.Module`` with ``train``/``infer``/``save``/``restore``
signatures, converted with resource variables) with three deliberate differences:

* ``save()`` returns the variables as named outputs and ``restore(**variables)`` assigns them,
  instead of writing and reading a checkpoint file: edgefl exchanges weights as named numpy
  tensors (protocol v1), and the guide's checkpoint variant would need TensorFlow's checkpoint
  reader (``tf.raw_ops.Save``/``Restore``, Flex ops) on the device.
* ``train`` takes the learning rate as a scalar input ``lr``, so the controller's ``train.lr``
  reaches the device at run time.
* Only TFLite builtin ops (no ``SELECT_TF_OPS``): ``ai-edge-litert`` and ``tflite-runtime``
  ship without the Flex delegate. The gradients TF would emit as Flex ops are avoided: the
  cross-entropy and the ReLU have hand-written gradients (``(softmax - onehot) / B`` and a
  mask multiply), and the bias adds use ``tf.nn.bias_add`` (its gradient is a plain reduction).

Contract (what ``edgefl.packages.tflite.build_tflite_training`` checks):

* ``train(x: float32[B, 64], y: int32[B], lr: float32[]) -> {"loss"}``: one SGD step on the
  batch's mean cross-entropy; B is dynamic, so the protocol's partial last batch just works.
* ``infer(x: float32[B, 64]) -> {"logits": float32[B, 10]}``.
* ``save() -> {name: tensor}`` and ``restore(**{name: tensor}) -> {name: tensor}`` (returns
  what it assigned), with the same names: ``W``, ``b`` (softmax) or ``W1``, ``b1``, ``W2``,
  ``b2`` (MLP), as in the numpy reference models (``edgefl.models.numpy_models``).
* Model metadata ``edgefl_training``: JSON with the baked-in loss and optimizer.

Built for the committed fixtures with tensorflow-cpu 2.21.0 on Python 3.11 (Linux x86_64)::

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfvenv/bin/python tools/build_tflite_model.py
    /tmp/tfvenv/bin/python tools/build_tflite_model.py --model mlp \\
        --out edgefl/packages/models/digits_litert_mlp.tflite
    /tmp/tfvenv/bin/python tools/build_tflite_model.py --without restore \\
        --out edgefl/packages/models/digits_litert_no_restore.tflite
    /tmp/tfvenv/bin/python tools/build_tflite_model.py --select-tf-ops \\
        --out edgefl/packages/models/digits_litert_flex.tflite
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "edgefl" / "packages" / "models" / "digits_litert.tflite"
SIGNATURES = ("train", "infer", "save", "restore")
METADATA_NAME = "edgefl_training"
N_FEATURES, N_CLASSES = 64, 10


def initial_weights(model: str, hidden: int, seed: int) -> dict[str, Any]:
    """The numpy reference model's initial weights (``edgefl.models.numpy_models.init_weights``:
    same names, same draws), in float32. Repeated here so this tool needs only TensorFlow."""
    import numpy as np

    if model == "softmax":
        w = {"W": np.zeros((N_FEATURES, N_CLASSES)), "b": np.zeros(N_CLASSES)}
    else:
        rng = np.random.default_rng(seed)
        w = {
            "W1": rng.normal(0.0, np.sqrt(2.0 / N_FEATURES), (N_FEATURES, hidden)),
            "b1": np.zeros(hidden),
            "W2": rng.normal(0.0, np.sqrt(1.0 / hidden), (hidden, N_CLASSES)),
            "b2": np.zeros(N_CLASSES),
        }
    return {k: v.astype(np.float32) for k, v in w.items()}


def build_module(
    weights: dict[str, Any], without: str | None, select_tf_ops: bool = False
) -> tuple[Any, dict[str, Any]]:
    """A tf.Module with the four signatures (minus ``without``) over ``weights`` as variables.

    ``select_tf_ops`` uses TF's own sparse cross-entropy, as the guide does; its gradient is a
    Flex op, so the result only runs where the Flex delegate exists (a refusal fixture).
    """
    import tensorflow as tf

    @tf.custom_gradient
    def cross_entropy(z: Any, onehot: Any) -> Any:
        # Mean cross-entropy with its gradient written out: TF's own gradients of
        # sparse_softmax_cross_entropy and of a broadcasting multiply are Flex-only ops.
        batch = tf.cast(tf.shape(z)[0], z.dtype)
        loss = -tf.reduce_sum(onehot * tf.nn.log_softmax(z)) / batch

        def grad(g: Any) -> Any:
            return g * (tf.nn.softmax(z) - onehot) / batch, tf.zeros_like(onehot)

        return loss, grad

    @tf.custom_gradient
    def relu(h: Any) -> Any:
        # TF's ReluGrad is a Flex-only op; the mask-multiply is builtin.
        def grad(g: Any) -> Any:
            return g * tf.cast(h > 0, h.dtype)

        return tf.nn.relu(h), grad

    names = list(weights)
    specs = [tf.TensorSpec(weights[n].shape, tf.float32, name=n) for n in names]
    x_spec = tf.TensorSpec([None, N_FEATURES], tf.float32, name="x")

    class DigitsModel(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vars = {n: tf.Variable(weights[n], name=n) for n in names}

        def logits(self, x: Any) -> Any:
            v = self.vars
            if "W" in v:
                return tf.nn.bias_add(tf.matmul(x, v["W"]), v["b"])
            h = relu(tf.nn.bias_add(tf.matmul(x, v["W1"]), v["b1"]))
            return tf.nn.bias_add(tf.matmul(h, v["W2"]), v["b2"])

        @tf.function(
            input_signature=[
                x_spec,
                tf.TensorSpec([None], tf.int32, name="y"),
                tf.TensorSpec([], tf.float32, name="lr"),
            ]
        )
        def train(self, x: Any, y: Any, lr: Any) -> Any:
            variables = [self.vars[n] for n in names]
            with tf.GradientTape() as tape:
                if select_tf_ops:
                    loss = tf.reduce_mean(
                        tf.nn.sparse_softmax_cross_entropy_with_logits(y, self.logits(x))
                    )
                else:
                    loss = cross_entropy(self.logits(x), tf.one_hot(y, N_CLASSES))
            grads = tape.gradient(loss, variables)
            for var, g in zip(variables, grads, strict=True):
                var.assign_sub(lr * g)
            return {"loss": loss}

        @tf.function(input_signature=[x_spec])
        def infer(self, x: Any) -> Any:
            return {"logits": self.logits(x)}

        @tf.function(input_signature=[])
        def save(self) -> Any:
            return {n: tf.identity(self.vars[n]) for n in names}

        @tf.function(input_signature=specs)
        def restore(self, *values: Any) -> Any:
            for n, value in zip(names, values, strict=True):
                self.vars[n].assign(value)
            return {n: tf.identity(self.vars[n]) for n in names}

    module = DigitsModel()
    signatures = {
        name: getattr(module, name).get_concrete_function()
        for name in SIGNATURES
        if name != without
    }
    return module, signatures


def convert(module: Any, signatures: dict[str, Any], select_tf_ops: bool = False) -> bytes:
    """SavedModel -> TFLite with resource variables (as in the guide), builtin ops only
    unless ``select_tf_ops``."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if select_tf_ops:
            converter.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())


def add_metadata(model: bytes, meta: dict[str, Any]) -> bytes:
    """Append ``edgefl_training`` metadata so the package builder can check the declared loss
    and optimizer against what the graph really does."""
    from tensorflow.lite.python import schema_py_generated as schema_fb
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    buf = schema_fb.BufferT()
    buf.data = list(json.dumps(meta, sort_keys=True).encode())
    obj.buffers.append(buf)
    entry = schema_fb.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(obj.buffers) - 1
    obj.metadata = [*(obj.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def main(argv: list[str] | None = None) -> int:
    """Build the model and write it; prints one JSON line describing what was written."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("softmax", "mlp"), default="softmax")
    ap.add_argument("--hidden", type=int, default=32, help="MLP hidden units")
    ap.add_argument("--seed", type=int, default=0, help="MLP weight init seed")
    ap.add_argument("--lr", type=float, default=0.1, help="default lr recorded in the metadata")
    ap.add_argument(
        "--without",
        choices=SIGNATURES,
        help="leave one signature out (builds the refusal fixture for the tests)",
    )
    ap.add_argument(
        "--select-tf-ops",
        action="store_true",
        help="TF's sparse cross-entropy + SELECT_TF_OPS, as in the guide: needs the Flex "
        "delegate, so edgefl refuses it (builds the second refusal fixture)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    weights = initial_weights(args.model, args.hidden, args.seed)
    module, signatures = build_module(weights, args.without, args.select_tf_ops)
    meta = {
        "format": "edgefl-litert-training",
        "version": 1,
        "model": args.model,
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": args.lr},
        "built_with": f"tensorflow {tf.__version__}",
    }
    model = add_metadata(convert(module, signatures, args.select_tf_ops), meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)
    print(
        json.dumps(
            {"out": str(args.out), "bytes": len(model), "signatures": sorted(signatures), **meta}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
