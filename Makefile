# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ferry-installed
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install nginx chromium demo test test-fast lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ferry pretrain
	$(VENV)/bin/ferry simulate

# `ferry server` runs nginx (Debian's package) as its public, Fleet-API-only port.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || \
		(apt-get update -qq && apt-get install -y -qq nginx) || \
		(echo "nginx is not installed: apt-get install nginx (as root)" >&2; exit 1)

# Every run writes report.html; tests/test_run_report.py checks it in a headless Chromium.
chromium:
	@command -v chromium >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) || \
		(echo "chromium is not installed: apt-get install chromium (as root)" >&2; exit 1)

# Two pytest-xdist workers, one test file at a time each, the longest files first
# (tests/conftest.py): half of the suite's time is spent waiting on other processes.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP) nginx chromium
	$(PY) -m pytest -q -ra $(XDIST) --durations=25

# The tests not marked `slow` (no Ray start-up, no real deployment); every module is imported.
test-fast: $(STAMP) nginx chromium
	$(PY) -m pytest -q -ra $(XDIST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .ferry
