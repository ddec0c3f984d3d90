"""The PostgreSQL backend (the extra ``sqlbus[postgres]``: psycopg 3 and psycopg_pool), for
agents on many hosts. Work in progress (issue 15): every storage verb is here, but
``sqlbus.connect`` does not open PostgreSQL URLs yet.

Its verbs are one object, :class:`sqlbus.postgres.storage.PostgresStorage` (one bus per
schema), split by concern as the SQLite backend's: ``schema`` (tables, the check that a schema
is ours, shared SQL fragments), ``connection`` (transactions, lock waits, checks), ``queue``
(publish, claim, settle), ``responses`` (request/response), ``agents`` (registry, interests),
``admin`` (dead letters, archive, peek, tail), ``retention`` (policy, pruning, expiry,
counters), ``stats`` (figures) and ``state`` (shared state)."""
