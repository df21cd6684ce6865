# Two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
SLOW_TESTS ?= tests

.PHONY: install demo study test test-slow bench sysdeps clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, the CPU build, so no later requirement pulls a CUDA build of it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(STAMP)

# bubblewrap sandboxes the python tool; tests that need it skip with a reason when it is absent.
sysdeps:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 \
	  && apt-get install -y -qq bubblewrap >/dev/null 2>&1)); } \
	  || echo "note: bubblewrap not installed; sandbox-only tests will be skipped"

demo: install sysdeps
	$(PY) -m tepo_jax.demo

# The demo's comparison over 3 seeds (about 9-13 minutes per seed on 2 cores).
study: install sysdeps
	$(PY) -m tepo_jax.study --seeds 3

test: install sysdeps
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The slower end-to-end tests: kill -9 and resume, 2 processes vs 1, SFT+RL on function calls.
test-slow: install sysdeps
	$(PY) -m pytest -q -m slow --run-slow $(SLOW_TESTS)

# Tunix, the peer of benchmarks/tunix_step.py, in a virtualenv of its own (it pins other
# transformers/tokenizers releases than ours).
TUNIX_VENV ?= .venv-tunix
TUNIX_STAMP := $(TUNIX_VENV)/.installed

$(TUNIX_STAMP): benchmarks/requirements-tunix.txt
	test -x $(TUNIX_VENV)/bin/python || python3 -m venv $(TUNIX_VENV)
	$(TUNIX_VENV)/bin/python -m pip install -q --upgrade pip
	$(TUNIX_VENV)/bin/python -m pip install -q -r benchmarks/requirements-tunix.txt
	touch $@

# The peers the benchmarks measure against (TRL for benchmarks/rl_step.py, Tunix for
# benchmarks/tunix_step.py), installed for the benchmarks only.
bench: install $(TUNIX_STAMP)
	$(PY) -m pip install -q -r benchmarks/requirements.txt
	TUNIX_PYTHON=$(TUNIX_VENV)/bin/python $(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) $(TUNIX_VENV) *.egg-info .pytest_cache
