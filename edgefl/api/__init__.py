"""REST API and dashboard (FastAPI, from the ``server`` extra).

Import ``edgefl.api.app`` or ``edgefl.api.server`` directly; this package imports nothing.
"""

from __future__ import annotations

__all__: list[str] = []
