# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The exact versions CI tested (`pip freeze` of a fresh install); `make lock` refreshes it.
LOCK   := requirements.lock
EXTRAS := dev,llamacpp,ct,onnx,bench,lora

.PHONY: setup demo test test-fast bench clean lock browser

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is the CPU wheel (torch==2.13.0+cpu); a bare `torch` would pull a multi-GB CUDA build.
	# llama-cpp-python compiles llama.cpp (~7 min on 2 cores the first time; pip caches the wheel).
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Resolve pyproject.toml's dependencies afresh in a scratch venv and pin what was installed.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q torch==2.13.0
	.venv-lock/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	.venv-lock/bin/python -m pip freeze --exclude-editable > $(LOCK)
	rm -rf .venv-lock

setup: $(STAMP)

demo: setup
	$(VENV)/bin/compactor run recipes/demo.yaml --out runs/demo --force
	cp runs/demo/results.md bench/results/demo.md

# The report test renders report.html in headless chromium: installed here where apt-get is
# available (root, Debian), else that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "chromium could not be installed: the report's browser test will skip"

# A missing extra fails the run (COMPACTOR_REQUIRE_EXTRAS); the header lists the versions.
test: setup browser
	HF_HUB_OFFLINE=1 COMPACTOR_REQUIRE_EXTRAS=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 COMPACTOR_REQUIRE_EXTRAS=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
