"""What a framework-specific package builder hands to the package format.

Builders (ONNX, LiteRT) derive the files a device needs from an exported model; the package
format (``edgefl.packages.format``) wraps them with a manifest, digests and a signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TrainingArtifacts:
    """The device-side files of one model, and the framework-neutral facts about it.

    ``manifest`` holds: ``parameters`` (list of {name, dtype, shape}), ``inputs`` (list of
    {name, dtype, shape}), ``labels`` ({name, dtype, shape}), ``loss``, ``optimizer``
    ({name, lr, ...}) and ``training``, the framework-specific names a trainer needs
    (graph inputs/outputs, signature names). ``initial_weights`` are the exported model's
    parameters: the session's first global model.
    """

    framework: str  # "onnx" | "tflite"
    files: dict[str, bytes]
    manifest: dict[str, Any]
    initial_weights: dict[str, np.ndarray] = field(default_factory=dict)
