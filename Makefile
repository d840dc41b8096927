# Everything needs only python3: the first target that runs creates .venv and installs what it needs
# (`make train` the package alone, `make test` also the [test] extra).
PY ?= python3
VENV := .venv
BASE_STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp

.PHONY: train test test-fast clean

$(BASE_STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $(BASE_STAMP)

$(TEST_STAMP): $(BASE_STAMP)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(TEST_STAMP)

# The main job: train the tiny model on the embedded stdlib corpus, then print generated code.
train: $(BASE_STAMP)
	$(VENV)/bin/codegen-jax train --config configs/tiny.yaml

# The whole suite, slow multi-process tests included. The test process gets the malloc setting that
# `codegen-jax` gives itself (codegen_jax/hostenv.py): XLA steps in-process run 15-30% faster with it.
TEST_ENV := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

test: $(TEST_STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q

test-fast: $(TEST_STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
