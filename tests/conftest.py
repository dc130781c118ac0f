"""Suite-wide fixtures: real brokers started by the tests themselves, never the machine's own.

``broker_url`` runs a test once per broker, so the system is checked on both the embedded
amqtt broker and Mosquitto. A missing Mosquitto fails the suite (CI installs it); skipping
would hide half of the coverage.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefl.broker.embedded import EmbeddedBroker
from edgefl.broker.mosquitto import MosquittoProcess, find_mosquitto

# `from tests.x import ...` must work under a plain `pytest` too, not only `python -m pytest`
# (which puts the working directory on sys.path).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoProcess]:
    """A private Mosquitto on a free loopback port (anonymous, loopback only)."""
    try:
        find_mosquitto()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}. The test suite needs a real Mosquitto broker.", pytrace=False)
    with MosquittoProcess() as broker:
        yield broker


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The suite's shared amqtt broker: explicitly insecure, loopback only.

    Tests of authentication start their own broker with a secret.
    """
    with EmbeddedBroker(allow_anonymous=True) as broker:
        yield broker


@pytest.fixture(params=["embedded", "mosquitto"], ids=["embedded", "mosquitto"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """The URL of each test broker in turn."""
    name = "embedded_broker" if request.param == "embedded" else "mosquitto"
    return request.getfixturevalue(name).url


@pytest.fixture
def deployment(broker_url: str, tmp_path):
    """A fresh tiered deployment (own project) on each test broker, torn down afterwards."""
    from tests.harness import Deployment

    dep = Deployment(broker_url, tmp_path)
    yield dep
    dep.close()
