# Two commands do everything on a fresh machine:
#   make demo   set up, then run the Safe-CB loop on the embedded default (configs/tiny.yaml)
#   make test   set up, then run the test suite
# Both are idempotent: set-up is skipped once .venv is complete.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN_DIR ?= runs/demo

.PHONY: setup browser demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: with it installed, the range in pyproject.toml pulls no CUDA build.
	# On a machine with a CUDA torch already in the venv, set TORCH_SPEC to skip this pin.
	$(PY) -m pip install -q "$${TORCH_SPEC:-torch==2.13.0}"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/safecb run --config configs/tiny.yaml --run-dir $(RUN_DIR)

# The report's test renders it in headless Chromium: Debian's package, installed once (as root) when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: setup browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
