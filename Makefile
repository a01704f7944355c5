# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
# Both create .venv when missing (scripts/ensure_venv.sh) and install the project into it.
PY := .venv/bin/python
OUT ?= out/demo

.PHONY: venv demo test bench clean

venv:
	@bash scripts/ensure_venv.sh

demo: venv
	$(PY) -m jobs.demo --output $(OUT)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/model.py

clean:
	rm -rf out .pytest_cache
