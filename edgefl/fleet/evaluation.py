"""Server-side evaluation of a model package, through the same runtime the devices train with.

It lives beside the simulated fleet because it runs device code (the package trainers) on the
server: the model is scored with the very graph the devices train, so nothing is
re-implemented that could disagree.
"""

from __future__ import annotations

from collections.abc import Callable

from device_agent.trainers.package_trainer import PackageTrainer
from edgefl.packages.format import ModelPackage
from edgefl.protocol.types import Weights
from edgefl.tasks import digits


def package_evaluator(package: ModelPackage) -> Callable[[Weights], dict[str, float]]:
    """Evaluation on the digits task's 360-sample held-out split, for the controller."""
    d = digits.load()
    evaluator = PackageTrainer(d.Xte, d.yte)
    evaluator.load_package(package)
    return evaluator.evaluate
