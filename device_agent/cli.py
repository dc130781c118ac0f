"""`edgefl-agent`: run one device agent (argparse only: no extra dependencies on devices)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig, load_config
from device_agent.trainers.base import Trainer, load_trainer
from edgefl.observability.logs import configure_logging
from edgefl.observability.tracing import configure_tracing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefl-agent",
        description="edgefl device agent: dials out to an MQTT broker, trains on local data, "
        "publishes chunked CBOR updates. Settings come from --config, then EDGEFL_* "
        "environment variables (e.g. EDGEFL_PASSWORD), then flags.",
    )
    p.add_argument("--config", help="JSON or TOML file with agent settings")
    p.add_argument("--broker-url", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--project")
    p.add_argument("--region")
    p.add_argument("--device-id")
    p.add_argument("--username", help="defaults to the device id when a password is set")
    p.add_argument("--trainer", help="trainer plug-in name (default: numpy)")
    p.add_argument("--data-path", help=".npz file with the device's local X and y")
    p.add_argument(
        "--package",
        help="a model package file (edgefl package build) to train; implies --trainer package",
    )
    p.add_argument("--trusted-key", help="Ed25519 public key (.pub) that signs packages")
    p.add_argument(
        "--require-signature",
        action="store_true",
        default=None,
        help="refuse unsigned packages (needs --trusted-key)",
    )
    p.add_argument("--package-cache", help="folder that keeps fetched packages by digest")
    p.add_argument("--seed", type=int, help="shuffling seed index")
    p.add_argument(
        "--ca-file",
        help="CA certificate (PEM) that must have signed the broker's certificate (mqtts://); "
        "default: the system's trusted CAs",
    )
    p.add_argument("--cert-file", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key-file", help="private key (PEM) of --cert-file")
    p.add_argument(
        "--tls-insecure",
        action="store_true",
        default=None,
        help="do NOT verify the broker's certificate or name (lab brokers only; logged as "
        "INSECURE)",
    )
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg: AgentConfig = load_config(
            args.config,
            broker_url=args.broker_url,
            project=args.project,
            region=args.region,
            device_id=args.device_id,
            username=args.username,
            trainer=args.trainer,
            data_path=args.data_path,
            seed=args.seed,
            package=args.package,
            trusted_key=args.trusted_key,
            require_signature=args.require_signature,
            package_cache=args.package_cache,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            tls_insecure=args.tls_insecure,
        )
        trainer = build_trainer(cfg)
        configure_logging(cfg.log_format == "json", args.log_level, cfg.log_file)
    except (ValueError, OSError) as exc:
        print(f"edgefl-agent: {exc}", file=sys.stderr)
        return 2
    configure_tracing(
        cfg.tracing,
        service_name="edgefl-agent",
        endpoint=cfg.otlp_endpoint,
        attributes={"edgefl.device": cfg.device_id, "edgefl.region": cfg.region},
    )
    return serve(cfg, trainer)


def serve(cfg: AgentConfig, trainer: Trainer) -> int:
    """Run one agent until stopped; warns loudly when it connects without credentials."""
    if cfg.tls_insecure:
        logging.getLogger("edgefl.security").warning(
            "INSECURE: tls_insecure is set: the broker's certificate is NOT verified, so "
            "anyone on the network path can impersonate the broker"
        )
    if cfg.password is None:
        logging.getLogger("edgefl.security").warning(
            "no password/token configured (EDGEFL_PASSWORD): connecting anonymously, "
            "which only a development broker accepts"
        )
    logging.info("starting agent with %s", cfg.redacted())
    return run_until_stopped(DeviceAgent(cfg, trainer))


def build_trainer(cfg: AgentConfig) -> Trainer:
    """The configured trainer on the device's data; with ``package``, loaded and verified.

    Raises ValueError (PackageError included) or OSError with a message for the operator.
    """
    kwargs = {"data_path": cfg.data_path} if cfg.trainer in ("numpy", "package") else {}
    trainer = load_trainer(cfg.trainer, **kwargs)
    if cfg.package is not None:
        from edgefl.packages.format import ModelPackage

        keys = None
        if cfg.trusted_key:  # cryptography costs ~8 MB of RSS: only to check signatures
            from edgefl.packages.signing import load_public_key

            keys = [load_public_key(cfg.trusted_key)]
        package = ModelPackage.read(
            cfg.package, trusted_keys=keys, require_signature=cfg.require_signature
        )
        trainer.load_package(package)  # type: ignore[attr-defined]
    return trainer


def run_until_stopped(agent: DeviceAgent) -> int:
    """Run an agent until SIGTERM or SIGINT, then stop it cleanly (offline status first)."""
    stop_on_signals()
    try:
        agent.start(timeout=None)
    except KeyboardInterrupt:  # stopped while still dialling the broker
        agent.stop()
        return 0
    agent.run_forever()  # stops the agent on KeyboardInterrupt
    return 0


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGINT into KeyboardInterrupt, the agent's clean stop.

    Service managers (systemd, Docker) stop a device with SIGTERM, whose default would kill
    the agent without its offline status; and a shell starts background jobs with SIGINT
    ignored, which would leave Ctrl-C-style stops without effect.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


if __name__ == "__main__":
    sys.exit(main())
