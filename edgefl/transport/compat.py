"""Broker quirks: where a broker differs from Mosquitto in what edgefl relies on, and the
workarounds every component applies, so the same code runs on every broker.

Protocol v1 relies on two things that not every MQTT broker does:

* **Retained messages reach wildcard subscriptions.** The controller learns who is online
  from retained ``status`` messages through ``+/dev/+/status``, and devices fetch retained
  model chunks through ``model/{version}/+``. RabbitMQ 3.x's MQTT plugin delivers a retained
  message only to a subscription whose filter *is* that topic.
* **'.' is an ordinary character in a topic level.** RabbitMQ maps MQTT topics to AMQP
  routing keys and turns '.' into '/'; NATS 2.9 never delivers a topic with '.'.

The broker URL says which quirks apply: ``?broker=rabbitmq`` or ``?broker=nats`` (a profile),
or one flag at a time (``?retained_wildcards=false``, ``?topic_dots=false``), e.g.
``mqtt://rabbit.example:1883?broker=rabbitmq``. Without a query nothing changes.

The workarounds (docs/protocol.md 7.1, optional and backwards compatible):

* ``topic_dots=false``: ``MqttConnection`` refuses to publish or subscribe a topic with '.'
  (a ``ValueError`` naming it) instead of letting the broker lose or rename it.
* ``retained_wildcards=false``: the controller publishes a retained ``status`` on
  ``ctl/status`` on every connect (``say_hello``); devices and combiners subscribe to that
  exact topic and announce their status again whenever a new one appears
  (``announce_on_hello``). Devices downloading a model also subscribe to each chunk's exact
  topic (``fetch_retained``), which is how such a broker hands out retained messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlparse

if TYPE_CHECKING:
    from edgefl.transport.mqtt import MqttConnection


@dataclass(frozen=True)
class BrokerQuirks:
    """What a broker does: the defaults are Mosquitto's (and amqtt's, EMQX's, HiveMQ's)."""

    retained_wildcards: bool = True
    """Retained messages are delivered to wildcard subscriptions (``+``, ``#``)."""
    topic_dots: bool = True
    """'.' in a topic level is delivered as it is."""


PROFILES: dict[str, BrokerQuirks] = {
    "mosquitto": BrokerQuirks(),
    "amqtt": BrokerQuirks(),
    "emqx": BrokerQuirks(),
    "hivemq": BrokerQuirks(),
    "nats": BrokerQuirks(topic_dots=False),  # nats-server 2.9
    "rabbitmq": BrokerQuirks(retained_wildcards=False, topic_dots=False),  # rabbitmq_mqtt 3.x
}
"""The ``?broker=`` profiles. Measured here: mosquitto, amqtt, nats, rabbitmq (see
tests/test_clustered_brokers.py); emqx and hivemq from their vendors' documentation."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_FLAGS = ("retained_wildcards", "topic_dots")


def broker_quirks(url: str) -> BrokerQuirks:
    """The quirks a broker URL's query names; ``ValueError`` (naming the URL's key) on a typo.

    ``broker=NAME`` picks a profile from ``PROFILES``; ``retained_wildcards`` and
    ``topic_dots`` (true/false, 1/0, yes/no) override single flags.
    """
    quirks = BrokerQuirks()
    flags: dict[str, bool] = {}
    for key, value in parse_qsl(urlparse(url).query, keep_blank_values=True):
        if key == "broker":
            if value.lower() not in PROFILES:
                raise ValueError(
                    f"broker URL: unknown broker={value!r}; known: {', '.join(sorted(PROFILES))}"
                )
            quirks = PROFILES[value.lower()]
        elif key in _FLAGS:
            if value.lower() not in _TRUE | _FALSE:
                raise ValueError(f"broker URL: {key}={value!r} is not true or false")
            flags[key] = value.lower() in _TRUE
        else:
            raise ValueError(
                f"broker URL: unknown option {key!r}; known: broker, {', '.join(_FLAGS)}"
            )
    return replace(quirks, **flags)


def check_topic(quirks: BrokerQuirks, topic: str) -> None:
    """Raise ``ValueError`` for a topic this broker would lose or rename ('.' in it)."""
    if not quirks.topic_dots and "." in topic:
        raise ValueError(
            f"topic {topic!r} contains '.', which this broker (topic_dots=false in the broker "
            "URL) does not deliver as it is: use names without '.' (projects, regions, "
            "devices, sessions)"
        )


def say_hello(conn: MqttConnection, topic: str, payload: bytes) -> None:
    """The controller, on each connect (after its subscriptions): ask everyone to announce.

    Only where retained messages miss wildcard subscriptions; elsewhere the controller's
    presence subscription already got every retained status. Retained, so a component that
    connects later gets it too (it announces on connect anyway).
    """
    if not conn.quirks.retained_wildcards:
        conn.publish(topic, payload, qos=1, retain=True)


def announce_on_hello(conn: MqttConnection, topic: str, announce: Callable[[], None]) -> None:
    """A device or combiner: run ``announce`` again whenever a new controller says hello.

    Call before ``start``. Only where retained messages miss wildcard subscriptions. A
    payload already answered (the same retained hello after a reconnect) and a cleared one
    (empty) are ignored.
    """
    if conn.quirks.retained_wildcards:
        return
    answered: list[bytes] = []

    def on_hello(_topic: str, payload: bytes) -> None:
        if not payload or payload in answered:
            return
        answered[:] = [payload]
        announce()

    conn.subscribe(topic, on_hello)


def _ignore(_topic: str, _payload: bytes) -> None:
    """Messages on an exact topic that a wildcard subscription's handler also receives."""


def fetch_retained(conn: MqttConnection, topics: Iterable[str]) -> list[str]:
    """Make sure the retained messages on ``topics`` arrive; returns what to unsubscribe.

    The caller has subscribed to a wildcard filter matching every one of ``topics`` (e.g.
    ``model/{version}/+``); its handler receives them. Where retained messages reach wildcard
    subscriptions they already have: this does nothing. Elsewhere it subscribes to each exact
    topic, which is how such a broker hands out a retained message.
    """
    if conn.quirks.retained_wildcards:
        return []
    wanted = list(topics)
    for topic in wanted:
        conn.subscribe(topic, _ignore)
    return wanted
