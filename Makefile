# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# the package (with the dev, postgres and bench extras: the tests run the peers too) when .venv is
# missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast postgres chromium lint bench compare schemas clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,bench,mcp,web]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The PostgreSQL tests use the server on 127.0.0.1:5432 (database test), started here when down.
postgres:
	pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect 15 main start || true

# The browser test drives the system Chromium (Playwright cannot download its own here).
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || true

test: $(STAMP) postgres chromium
	$(BIN)/python -m pytest -q

# The inner loop, about 2 minutes on two cores (both backends): every test but those marked slow (multi-process
# runs, SIGKILL crashes, soaks, Hypothesis runs, long real-time waits), on two workers, stopping at
# the first failure. `make test` runs them all.
test-fast: $(STAMP) postgres
	$(BIN)/python -m pytest -q -x -m "not slow" -n 2

lint: $(STAMP)
	$(BIN)/ruff check sqlbus tests tools benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --group-commit --fanout
	$(BIN)/python benchmarks/latency.py

# The peers (persist-queue, litequeue, huey, redis-py; pgqueuer and procrastinate on the
# PostgreSQL server, started by the postgres target) come with the bench extra.
compare: $(STAMP) postgres
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,bench,mcp,web]'
	$(BIN)/python benchmarks/compare.py

schemas: $(STAMP)
	$(BIN)/python tools/gen_schemas.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
