# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SINK_PORT ?= 9900

.PHONY: serve test test-lowest lint bench check clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' -e examples/router-acme
	touch $(STAMP)

## Run the router on the embedded default (SQLite under var/) with config/router.yaml,
## beside a local sink that prints what each destination receives. Ctrl-C stops both.
serve: $(STAMP)
	mkdir -p var
	$(BIN)/python -m router.testing.sink --port $(SINK_PORT) & sink=$$!; \
	trap 'kill $$sink 2>/dev/null' EXIT INT TERM; \
	$(BIN)/router serve -c config/router.yaml

## The linter, then the whole test suite.
test: lint
	$(BIN)/python -m pytest -q

## The whole suite again, on the oldest release of each dependency that pyproject.toml
## allows (.ci/floors.py pins them) and on LOWEST_PYTHON: CI gives it the newest Python the
## project supports that the machine has (.ci/newest-python), so one run covers both ends of
## what users install.
LOWEST_PYTHON ?= $(PYTHON)
LOWEST_VENV   := .venv-lowest
test-lowest:
	rm -rf $(LOWEST_VENV)
	$(LOWEST_PYTHON) -m venv $(LOWEST_VENV)
	$(PYTHON) .ci/floors.py > $(LOWEST_VENV)/constraints.txt
	$(LOWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install --quiet -c $(LOWEST_VENV)/constraints.txt \
		-e '.[test]' -e examples/router-acme
	$(LOWEST_VENV)/bin/python --version
	$(LOWEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -iE '^(aiohttp|pydantic|jinja2|redis|pytest)=='
	$(LOWEST_VENV)/bin/python -m pytest -q

## pyflakes, pycodestyle, bugbear and pyupgrade checks, then the type checker (both
## configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

## Benchmarks; figures are printed and recorded in docs/performance.md by hand.
bench: $(STAMP)
	$(BIN)/python -m bench.run core delivery ingest replay

check: $(STAMP)
	$(BIN)/router check -c config/router.yaml

clean:
	rm -rf $(VENV) $(LOWEST_VENV) var build *.egg-info
