# Each target sets up what it needs: a fresh clone runs `make quickstart` or `make test` directly.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssl_kit-installed

.PHONY: quickstart test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m ssl_kit.fit --config configs/quickstart.yaml

# Two pytest-xdist workers (one per core of the CI machine), each test file on one worker so a
# module's expensive fixtures (a pretraining run, a 2-rank group) are built once.
PYTEST := $(PY) -m pytest -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST)

# The edit-test loop: everything but the tests marked slow.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf runs .pytest_cache
