"""Run the real edgefl device agent with the PyTorch digits trainer.

    python examples/pytorch/run_agent.py --broker-url mqtt://broker:1883 \\
        --region region-0 --device-id jetson-01 --data-path local.npz

The device token goes in ``EDGEFL_PASSWORD``. ``--help`` lists every flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from device_agent.trainers.base import Trainer

_HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    # examples/ is not a package: put this folder (trainer.py) and its parent (_runner.py)
    # first on the path, so the sibling modules are found however the script is started.
    for folder in (str(_HERE.parent), str(_HERE)):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    from _runner import run_agent

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--threads", type=int, help="torch intra-op threads (default: torch's choice)"
        )

    def make_trainer(args: argparse.Namespace, data_path: str) -> Trainer:
        # imported here: --help and bad flags answer without the framework's slow import
        from trainer import TorchDigitsTrainer

        return TorchDigitsTrainer(data_path=data_path, threads=args.threads)

    return run_agent(
        argv,
        prog="run_agent.py (pytorch)",
        description="edgefl device agent training the digits MLP with PyTorch.",
        trainer_name="pytorch-digits-example",
        make_trainer=make_trainer,
        add_arguments=add_arguments,
    )


if __name__ == "__main__":
    sys.exit(main())
