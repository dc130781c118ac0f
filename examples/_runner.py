"""Run the real device agent with a trainer of your own: the shared part of the examples.

Each example's ``run_agent.py`` supplies a trainer factory; this module builds the
``AgentConfig`` the same way ``edgefl-agent`` does (``--config`` file, then ``EDGEFL_*``
environment variables such as ``EDGEFL_PASSWORD``, then flags) and runs
``DeviceAgent(config, trainer)`` until interrupted. Passwords and tokens are read from the
environment only, never from a flag, so they do not show up in the process list.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from device_agent.cli import serve
from device_agent.config import AgentConfig, load_config
from device_agent.trainers.base import Trainer

TrainerFactory = Callable[[argparse.Namespace, str], Trainer]  # (args, data_path) -> trainer


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The agent flags every example shares; examples add their own to the returned parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description + " Settings come from --config, then EDGEFL_* environment "
        "variables (the device token in EDGEFL_PASSWORD), then flags.",
    )
    p.add_argument("--config", help="JSON file with agent settings (AgentConfig field names)")
    p.add_argument("--broker-url", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--project", help="project name (topic prefix); default 'default'")
    p.add_argument("--region", help="the region whose combiner serves this device")
    p.add_argument("--device-id", help="this device's id (required here, in the env or config)")
    p.add_argument("--username", help="defaults to the device id when a password is set")
    p.add_argument("--data-path", help=".npz file with this device's local arrays X and y")
    p.add_argument("--seed", type=int, help="shuffling seed index (default: hash of device id)")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return p


def load_agent_config(args: argparse.Namespace, trainer_name: str) -> AgentConfig:
    """Merge the config file, the environment and the flags into an AgentConfig.

    Raises ValueError when no local data file is given: an example trainer cannot train
    without one, and failing at start beats failing at the first round.
    """
    cfg = load_config(
        args.config,
        broker_url=args.broker_url,
        project=args.project,
        region=args.region,
        device_id=args.device_id,
        username=args.username,
        trainer=trainer_name,
        data_path=args.data_path,
        seed=args.seed,
    )
    if not cfg.data_path:
        raise ValueError("no local data: pass --data-path (an .npz with arrays X and y)")
    return cfg


def run_agent(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    trainer_name: str,
    make_trainer: TrainerFactory,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse flags, build the trainer and run the agent until SIGINT or SIGTERM; exit code.

    Returns 2 for a bad configuration or unreadable data (the reason goes to stderr), 0
    after a clean stop (offline status published, connection closed).
    """
    parser = build_parser(prog, description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_agent_config(args, trainer_name)
        trainer = make_trainer(args, str(cfg.data_path))
    except (ValueError, OSError, KeyError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return serve(cfg, trainer)
