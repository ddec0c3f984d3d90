"""``Bus.schema_version()``: the schema version the database holds, one small read (the
dashboard's /healthz), on both backends; a closed bus raises."""

from __future__ import annotations

import pytest

import sqlbus

pytestmark = pytest.mark.backends


def test_schema_version_is_the_version_the_backend_writes(bus):
    assert bus.schema_version() == bus.engine.storage.SCHEMA_VERSION
    assert bus.schema_version() == bus.check().schema_version


def test_schema_version_of_a_closed_bus_raises(bus):
    bus.close()
    with pytest.raises(sqlbus.DatabaseError):
        bus.schema_version()
