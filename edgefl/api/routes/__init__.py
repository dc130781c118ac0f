"""The REST API's resources, one router module each (mounted by ``edgefl.api.app``)."""

from __future__ import annotations

__all__: list[str] = []
