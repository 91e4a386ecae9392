# Two entry points that work on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test install benchmark benchmark-transfer clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo-output

demo-quick: $(STAMP)
	$(BIN)/python examples/demo.py --quick --out demo-output

# Two test processes, each whole test file in one (--dist loadfile: module fixtures such as the
# demo run once): most tests start CLI subprocesses that spend seconds importing torch and timm
# on one core, so two share a 2-core machine well (11.6 -> 7.3 min here). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

benchmark: $(STAMP)
	$(BIN)/python benchmarks/photos.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/export.py

# Level 2 on real ImageNet weights against scikit-learn and fastai (hours on a 2-core CPU; installs
# Debian's dataset-fashion-mnist and a fastai environment of its own in --work).
benchmark-transfer: $(STAMP)
	$(BIN)/python benchmarks/transfer.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
