"""The versioned MQTT topic tree (protocol v1).

Every topic the system uses is built here, so the tree is defined in one place and
``edgefl.auth.acl`` derives the broker ACLs (including ``broker_config/acl.conf``) from it.

    edgefl/v1/{project}/{region}/dev/{device}/{task|update|status|telemetry}
    edgefl/v1/{project}/{region}/comb/{round|partial|progress|status}
    edgefl/v1/{project}/{region}/comb/pool/{member}/status
    edgefl/v1/{project}/model/{version}/{chunk_index}
    edgefl/v1/{project}/ctl/status
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTOCOL_VERSION = 1
ROOT = f"edgefl/v{PROTOCOL_VERSION}"

_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

DEVICE_CHANNELS = ("task", "update", "status", "telemetry", "request")
COMBINER_CHANNELS = ("round", "partial", "progress", "status")


class TopicError(ValueError):
    """A topic or topic segment that the protocol does not allow."""


def check_segment(kind: str, value: object) -> str:
    """Return ``value`` if it is a safe topic level; raise ``TopicError`` naming ``kind`` if not.

    Names from configs and tokens become topic levels: a ``+``, ``#`` or ``/`` in one would
    widen a subscription or an ACL rule, so anything outside a small alphabet is refused.
    """
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
        raise TopicError(f"invalid {kind} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ . -")
    return value


@dataclass(frozen=True)
class Topics:
    """Builds and parses the topics of one project; every name is validated on the way.

    Immutable and stateless, so one instance can be shared across threads. Builders raise
    ``TopicError`` for an invalid segment or an unknown channel instead of producing a topic
    that the ACLs would silently refuse.
    """

    project: str

    def __post_init__(self) -> None:
        check_segment("project", self.project)

    @property
    def base(self) -> str:
        """The project's root, ``edgefl/v1/{project}``."""
        return f"{ROOT}/{self.project}"

    # device subtree -------------------------------------------------------------------
    def device(self, region: str, device: str, channel: str) -> str:
        """A concrete topic in one device's subtree; ``channel`` is one of DEVICE_CHANNELS."""
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"unknown device channel {channel!r}")
        check_segment("region", region)
        check_segment("device", device)
        return f"{self.base}/{region}/dev/{device}/{channel}"

    def device_wildcard(self, region: str | None, channel: str) -> str:
        """Filter for one channel of every device, in one region or (None) in all."""
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"unknown device channel {channel!r}")
        reg = "+" if region is None else check_segment("region", region)
        return f"{self.base}/{reg}/dev/+/{channel}"

    # combiner subtree -----------------------------------------------------------------
    def combiner(self, region: str, channel: str) -> str:
        """A concrete topic of a region's combiner; ``channel`` is one of COMBINER_CHANNELS."""
        if channel not in COMBINER_CHANNELS:
            raise TopicError(f"unknown combiner channel {channel!r}")
        check_segment("region", region)
        return f"{self.base}/{region}/comb/{channel}"

    def combiner_wildcard(self, channel: str) -> str:
        """Filter for one channel of every region's combiner (what the controller follows)."""
        if channel not in COMBINER_CHANNELS:
            raise TopicError(f"unknown combiner channel {channel!r}")
        return f"{self.base}/+/comb/{channel}"

    def pool_member_status(self, region: str, member: str) -> str:
        """The retained status (and last will) of one member of a region's combiner pool.

        A pool has several members per region, each alive or dead on its own: they cannot
        share the region's one retained ``comb/status``.
        """
        check_segment("region", region)
        check_segment("combiner", member)
        return f"{self.base}/{region}/comb/pool/{member}/status"

    def pool_status_wildcard(self) -> str:
        """Filter for the status of every pool member of every region (the controller's)."""
        return f"{self.base}/+/comb/pool/+/status"

    # models ---------------------------------------------------------------------------
    def model_chunk(self, version: str, index: int) -> str:
        """Where chunk ``index`` of a model version is published (retained)."""
        check_segment("model version", version)
        return f"{self.base}/model/{version}/{int(index)}"

    def model_filter(self, version: str) -> str:
        """Filter for every chunk of one model version; never a wildcard version (ACL rule)."""
        check_segment("model version", version)
        return f"{self.base}/model/{version}/+"

    def controller_status(self) -> str:
        """The controller's retained hello, on brokers without retained delivery to wildcards
        (optional, docs/protocol.md 7.1; ``edgefl.transport.compat``)."""
        return f"{self.base}/ctl/status"

    # parsing --------------------------------------------------------------------------
    def parse_device_topic(self, topic: str) -> tuple[str, str, str]:
        """Return (region, device, channel) for a device-subtree topic.

        The topic is proof of identity: the broker ACL lets a device publish only under its
        own subtree, so the device id is taken from here, never from the payload.
        """
        parts = topic.split("/")
        prefix = self.base.split("/")
        if (
            len(parts) != len(prefix) + 4
            or parts[: len(prefix)] != prefix
            or parts[len(prefix) + 1] != "dev"
            or parts[-1] not in DEVICE_CHANNELS
        ):
            raise TopicError(f"not a device topic of project {self.project!r}: {topic!r}")
        region = check_segment("region", parts[len(prefix)])
        return region, check_segment("device", parts[len(prefix) + 2]), parts[-1]

    def parse_combiner_topic(self, topic: str) -> tuple[str, str]:
        """Return (region, channel) for a combiner-subtree topic; ``TopicError`` otherwise."""
        parts = topic.split("/")
        prefix = self.base.split("/")
        if (
            len(parts) != len(prefix) + 3
            or parts[: len(prefix)] != prefix
            or parts[len(prefix) + 1] != "comb"
            or parts[-1] not in COMBINER_CHANNELS
        ):
            raise TopicError(f"not a combiner topic of project {self.project!r}: {topic!r}")
        return check_segment("region", parts[len(prefix)]), parts[-1]

    def parse_pool_member_status(self, topic: str) -> tuple[str, str]:
        """Return (region, member) for a pool member's status topic; ``TopicError`` otherwise."""
        parts = topic.split("/")
        prefix = self.base.split("/")
        n = len(prefix)
        if (
            len(parts) != n + 5
            or parts[:n] != prefix
            or parts[n + 1 : n + 3] != ["comb", "pool"]
            or parts[-1] != "status"
        ):
            raise TopicError(f"not a pool member status of project {self.project!r}: {topic!r}")
        return check_segment("region", parts[n]), check_segment("combiner", parts[n + 3])

    def parse_model_chunk(self, topic: str) -> tuple[str, int]:
        """Return (version, chunk index) for a model topic; ``TopicError`` for anything else."""
        parts = topic.split("/")
        prefix = self.base.split("/")
        if (
            len(parts) != len(prefix) + 3
            or parts[: len(prefix)] != prefix
            or parts[len(prefix)] != "model"
        ):
            raise TopicError(f"not a model topic of project {self.project!r}: {topic!r}")
        index = parts[-1]
        if (
            not index.isascii()
            or not index.isdigit()
            or len(index) > 18
            or (len(index) > 1 and index[0] == "0")
        ):
            raise TopicError(f"bad chunk index in {topic!r}")
        return check_segment("model version", parts[-2]), int(index)
