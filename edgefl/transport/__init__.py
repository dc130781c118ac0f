"""MQTT transport shared by every tier (device agent, combiner, controller)."""

from __future__ import annotations

from edgefl.transport.mqtt import BrokerAddress, MqttConnection, parse_broker_url

__all__ = ["BrokerAddress", "MqttConnection", "parse_broker_url"]
