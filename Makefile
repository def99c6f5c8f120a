# Two set-up commands: `make demo` and `make test`. Both create .venv and install on first use, from the checked-in
# lock of exact versions (requirements.lock), so a fresh machine gets what was tested.
# torch is installed first through TORCH_SPEC because a bare `torch` requirement pulls a multi-GB CUDA build; the
# lock leaves torch out (pip-compile --unsafe-package torch) so that any build of TORCH_VERSION satisfies it. On a
# GPU machine: `make test TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
VENV ?= .venv
LOCK ?= requirements.lock
PIP_TOOLS ?= pip-tools==7.7.0
PIP_VERSION ?= 26.3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench lock clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip==$(PIP_VERSION) setuptools
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c $(LOCK) --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nanoseek demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[bench]'
	$(BIN)/python benchmarks/forward.py

# Regenerate requirements.lock: every extra resolved together (so `.[bench]` is pinned too), torch held at
# TORCH_VERSION and left out (--unsafe-package torch; setuptools, pip-tools' default unsafe package, is then pinned;
# pip is pinned by PIP_VERSION). Commit the result with what it tested.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet $(PIP_TOOLS)
	echo "torch==$(TORCH_VERSION)" > .lock-venv/torch.txt
	.lock-venv/bin/pip-compile --quiet --all-extras --strip-extras --unsafe-package torch \
		--no-emit-index-url --no-emit-find-links --constraint .lock-venv/torch.txt \
		--output-file $(LOCK) pyproject.toml
	sed -i 's|--constraint=.lock-venv/torch.txt|--constraint=<torch==$(TORCH_VERSION)>|' $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build *.egg-info
