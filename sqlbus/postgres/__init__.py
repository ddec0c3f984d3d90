"""The PostgreSQL backend (the extra ``sqlbus[postgres]``: psycopg 3 and psycopg_pool), for
agents on many hosts. Work in progress (issue 15): today it holds the schema of a bus and the
check that a schema is one of ours (:mod:`sqlbus.postgres.schema`); ``sqlbus.connect`` does not
open PostgreSQL URLs yet."""
