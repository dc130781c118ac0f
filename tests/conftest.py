"""Suite-wide fixtures: real brokers started by the tests themselves, never the machine's own.

``broker_url`` runs a test once per broker, so the system is checked on both the embedded
amqtt broker and Mosquitto. A missing Mosquitto fails the suite (CI installs it); skipping
would hide half of the coverage.

``EDGEFL_TEST_BROKERS=mosquitto`` narrows ``broker_url`` to Mosquitto: the agent's tests on
the device Pythons (3.9 to 3.12) run with the base install only, where amqtt (a server extra)
is absent. The full suite always runs both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from edgefl.broker.mosquitto import MosquittoProcess, find_mosquitto

if TYPE_CHECKING:
    from edgefl.broker.embedded import EmbeddedBroker

BROKERS = os.environ.get("EDGEFL_TEST_BROKERS", "embedded,mosquitto").split(",")


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A CLI command run in-process (``setup_logging``) replaces the root logger's handlers
    with one writing to the real stderr; put them back after the test, so later tests' logs
    go to pytest's capture again instead of the terminal."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)

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
    from edgefl.broker.embedded import EmbeddedBroker

    with EmbeddedBroker(allow_anonymous=True) as broker:
        yield broker


@pytest.fixture(params=BROKERS, ids=BROKERS)
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


# the private InfluxDB fixtures (influxd started from its binary, never the system service)
from tests.influx import influxdb, private_influxdb  # noqa: E402, F401

# the PostgreSQL fixtures (the machine's server, or a private one from the Debian binaries)
from tests.postgres import postgres_database, postgres_server, postgres_url  # noqa: E402, F401
