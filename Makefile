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

test: $(STAMP)
	$(PY) -m pytest

# The edit-test loop: everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf runs .pytest_cache
