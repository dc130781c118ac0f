"""Brokers: the embedded amqtt broker (zero setup) and a Mosquitto runner.

Import the submodules (``edgefl.broker.embedded``, ``edgefl.broker.mosquitto``) directly: this
package imports nothing, so code that only runs Mosquitto does not need amqtt installed.
"""

from __future__ import annotations

__all__: list[str] = []
