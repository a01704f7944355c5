# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
# Both create .venv when missing (scripts/ensure_venv.sh) and install the project into it.
# `make test` lints (ruff, rules in pyproject.toml) before the tests; `make test-fast`: the unit
# tests alone (no Ray, no job end to end), for the edit-test loop.
PY := .venv/bin/python
OUT ?= out/demo

.PHONY: venv demo test test-fast bench clean

venv:
	@bash scripts/ensure_venv.sh

demo: venv
	$(PY) -m jobs.demo --output $(OUT)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) bench/model.py

clean:
	rm -rf out .pytest_cache
