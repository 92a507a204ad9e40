"""Fixtures for the SDK tests: a fake gateway at the transport seam."""

from __future__ import annotations

import pytest

from tests.sdk.fakes import FakeGateway


@pytest.fixture
def fake_gateway() -> FakeGateway:
    return FakeGateway()
