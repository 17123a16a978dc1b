# Two commands do all the set-up on a fresh machine:
#   make demo   — create .venv (CPU torch 2.13.0 from local disk), install gradguard, run `gradguard demo`
#   make test   — same set-up plus dev tools, then ruff, mypy and the whole test suite
# pip only: uv and poetry ignore the local torch file and would download a CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint setup clean bench browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,demo]" "$(TORCH_PIN)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/gradguard demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# Debian's chromium for the report's browser test (playwright drives it; no browser download).
# Needs root and the Debian mirrors; without them the test says why it is skipped.
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "make browser: could not install chromium; the report's browser test will be skipped"

# One torch thread per process: the models under test are tiny, and on a shared 2-core machine
# more threads only oversubscribe (test files ran 5–10× slower without it under load).
test: lint browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/clip.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
