# The two commands of the README: `make demo` and `make test`. Both create .venv and
# install into it when missing, so they work on a fresh clone.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider

SOURCES := app data train serve_graphs actors bench tests

.PHONY: install demo test lint test-unit test-integration test-chaos test-system test-rules clean

# torch goes first and pinned: 2.13.0 is the CPU wheel; anything looser pulls a CUDA
# build of several GB. DeepSpeed's setup imports torch, so it builds without isolation,
# against the torch just installed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed==0.19.*"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/scaledl demo $(ARGS)

# Tiers run one after another, so at most one Ray cluster lives at a time.
test: install lint test-unit test-integration test-system

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

# On every core (pytest-xdist), a file's tests on one worker. The schemathesis fuzz file
# runs beside them in a process of its own (its log follows theirs): its generated cases
# share a node id, which xdist cannot schedule.
FUZZ := tests/unit/test_api_fuzz.py
test-unit: install
	@log=$$(mktemp); $(PYTEST) $(FUZZ) -q >$$log 2>&1 & fuzz=$$!; \
	$(PYTEST) tests/unit -q -n auto --dist loadfile --ignore=$(FUZZ); rest=$$?; \
	wait $$fuzz; status=$$?; echo "$(FUZZ):"; cat $$log; rm -f $$log; \
	[ $$rest -eq 0 ] && [ $$status -eq 0 ]

# The Prometheus config and rules alone (also part of test-unit): promtool from the
# distribution's prometheus package.
test-rules:
	cd cluster/prometheus && promtool check config prometheus.yml && promtool test rules tests/*.yml

# The Ray tiers print their 15 slowest tests: the suite's budget is 25 minutes.
# The chaos tier (faults under load, every request counted; it prints its table at the
# end) runs in the integration tier's pytest session, after it: both use one Ray cluster
# and one trained platform (tests/ray_platform.py). `make test-chaos` runs it alone.
test-integration: install
	$(PYTEST) tests/integration tests/chaos -q --durations=15

test-chaos: install
	$(PYTEST) tests/chaos -q

test-system: install
	$(PYTEST) tests/system -q --durations=15

clean:
	rm -rf $(VENV) .scaledl
