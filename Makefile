# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON := .venv/bin/python
export COMFYUI_PATH ?=

.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) scripts/demo.py --out out/demo

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest tests -q

lint: setup
	$(PYTHON) -m ruff check .
