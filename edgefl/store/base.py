"""Store interfaces: control-plane state (sessions, rounds, model versions) and model blobs.

The controller talks only to these protocols. The default is SQLite plus the filesystem;
PostgreSQL (same SQL store, another URL) and S3-compatible blob storage slot in behind them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefl.protocol.types import Participant, Rejection, RoundStatus, SessionStatus


class StorageError(RuntimeError):
    """The model store cannot take a write (disk full, read-only, gone): nothing was recorded."""


@dataclass
class SessionRecord:
    """A session's durable state; ``model_version`` moves only after the round is recorded."""

    session_id: str
    project: str
    config: dict[str, Any]  # the full SessionConfig as a JSON-able dict
    status: SessionStatus
    current_round: int  # last *completed* round number (0 before the first)
    model_version: str  # current global model version
    created: float  # unix seconds
    updated: float
    reason: str = ""  # why the session failed or stopped ("" while it runs or completed)
    # a pending stop request (the REST API's operators): who asked, and when (unix seconds);
    # cleared when the session leaves ``running``, so a resumed session is not stopped again
    stop_requested_by: str = ""
    stop_requested_at: float | None = None


@dataclass
class RoundRecord:
    """One attempt at one round: who was selected, who took part, and what came out."""

    task_id: str  # "<session>:<round>:<attempt>", unique
    session_id: str
    round: int  # 1-based
    attempt: int  # 0-based retry counter for the same round number
    status: RoundStatus
    model_in: str
    model_out: str | None
    devices: list[str]  # selected devices
    participants: list[Participant] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)  # refused updates and why
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. accuracy, loss
    reason: str = ""  # why a round failed
    started: float = 0.0
    finished: float | None = None


@dataclass
class ModelRecord:
    """A stored model version and its lineage; the blob is written before this record."""

    version: str  # "{session}-r{round:04d}-{digest[:8]}", content-addressed
    parent: str | None  # lineage: the version this one was aggregated from
    session_id: str | None
    round: int | None
    digest: str  # hex sha256 of the CBOR blob
    size: int  # bytes
    created: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProjectRecord:
    """A project's own settings (v6): which model version operators promoted.

    The active model is what a new session may start from (``initial_model: "active"``) and
    what a deployment ships; it always names a version of one of this project's sessions.
    """

    project: str
    active_model: str | None = None
    active_set_by: str = ""  # who promoted it, as ``subject (role)``
    active_set_at: float | None = None  # unix seconds
    updated: float = 0.0


MEMBER_ROLES = ("viewer", "operator", "admin")  # weakest first, as the API ranks them


@dataclass
class MembershipRecord:
    """A person's membership of a project (v7): their role there, and who invited them.

    ``user`` is a token's ``sub``. A project with no memberships at all is left to its
    tokens' own role and project claims (what schema 6 did), so upgrades change nothing.
    """

    project: str
    user: str
    role: str  # one of MEMBER_ROLES
    invited_by: str = ""  # as ``subject (role)``
    created: float = 0.0
    updated: float = 0.0


class LastAdminError(ValueError):
    """The change would leave a project with members but no admin: refused."""


@dataclass
class LeaseRecord:
    """Who runs a session: one controller at a time, proven by an increasing fence token."""

    session_id: str
    holder: str  # the controller instance that holds (or last held) the lease
    fence: int  # increases whenever another holder takes the session over
    expires: float  # unix seconds; a lease not renewed by then may be taken over


@dataclass
class DeviceRecord:
    """A device as the controllers last saw it: presence, task, recent telemetry, counts.

    Written by the controllers (``edgefl.controller.fleet_state``), throttled and batched;
    one row per (project, device). ``telemetry`` holds the last accepted metrics only; the
    history lives in the telemetry sink.
    """

    project: str
    device: str
    region: str
    state: str  # "online" or "offline"
    last_seen: float  # unix seconds of the last status or telemetry
    attributes: dict[str, Any] = field(default_factory=dict)  # from its status (agent, ...)
    current_task: str = ""  # the round task it was last given ("" once that round closed)
    telemetry: dict[str, float] = field(default_factory=dict)  # last telemetry metrics
    telemetry_at: float | None = None  # when those were measured
    accepted: int = 0  # updates accepted into a round
    declined: int = 0  # tasks it declined (could not run)
    rejected: int = 0  # updates refused (malformed, stale, replayed...)


@dataclass
class DeviceChange:
    """What changed about a device since the last flush; None leaves a field as it is.

    The counts are increments, so controllers sharing a store never overwrite each other's.
    ``current_task=""`` clears the task.
    """

    project: str
    device: str
    region: str | None = None
    state: str | None = None
    last_seen: float | None = None
    attributes: dict[str, Any] | None = None
    current_task: str | None = None
    telemetry: dict[str, float] | None = None
    telemetry_at: float | None = None
    accepted: int = 0
    declined: int = 0
    rejected: int = 0


@dataclass
class CombinerRecord:
    """A region's combiner as the controllers last saw it, and the updates it handled."""

    project: str
    region: str
    combiner: str  # its name (combiner-<region> by default)
    state: str  # "online" or "offline"
    last_seen: float
    current_task: str = ""  # the round task it last reported progress on
    current_round: int = 0
    accepted: int = 0  # updates accepted, over every round the controllers saw
    rejected: int = 0


@dataclass
class CombinerChange:
    """What changed about a combiner; None leaves a field, counts are increments."""

    project: str
    region: str
    combiner: str | None = None
    state: str | None = None
    last_seen: float | None = None
    current_task: str | None = None
    current_round: int | None = None
    accepted: int = 0
    rejected: int = 0


class Store(Protocol):
    """Durable control-plane state: sessions, round attempts and model versions.

    Implementations must be safe to call from several threads (the controller writes while the
    dashboard reads), must make each call atomic, and return copies: mutating a returned record
    never changes the store. ``SqlStore`` is the one implementation (SQLite, PostgreSQL).
    """

    def create_session(self, record: SessionRecord) -> None:
        """Add a session; ValueError if its id exists."""

    def get_session(self, session_id: str) -> SessionRecord | None:
        """The session, or None."""

    def list_sessions(
        self,
        project: str | Collection[str] | None = None,
        *,
        status: str | None = None,
        newest_first: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[SessionRecord]:
        """Sessions (of one project or a collection of them, in one status), oldest first; a
        page of them with ``limit``/``offset``, cut in the database."""

    def count_sessions(
        self, project: str | Collection[str] | None = None, *, status: str | None = None
    ) -> int:
        """How many sessions ``list_sessions`` would list without a limit."""

    def update_session(
        self,
        session_id: str,
        *,
        status: SessionStatus | None = None,
        current_round: int | None = None,
        model_version: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Change the given fields (and ``updated``) in one transaction; KeyError if unknown.

        A ``status`` other than ``running`` also clears a pending stop request: it has been
        honoured (or overtaken), and must not stop the session again when it is resumed.
        """

    def transition_session(
        self, session_id: str, expected: tuple[str, ...], status: str, reason: str = ""
    ) -> SessionRecord:
        """Move a session to ``status`` only if it is in one of ``expected``, atomically.

        The session as it now stands; KeyError if unknown, ValueError (naming its status) if
        it is elsewhere. Of two callers racing (two serving controllers claiming a queued
        session, an operator stopping it meanwhile) exactly one wins.
        """

    def request_stop(self, session_id: str, requested_by: str) -> SessionRecord:
        """Ask the session's controller to stop it; the session as it now stands.

        KeyError if unknown; ValueError if it is not ``running``, ``created`` or ``queued``.
        A session that no controller runs yet is ``stopped`` at once. A second request while
        one is pending keeps the first (who asked first is who stopped it).
        """

    def add_model(self, record: ModelRecord) -> None:
        """Record a model version whose blob is already stored; ValueError if it exists."""

    def get_model(self, version: str) -> ModelRecord | None:
        """The version's record, or None."""

    def list_models(
        self, session_id: str | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[ModelRecord]:
        """Model versions (of one session), oldest first; a page with ``limit``/``offset``."""

    def count_models(self, session_id: str | None = None) -> int:
        """How many model versions (of one session) there are."""

    def get_project(self, project: str) -> ProjectRecord | None:
        """The project's settings, or None while nothing was ever set for it."""

    def set_active_model(
        self, project: str, version: str | None, set_by: str = ""
    ) -> ProjectRecord:
        """Promote ``version`` as the project's active model (None clears it), atomically.

        KeyError if the version is unknown; ValueError (naming the other project) if it was
        not produced by a session of ``project``: one project's model never starts another's
        sessions. The check and the write share one transaction.
        """

    def list_members(
        self, project: str | None = None, *, user: str | None = None
    ) -> list[MembershipRecord]:
        """Memberships (of one project, of one user), by (project, user)."""

    def get_member(self, project: str, user: str) -> MembershipRecord | None:
        """The user's membership of the project, or None."""

    def count_members(self, project: str) -> int:
        """How many members the project has (0: its tokens' claims decide, as before v7)."""

    def add_member(
        self, project: str, user: str, role: str, invited_by: str = "", *, bootstrap: str = ""
    ) -> MembershipRecord:
        """Invite ``user`` with ``role``; ValueError if already a member or the role unknown.

        ``bootstrap`` names whoever invites into a project without members: they are made its
        first admin in the same transaction, so inviting someone never locks the inviter out.
        """

    def set_member_role(self, project: str, user: str, role: str) -> MembershipRecord:
        """Change a member's role; KeyError if not a member, ``LastAdminError`` when it would
        demote the project's last admin."""

    def remove_member(self, project: str, user: str) -> None:
        """Remove a member; KeyError if not one, ``LastAdminError`` for the last admin (a
        project emptied of members would fall back to its tokens' claims)."""

    def start_round(self, record: RoundRecord) -> None:
        """Record a round attempt as it starts; ValueError if its task id exists."""

    def finish_round(
        self,
        task_id: str,
        *,
        status: RoundStatus,
        model_out: str | None,
        participants: list[Participant],
        metrics: dict[str, float],
        reason: str = "",
        finished: float,
        rejected: list[Rejection] | None = None,
    ) -> None:
        """Close a round attempt with its outcome; KeyError if it never started."""

    def get_round(self, task_id: str) -> RoundRecord | None:
        """The attempt's record, or None."""

    def list_rounds(
        self, session_id: str, *, limit: int | None = None, offset: int = 0
    ) -> list[RoundRecord]:
        """A session's attempts ordered by (round, attempt); a page with ``limit``/``offset``."""

    def count_rounds(self, session_id: str) -> int:
        """How many attempts a session has had."""

    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> int | None:
        """Take (or renew) the session's lease; its fence token, or None if another holds it.

        Atomic across processes sharing the database: of two controllers racing for a free
        or expired lease, exactly one gets it. Taking over from another holder increases
        the fence, so everything the previous holder sends can be told apart as stale.
        """

    def renew_lease(self, session_id: str, holder: str, fence: int, ttl_s: float) -> bool:
        """Extend a lease this holder still holds with this fence; False if it was lost."""

    def release_lease(self, session_id: str, holder: str, fence: int) -> None:
        """Let the lease expire now (the fence stays, so the next holder's is higher)."""

    def get_lease(self, session_id: str) -> LeaseRecord | None:
        """The session's lease, held or expired, or None if it never had one."""

    def record_fleet(
        self, devices: Sequence[DeviceChange], combiners: Sequence[CombinerChange] = ()
    ) -> None:
        """Apply a batch of device and combiner changes in one transaction (rows are created
        on first sight). A device or combiner seen for the first time needs ``region`` and
        ``state``; one without them is skipped."""

    def get_device(self, project: str, device: str) -> DeviceRecord | None:
        """The device's row, or None."""

    def list_devices(
        self,
        project: str | Collection[str] | None = None,
        *,
        region: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[DeviceRecord]:
        """Devices by (project, device), filtered, a page with ``limit``/``offset``."""

    def count_devices(
        self,
        project: str | Collection[str] | None = None,
        *,
        region: str | None = None,
        state: str | None = None,
    ) -> int:
        """How many devices ``list_devices`` would list without a limit."""

    def list_combiners(self, project: str | Collection[str] | None = None) -> list[CombinerRecord]:
        """Combiners by (project, region) (of one project or a collection of them)."""

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""


class BlobStore(Protocol):
    """Storage of model blobs, optimizer state and packages, by key.

    ``put`` must be atomic (a reader sees the old bytes or the new, never a torn write), since
    a record is written only after its blob and must never point at half a file.
    """

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there, atomically."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; KeyError when absent."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a blob."""

    def delete(self, key: str) -> None:
        """Remove ``key``; no error when it is absent."""
