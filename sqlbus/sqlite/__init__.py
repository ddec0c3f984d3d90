"""The SQLite backend: the schema and every SQL statement of a bus kept in one SQLite file, and
the doorbells that wake waiting processes on the same host.

Its storage verbs are one object, :mod:`sqlbus.sqlite.storage` (``from .sqlite import
storage``), split by concern over ``schema`` (tables, upgrades, the check of a file's bytes),
``connection`` (opening, transactions, pragmas), ``queue`` (publish, claim, settle),
``responses`` (request/response), ``admin`` (registry, interests, dead letters, archive, peek,
tail), ``retention`` (policy, pruning, expiry, counters), ``stats`` (figures and checks) and
``state`` (shared state). Beside them: ``files`` (the file on disk), ``checkpoint`` (the WAL
checkpointer) and ``wakeup``, ``doorbell``, ``ringer`` (cross-process wake-up)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mypy checks that the SQLite backend has every verb, typed as the Protocol
    from ..backend import Storage
    from . import storage as _storage
    from .connection import Connection

    _conforms: Storage[Connection] = _storage
