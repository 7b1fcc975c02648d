# The two commands of README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) lies on these machines' disk; installing it first keeps pip from fetching CUDA wheels.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint bench clean docs

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN)
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install -e '.[demo]'
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install -e '.[demo,test]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/gradkit demo

# The docs build is part of the test: a broken reference or a stale argument in a docstring fails CI.
test: $(VENV)/.test
	$(PY) -m ruff check src tests
	$(PY) -m pytest -n 2 --durations=15
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The reference site (mkdocs-material + mkdocstrings, from the docstrings) into build/site (git-ignored);
# --strict turns every warning (a broken link, an argument documented but absent from the signature) into a failure.
docs: $(VENV)/.test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(VENV)/.test
	$(VENV)/bin/gradkit bench optimizers --out bench-out

clean:
	rm -rf $(VENV) bench-out gradkit-demo .pytest_cache build/site
