"""Trainer plug-ins. Each trainer turns (global weights, task) into (new weights, n, metrics)."""

from device_agent.trainers.base import (
    CallableTrainer,
    Trainer,
    TrainResult,
    TrainTask,
    load_trainer,
)

__all__ = ["CallableTrainer", "TrainResult", "TrainTask", "Trainer", "load_trainer"]
