"""Session configuration: everything that defines a federated training session."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefl.aggregation.fedbuff import AsyncSettings
from edgefl.aggregation.privacy import DPConfig
from edgefl.protocol.chunking import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE


def _default_session_id() -> str:
    return time.strftime("s%Y%m%d-%H%M%S")


class SessionConfig(BaseModel):
    """A session's settings, validated once and stored with the session (so resumes agree)."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(default_factory=_default_session_id, pattern=r"^[A-Za-z0-9_.-]{1,48}$")
    rounds: int = Field(10, ge=1, description="successful rounds to run")
    min_devices: int = Field(1, ge=1, description="quorum: fewer accepted updates fail the round")
    max_devices: int | None = Field(None, ge=1, description="cap on devices selected per round")
    round_timeout_s: float = Field(
        60.0, gt=0, description="deadline for updates after a round starts"
    )
    buffer_size: int | None = Field(
        None, ge=1, description="close the round as soon as this many updates are accepted"
    )
    aggregator: str = "fedavg"
    aggregator_params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="settings passed to devices")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    wait_for_devices_s: float = Field(
        60.0, ge=0, description="how long to wait for a quorum online"
    )
    max_attempts: int = Field(3, ge=1, description="tries per round before the session fails")
    close_grace_s: float = Field(5.0, ge=0, description="wait for partials after closing a round")
    seed: int = 0
    package: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 (hex) of the model package devices train; None: weights only",
    )
    compression: Literal["none", "float32", "float16", "int8", "topk"] = Field(
        "none",
        description="how devices send updates: none (their weights, as the model's dtype) "
        "or their delta to the global model in this encoding (docs/compression-and-privacy.md)",
    )
    topk_fraction: float = Field(0.1, gt=0, le=1, description="share of entries top-k sends")
    dp: DPConfig | None = Field(None, description="central differential privacy; None: off")
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: rounds wait for their devices; async: FedBuff, a version every "
        "K updates from devices that train whenever idle (docs/algorithms.md)",
    )
    asynchronous: AsyncSettings | None = Field(
        None, description="FedBuff settings (mode async; None there: the defaults)"
    )

    @model_validator(mode="after")
    def _check(self) -> SessionConfig:
        if self.max_devices is not None and self.max_devices < self.min_devices:
            raise ValueError("max_devices must be at least min_devices")
        robust = check_aggregator(self.aggregator, self.aggregator_params, self.train)
        if robust and (self.compression != "none" or self.dp is not None):
            # a robust rule needs each update's weights; compressed updates and DP send
            # deltas folded into sums: refuse rather than compute something else
            raise ValueError(
                f"aggregator {self.aggregator!r} holds whole updates: it runs without "
                "compression and without dp"
            )
        if self.mode == "async":
            from edgefl.controller.async_rounds import check_async

            self.asynchronous = check_async(self, robust)
        elif self.asynchronous is not None:
            raise ValueError("asynchronous settings need mode 'async'")
        return self

    def plan_fields(self) -> dict[str, Any]:
        """The optional round-plan fields for compression and DP (empty when both are off).

        DP clips deltas and FedBuff folds deltas of older versions into the current one, so
        with ``compression: none`` either has devices send float32 deltas.
        """
        out: dict[str, Any] = {}
        if self.asynchronous is not None:  # FedBuff folds deltas: a stale one is still valid
            out["async"] = self.asynchronous.plan()
        if self.compression != "none" or self.dp is not None or self.asynchronous is not None:
            encoding = "float32" if self.compression == "none" else self.compression
            out["compression"] = {"encoding": encoding}
            if encoding == "topk":
                out["compression"]["topk_fraction"] = self.topk_fraction
        if self.dp is not None:
            out["dp"] = {"clip_norm": self.dp.clip_norm}
        return out


def check_aggregator(name: str, params: dict[str, Any], train: dict[str, Any]) -> bool:
    """ValueError unless the aggregator exists, takes these parameters and can be run, and
    its device settings (FedProx's ``mu``) do not contradict ``train``: a session fails at
    creation, with the reason, not in its first round. True for a robust (held) rule."""
    from edgefl.aggregation.base import make_aggregator, task_settings
    from edgefl.aggregation.robust import robust_rule

    aggregator = make_aggregator(name, **params)
    try:
        robust = robust_rule(aggregator) is not None
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    for key, value in task_settings(aggregator).items():
        if key in train and train[key] != value:
            raise ValueError(
                f"train.{key}={train[key]!r} contradicts aggregator {name!r}, which sends "
                f"{key}={value!r}: set it in aggregator_params only"
            )
    return robust
