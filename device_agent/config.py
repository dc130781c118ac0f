"""Agent configuration from a file, the environment and flags (later sources win).

Plain dataclass + stdlib parsing on purpose: the agent must not need pydantic on a device.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "EDGEFL_"


@dataclass
class AgentConfig:
    """One device's settings; the defaults suit a development broker on this machine."""

    broker_url: str = "mqtt://127.0.0.1:1883"
    project: str = "default"
    region: str = "region-0"
    device_id: str = ""
    username: str | None = None  # defaults to device_id when a password/token is given
    password: str | None = None  # the device's JWT (or broker password)
    trainer: str = "numpy"  # "package" trains the session's model package (ONNX, LiteRT)
    data_path: str | None = None  # local training data (.npz with X and y)
    package: str | None = None  # a model package file to train (implies trainer "package")
    trusted_key: str | None = None  # Ed25519 public key (.pub) that must sign packages
    require_signature: bool = False  # refuse unsigned packages (needs trusted_key)
    package_cache: str | None = None  # folder that keeps fetched packages by digest
    seed: int | None = None  # shuffling seed index; defaults to a hash of device_id
    max_chunk_size: int = 1024 * 1024
    keepalive: int = 30
    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    download_timeout_s: float = 60.0
    fetch_after_s: float = 3.0  # ask the controller for a model that has not arrived by then
    # TLS (mqtts:// broker URLs): the broker's certificate is always verified, against ca_file
    # (the fleet's CA, from `edgefl ca init`) or else the system's trusted CAs.
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (CN = device id) for mutual TLS
    key_file: str | None = None  # its private key (mode 0600)
    tls_insecure: bool = False  # skip verifying the broker: lab only, logged as INSECURE
    # observability (docs/observability.md): JSON log lines with session/round/device ids,
    # and OpenTelemetry spans (needs the "tracing" extra; OTEL_* variables apply too)
    log_format: str = "text"  # or "json" (env EDGEFL_LOG_FORMAT)
    log_file: str | None = None  # append logs here instead of stderr
    tracing: str = "none"  # "otlp" or "console" (env EDGEFL_TRACING)
    otlp_endpoint: str | None = None  # default: OTEL_EXPORTER_OTLP_ENDPOINT, else localhost

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError(
                "device_id is required (flag --device-id, env EDGEFL_DEVICE_ID, or config file)"
            )
        if self.seed is None:
            self.seed = zlib.crc32(self.device_id.encode()) & 0x7FFFFFFF
        if self.password is not None and self.username is None:
            self.username = self.device_id
        if self.package is not None:
            self.trainer = "package"
        if self.require_signature and not self.trusted_key:
            raise ValueError(
                "require_signature needs trusted_key: the public key packages are signed with"
            )
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path!r}: no such file")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if self.tracing not in ("none", "console", "otlp"):
            raise ValueError(f"tracing must be none, console or otlp, got {self.tracing!r}")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file: the client certificate it belongs to")

    def redacted(self) -> dict[str, Any]:
        d = asdict(self)
        if d.get("password"):
            d["password"] = "***"
        return d


def _coerce(name: str, raw: str) -> Any:
    kind = {f.name: f.type for f in fields(AgentConfig)}[name]
    kind = str(kind)
    if kind == "bool":
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{ENV_PREFIX}{name.upper()} must be true or false, got {raw!r}")
    if "int" in kind and "str" not in kind:
        return int(raw)
    if "float" in kind:
        return float(raw)
    return raw


_PATH_KEYS = (
    "data_path",
    "package",
    "trusted_key",
    "package_cache",
    "ca_file",
    "cert_file",
    "key_file",
    "log_file",
)


def load_config(
    path: str | Path | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> AgentConfig:
    """Merge a JSON or TOML file, ``EDGEFL_*`` environment variables and explicit overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        text = p.read_text()
        try:
            loaded = _load_toml(text) if p.suffix == ".toml" else json.loads(text)
        except RecursionError as exc:
            raise ValueError(f"agent config {p}: nested too deeply") from exc
        if not isinstance(loaded, dict):
            raise ValueError(
                f"agent config {p} must hold a JSON object or TOML table, "
                f"not {type(loaded).__name__}"
            )
        # A relative path in a file means "next to this file", so a provisioning bundle
        # (agent.json beside ca.crt) works from any working directory.
        for key in _PATH_KEYS:
            value = loaded.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                loaded[key] = str(p.parent / value)
        values.update(loaded)
    names = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown agent config keys {unknown}; known: {sorted(names)}")
    source: Mapping[str, str] = os.environ if env is None else env
    for name in names:
        key = ENV_PREFIX + name.upper()
        if key in source:
            values[name] = _coerce(name, source[key])
    values.update({k: v for k, v in overrides.items() if v is not None})
    _check_types(values)
    return AgentConfig(**values)


def _check_types(values: Mapping[str, Any]) -> None:
    """Refuse a value of the wrong type (``"keepalive": "30"``) with the key in the message."""
    declared = {f.name: str(f.type) for f in fields(AgentConfig)}
    for name, value in values.items():
        if name not in declared:
            continue  # AgentConfig itself refuses an unknown key
        kinds = declared[name].replace(" ", "").split("|")
        if isinstance(value, bool):
            ok = "bool" in kinds
        elif isinstance(value, int):
            ok = "int" in kinds or "float" in kinds
        elif isinstance(value, float):
            ok = "float" in kinds
        elif isinstance(value, str):
            ok = "str" in kinds
        else:
            ok = value is None and "None" in kinds
        if not ok:
            raise ValueError(f"agent config key {name!r} must be {declared[name]}, got {value!r}")


def _load_toml(text: str) -> dict[str, Any]:
    """TOML through the stdlib on 3.11+, else ``tomli`` (the agent's one extra on 3.9/3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised by the agent tests on the older Pythons
        import tomli as tomllib
    loaded: dict[str, Any] = tomllib.loads(text)
    return loaded
