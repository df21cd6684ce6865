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

# The peers the benchmarks measure against (TRL for benchmarks/rl_step.py), installed here only.
bench: install
	$(PY) -m pip install -q -r benchmarks/requirements.txt
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
