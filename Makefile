# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON := .venv/bin/python
export COMFYUI_PATH ?=

.PHONY: setup demo test lint workflows thumbnails browser-test

setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) scripts/demo.py --out out/demo

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest tests -q

lint: setup
	$(PYTHON) -m ruff check .

# Frontend (issue 4). Regenerate the example workflows (--schedule also re-profiles the bundled
# schedule), run the real-browser test alone, or retake the thumbnails and README screenshots.
workflows: setup
	$(PYTHON) scripts/make_example_workflows.py

browser-test: setup
	$(PYTHON) -m pytest tests/test_browser.py -q

thumbnails: setup
	BLOCK_CACHE_THUMBNAILS=1 $(PYTHON) -m pytest tests/test_browser.py -q
