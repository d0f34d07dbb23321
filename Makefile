# The two commands of the README: `make run` (the default sweep) and `make test`.
# Each creates .venv on first use. TORCH_SPEC picks the torch wheel installed before the project:
# the CPU build by default (fast, small); `make run TORCH_SPEC=torch` takes the CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXPERIMENT ?= mnist_gain
ARGS ?=

.PHONY: run test bench venv clean ui report

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

run: venv
	$(PY) -m sweep +experiment=$(EXPERIMENT) $(ARGS)

ui: venv      # the MLflow UI on ./results (one worker, a free port); prints the runs-table link
	$(PY) -m sweep ui $(ARGS)

report: venv  # re-render the latest sweep's report from ./results, without Ray
	$(PY) -m sweep report $(ARGS)

test: venv
	$(PY) -m pytest -q -ra tests $(ARGS)

bench: venv
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) outputs results .pytest_cache
