"""The SQLite backend: the schema and every SQL statement of a bus kept in one SQLite file, and
the doorbells that wake waiting processes on the same host."""
