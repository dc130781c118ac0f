"""The trainer for model packages: whatever the session's package is, trained on local data.

A device does not know in advance which model it will train: the session names a package
(ONNX or LiteRT, see docs/model-package.md), the agent fetches and verifies it, and this
trainer builds the framework's trainer for it. Each framework's runtime is imported only when
a package of that framework arrives, so an idle agent stays small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

from device_agent.trainers.base import Trainer, TrainResult, TrainTask
from device_agent.trainers.data import NoLocalData, load_local_data
from edgefl.protocol.types import Weights


class PackageTrainer:
    """Trains the loaded package on this device's data; ``load_package`` swaps the model.

    Raises ``RuntimeError`` from ``train`` before any package is loaded, and ``ValueError`` (or
    ``PackageError``) from ``load_package`` for a package this device cannot run: a framework
    without its runtime, inputs that do not fit the local data. The previous package, if any,
    stays loaded then. Not thread-safe: the agent's worker is its only caller. With no local
    examples it still starts (``local_examples`` is 0); ``load_package`` and ``train`` raise
    ``NoLocalData``, so the agent declines.
    """

    def __init__(
        self,
        X: np.ndarray | None = None,
        y: np.ndarray | None = None,
        data_path: str | Path | None = None,
        *,
        threads: int = 1,
    ) -> None:
        self.X, self.y = load_local_data(X, y, data_path, who="PackageTrainer")
        self.threads = threads
        self.package_digest: str | None = None
        self.package_name: str | None = None
        self._inner: Trainer | None = None

    @property
    def local_examples(self) -> int:
        return len(self.y)

    def load_package(self, package: Any) -> None:
        """Build the framework's trainer for ``package`` (a verified ``ModelPackage``)."""
        from edgefl.packages.format import apply_preprocessing, check_data_shape

        if len(self.y) == 0:
            raise NoLocalData("PackageTrainer")
        manifest = package.manifest
        check_data_shape(manifest, self.X, self.y)
        X = apply_preprocessing(manifest, self.X)
        framework = manifest["framework"]
        inner: Trainer
        if framework == "onnx":
            from device_agent.trainers.onnx_trainer import OnnxTrainer

            inner = OnnxTrainer.from_package(package, X, self.y, threads=self.threads)
        elif framework == "tflite":
            from device_agent.trainers.litert_trainer import LiteRtTrainer

            inner = LiteRtTrainer.from_package(package, X, self.y, threads=self.threads)
        else:  # pragma: no cover - the package format refuses other frameworks first
            raise ValueError(f"this agent cannot train {framework!r} packages")
        self._inner = inner
        self.package_digest = package.digest
        self.package_name = str(manifest.get("name", ""))

    def _loaded(self) -> Trainer:
        if self._inner is None:
            raise RuntimeError(
                "no model package loaded: the session names none and the agent was started "
                "without --package"
            )
        return self._inner

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
        return self._loaded().train(weights, task)

    def evaluate(self, weights: Weights) -> Dict[str, float]:
        inner: Any = self._loaded()
        result: Dict[str, float] = inner.evaluate(weights)
        return result
