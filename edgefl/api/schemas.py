"""The REST API's bodies as pydantic models: one source for the OpenAPI document, the server's
responses and the Python client's parsed results.

Imports pydantic only (no FastAPI), so ``edgefl.client`` can share these without the server.
Fields are what the store records; nothing here is computed that a client could not check.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from edgefl.aggregation.fedbuff import AsyncSettings
from edgefl.aggregation.privacy import DPConfig

T = TypeVar("T")


class Problem(BaseModel):
    """RFC 9457 problem details: every error the API answers has this shape."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


# sessions ---------------------------------------------------------------------------------
class SessionSummary(BaseModel):
    """A session as listed: where it stands, not how it was configured."""

    session_id: str
    project: str
    status: str = Field(description="running, completed, failed or stopped")
    current_round: int = Field(description="last completed round (0 before the first)")
    rounds: int | None = Field(description="rounds the session was configured to run")
    aggregator: str | None
    model_version: str = Field(description="the current global model version")
    reason: str = Field(description="why it failed or stopped ('' otherwise)")
    stop_requested_by: str = Field(description="who asked to stop it, while that is pending")
    created: float
    updated: float


class SessionDetail(SessionSummary):
    """One session with the full configuration it was started with."""

    config: dict[str, Any]


BUILTIN_MODELS = ("softmax", "mlp")  # the digits task's reference models (edgefl.tasks.digits)


class TrainParams(BaseModel):
    """What each device's trainer is told for every round."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.1, gt=0, le=10, description="learning rate")
    batch_size: int = Field(32, ge=1, le=65536, description="local minibatch size")
    epochs: int = Field(1, ge=1, le=1000, description="local epochs per round")


class SessionCreate(BaseModel):
    """A new session (``POST /api/sessions``): it is ``created``, and runs once started."""

    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,48}$", description="default: s<date>-<time>"
    )
    project: str | None = Field(
        None, description="default: the project this API serves (or 'default')"
    )
    model: str | None = Field(
        None,
        description="a built-in digits model (softmax or mlp), or the SHA-256 (hex) of a "
        "package uploaded through POST /api/packages; default: softmax, or with "
        "initial_model the model that version was trained as",
    )
    initial_model: str | None = Field(
        None,
        max_length=128,
        description="start from a stored model version instead of the model's initial "
        "weights: 'active' (the project's active model) or a version id of this project; "
        "its exact bytes become round 0, with it as parent in the lineage",
    )
    rounds: int = Field(10, ge=1, le=100_000, description="successful rounds to run")
    min_devices: int = Field(1, ge=1, description="quorum: accepted updates a round needs")
    max_devices: int | None = Field(None, ge=1, description="cap on devices per round")
    round_timeout_s: float = Field(60.0, gt=0, le=86_400)
    buffer_size: int | None = Field(None, ge=1, description="close a round at this many updates")
    aggregator: str = Field("fedavg", description="see `edgefl aggregators`, docs/algorithms.md")
    aggregator_params: dict[str, float | int | str | bool | None] = Field(
        default_factory=dict, description="checked against the aggregator's schema: 422 if bad"
    )
    train: TrainParams = Field(default_factory=TrainParams)
    wait_for_devices_s: float = Field(60.0, ge=0, le=86_400)
    max_attempts: int = Field(3, ge=1, le=100, description="tries per round before it fails")
    seed: int = 0
    compression: Literal["none", "float32", "float16", "int8", "topk"] = Field(
        "none", description="update encoding (docs/compression-and-privacy.md)"
    )
    topk_fraction: float = Field(0.1, gt=0, le=1, description="share of entries top-k sends")
    dp: DPConfig | None = Field(None, description="central differential privacy; None: off")
    mode: Literal["sync", "async"] = Field(
        "sync", description="async: FedBuff, a version every K updates (docs/algorithms.md)"
    )
    asynchronous: AsyncSettings | None = Field(None, description="FedBuff settings (async)")


class StopAccepted(BaseModel):
    """A recorded stop request; the session's controller acts on it between or during rounds."""

    session_id: str
    status: str
    stop_requested_by: str
    stop_requested_at: float | None


# devices and combiners ---------------------------------------------------------------------
class DeviceSummary(BaseModel):
    """A device as the controllers last saw it (written every second or so, in batches)."""

    project: str
    device: str
    region: str
    state: str = Field(description="online or offline")
    last_seen: float = Field(description="unix seconds of its last status or telemetry")
    current_task: str = Field(description="the round task it was given ('' when none)")
    accepted: int = Field(description="updates accepted into rounds")
    declined: int = Field(description="tasks it declined")
    rejected: int = Field(description="updates refused")


class DeviceDetail(DeviceSummary):
    """One device with its attributes and its last telemetry."""

    attributes: dict[str, Any] = Field(description="from its status message (agent version...)")
    telemetry: dict[str, float] = Field(description="its last telemetry metrics")
    telemetry_at: float | None = Field(description="when those were measured (unix seconds)")


class CombinerSummary(BaseModel):
    """A region's combiner: presence, the round it works on, the updates it handled."""

    project: str
    region: str
    combiner: str
    state: str = Field(description="online or offline")
    last_seen: float
    current_task: str
    current_round: int
    accepted: int = Field(description="updates accepted, over the rounds the controllers saw")
    rejected: int


class TelemetryPoint(BaseModel):
    """A device's telemetry metrics at one time."""

    device: str
    region: str
    ts: float
    metrics: dict[str, float]
    source: str = Field(
        "store",
        description="'store': the device's last point, from the state store (no history "
        "configured); 'influxdb': a point of the history in InfluxDB",
    )


# rounds -----------------------------------------------------------------------------------
class _RoundBase(BaseModel):
    task_id: str = Field(description="<session>:<round>:<attempt>")
    round: int
    attempt: int = Field(description="0-based retry counter of this round")
    status: str = Field(description="running, completed or failed")
    metrics: dict[str, float]
    started: float
    finished: float | None
    duration_s: float | None
    model_in: str
    model_out: str | None
    reason: str = Field(description="why the attempt failed ('' otherwise)")


class RoundSummary(_RoundBase):
    """One round attempt as listed: counts, not names."""

    participants: int = Field(description="accepted updates")
    selected: int = Field(description="devices the round was sent to")
    rejected: int = Field(0, description="refused updates")


class Participant(BaseModel):
    """An accepted update: who sent it, from where, trained on how many examples."""

    device: str
    region: str = ""
    examples: int = Field(description="examples trained on: the update's aggregation weight")
    metrics: dict[str, float] = Field(default_factory=dict)


class Rejection(BaseModel):
    """A refused update and why, as the combiner recorded it."""

    device: str
    reason: str


class RoundDetail(_RoundBase):
    """One round attempt with its participants and rejections by name."""

    selected: list[str] = Field(description="devices the round was sent to")
    participants: list[Participant]
    rejections: list[Rejection]
    attempts: int = Field(description="how many attempts this round number has had")


# models -----------------------------------------------------------------------------------
class ModelSummary(BaseModel):
    """A stored model version; ``parent`` is the version it was aggregated from."""

    version: str
    parent: str | None
    round: int | None
    digest: str = Field(description="hex SHA-256 of the CBOR blob (the download's ETag)")
    size: int
    created: float
    active: bool = Field(False, description="whether it is its project's active model")


class Lineage(BaseModel):
    """A model's ancestry: itself first, then each parent back to the initial model."""

    version: str
    chain: list[ModelSummary]
    complete: bool = Field(
        description="True when the chain ends at a model without a parent (the initial one)"
    )


# packages ---------------------------------------------------------------------------------
class PackageSummary(BaseModel):
    """A model package the controller can hand to devices (``SessionConfig.package``)."""

    digest: str = Field(description="SHA-256 hex of the package: what a session names")
    id: str = Field(description="its transfer id on the broker (pkg-<digest[:32]>)")
    size: int
    name: str
    framework: str
    created: str
    parameters: int = Field(description="trainable tensors")
    signed_by: str | None = Field(description="key id of the signature (not checked here)")
    sessions: list[str] = Field(description="sessions of this project that train it")


# projects ---------------------------------------------------------------------------------
class ProjectSummary(BaseModel):
    """A project with sessions in the store, and how many are in each state."""

    project: str
    sessions: int
    by_status: dict[str, int]
    latest_session: str | None
    updated: float | None
    active_model: str | None = Field(
        None, description="the version operators promoted (PUT .../active-model), if any"
    )
    active_model_set_by: str | None = None
    active_model_set_at: float | None = None
    role: str | None = Field(
        None, description="the caller's role in the project (null in insecure mode)"
    )


class ActiveModelSet(BaseModel):
    """``PUT /api/projects/{project}/active-model``: the version to promote (null clears)."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(..., max_length=128)


# identity ---------------------------------------------------------------------------------
class WhoAmI(BaseModel):
    """What the bearer token says, so a page or script can offer what its role allows."""

    subject: str | None
    role: str
    project: str | None
    projects: dict[str, str] = Field(
        default_factory=dict, description="each project of the caller's, with their role there"
    )
    expires: float | None
    insecure: bool


class Revoked(BaseModel):
    device: str
    revoked_at: float
    revoked_by: str


class KeyInfo(BaseModel):
    kid: str
    alg: str


class Keys(BaseModel):
    """The verifiers' keys (key ids), or just the algorithm when a shared secret is used."""

    algorithm: str | None = None
    keys: list[KeyInfo] | None = None
    active: str | None = None


class Health(BaseModel):
    status: str


class Page(BaseModel, Generic[T]):
    """One page of a list, as the Python client returns it (the API sends the items as the
    body and the total and links in headers)."""

    items: list[T]
    total: int
    offset: int
    limit: int
    next_offset: int | None


MemberRole = Literal["admin", "operator", "viewer"]


class Member(BaseModel):
    """A person's membership of a project: their role there and who invited them."""

    project: str
    user: str = Field(description="the ``sub`` of the person's tokens")
    role: MemberRole
    invited_by: str
    created: float
    updated: float


class MemberInvite(BaseModel):
    """``POST /api/projects/{project}/members``: whom to invite, with which role."""

    user: str = Field(min_length=1, max_length=256)
    role: MemberRole = "viewer"


class MemberRoleSet(BaseModel):
    """``PUT /api/projects/{project}/members/{user}``: the member's new role."""

    role: MemberRole
