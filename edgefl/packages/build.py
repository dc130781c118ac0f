"""Build a model package from an exported model file (workstation / server side).

The framework is chosen by the file suffix: ``.onnx`` goes to the ONNX training-graph builder,
``.tflite`` to the LiteRT builder. Both builders are imported only when needed, so this module
imports (and ``.onnx`` packages build) even where LiteRT is not installed, and vice versa.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefl.packages.format import ModelPackage, PackageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgefl.packages.artifacts import TrainingArtifacts

SUFFIX_TO_FRAMEWORK = {".onnx": "onnx", ".tflite": "tflite"}
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "momentum", "adam")


def _builder(framework: str) -> Callable[..., TrainingArtifacts]:
    if framework == "onnx":
        from edgefl.packages.onnx_autodiff import build_onnx_training

        return build_onnx_training
    if framework == "tflite":
        from edgefl.packages.tflite import build_tflite_training

        return build_tflite_training
    raise PackageError(f"unsupported framework '{framework}'; supported: onnx, tflite")


def created_timestamp() -> str:
    """Now, or ``SOURCE_DATE_EPOCH`` when set, so rebuilding a package can give the same bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = time.gmtime(int(epoch)) if epoch else time.gmtime()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", t)


def optimizer_config(
    name: str = "sgd", lr: float | None = None, momentum: float = 0.9, **extra: Any
) -> dict[str, Any]:
    """The optimizer dict builders take, with edgefl's default learning rates filled in."""
    if name not in OPTIMIZERS:
        raise PackageError(f"unknown optimizer '{name}'; supported: {', '.join(OPTIMIZERS)}")
    if lr is None:
        lr = 0.001 if name == "adam" else 0.1
    if not lr > 0:
        raise PackageError(f"learning rate must be positive, got {lr}")
    opt: dict[str, Any] = {"name": name, "lr": float(lr)}
    if name == "momentum":
        opt["momentum"] = float(momentum)
    opt.update(extra)
    return opt


def build_package(
    model_path: str | os.PathLike[str],
    *,
    name: str | None = None,
    loss: str = "cross_entropy",
    optimizer: Mapping[str, Any] | None = None,
    labels: int | Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    signing_key: bytes | Ed25519PrivateKey | None = None,
    trainable: Sequence[str] | None = None,
    framework: str | None = None,
    created: str | None = None,
) -> ModelPackage:
    """Derive the training artifacts of an exported model and wrap them as a package.

    ``labels`` is the number of classes, or the class names (their count is the number);
    it is recorded as ``labels.num_classes`` / ``labels.classes`` so devices can check their
    local labels. ``framework`` overrides the suffix. The package is signed when a key is given.
    """
    path = Path(model_path)
    if framework is None:
        framework = SUFFIX_TO_FRAMEWORK.get(path.suffix.lower())
        if framework is None:
            raise PackageError(
                f"cannot tell the framework of {path.name}: expected a .onnx or .tflite file"
            )
    if loss not in LOSSES:
        raise PackageError(f"unknown loss '{loss}'; supported: {', '.join(LOSSES)}")
    if not path.is_file():
        raise PackageError(f"model file {path} does not exist")
    opt = dict(optimizer) if optimizer is not None else None  # None: the builder's defaults
    artifacts = _builder(framework)(path, loss=loss, optimizer=opt, trainable=trainable)

    label_spec = dict(artifacts.manifest.get("labels") or {})
    training = artifacts.manifest.get("training") or {}
    classes = training.get("classes", training.get("num_classes"))  # onnx, tflite builders
    if labels is None and isinstance(classes, int) and loss == "cross_entropy":
        label_spec.setdefault("num_classes", classes)  # the model's output width
    if labels is not None:
        if isinstance(labels, int):
            if labels <= 0:
                raise PackageError(f"labels must be a positive number of classes, got {labels}")
            label_spec["num_classes"] = labels
        else:
            classes = [str(c) for c in labels]
            label_spec["num_classes"] = len(classes)
            label_spec["classes"] = classes
    extra: dict[str, Any] = {"labels": label_spec} if label_spec else {}
    pkg = ModelPackage.from_artifacts(
        artifacts,
        name=name or path.stem,
        preprocessing=preprocessing,
        created=created or created_timestamp(),
        extra=extra,
    )
    if signing_key is not None:
        pkg.sign(signing_key)
    return pkg
