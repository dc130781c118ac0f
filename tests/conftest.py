"""Suite-wide fixtures: real brokers started by the tests themselves, never the machine's own."""

from __future__ import annotations

import pytest

from edgefl.broker.embedded import EmbeddedBroker
from edgefl.broker.mosquitto import MosquittoProcess


@pytest.fixture(scope="session")
def mosquitto():  # noqa: ANN201
    with MosquittoProcess() as broker:
        yield broker


@pytest.fixture(scope="session")
def embedded_broker():  # noqa: ANN201
    # the suite's shared broker is an explicitly insecure loopback broker; auth tests build
    # their own with a secret
    with EmbeddedBroker(allow_anonymous=True) as broker:
        yield broker


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_url(request) -> str:  # noqa: ANN001
    return request.getfixturevalue(
        f"{request.param}_broker" if request.param == "embedded" else "mosquitto"
    ).url
