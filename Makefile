# Two commands matter: `make demo` (train an adapter locally) and `make test`
# (bring up the real local stack and run every test). See README.md.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV = $(shell hack/venv.sh)
PY = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
DEMO_DIR ?= $(CURDIR)/.demo
MODEL_CACHE ?= $(HOME)/.cache/lora-jobs/models/smollm2-135m-instruct
PYTEST_ARGS ?=

# The lints make test and make test-unit run first: ruff (pyflakes' checks), lint-imports (the layers:
# pyproject.toml's [tool.importlinter]) and mypy (strict on the contract, jobs/*.py, jobs/dataprep/
# and jobs/spec/: [tool.mypy]). The venv is named when the recipe runs (see test's comment below).
LINT = v="$$(hack/venv.sh)" && "$$v/bin/python" -m ruff check . && "$$v/bin/lint-imports" --no-logo && \
  "$$v/bin/python" -m mypy

.PHONY: help demo test test-unit stack-up stack-down images kind-up kind-down bench-s3 clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The demo needs Python 3.11 and nothing else: no root, apt, Go or Docker (hack/install-system.sh is the
# stack's, for make test). It uses make test's Python environment (hack/venv.sh) and asks for it while the
# recipe runs, not through $(PY): a missing Python or venv module then stops the demo with hack/venv.sh's
# message and fix, not with a "bin/python: not found" afterwards.
demo:  ## train a LoRA adapter on the demo data with SmolLM2-135M, locally (no cluster; a folder as object store)
	@py="$$(hack/venv.sh)/bin/python"; \
	  "$$py" -m jobs convert-gguf $(MODEL_CACHE) >/dev/null; \
	  mkdir -p $(DEMO_DIR) && ln -sfn $(MODEL_CACHE) $(DEMO_DIR)/base-model; \
	  "$$py" -m launcher submit examples/demo/spec.yaml --local; \
	  "$$py" examples/demo/show.py $(DEMO_DIR)/artifacts/smollm2-support

# The Python environment is named at run time ($$(hack/venv.sh)), not by $(PY): make expands a recipe's
# lines before running them, which would create it before hack/prepare-test.sh could, beside the Go builds.
# The pieces only some tests need (mc, JobSet, Kueue) build in the background while the first tests run;
# a test that needs one before it is done waits for that build (hack/build-stack.sh's per-piece lock).
# They build as SCHED_IDLE (chrt --idle): on CPU time no test wants. Beside an ordinary-priority compile,
# a test's CPU training run (OpenMP threads that spin at each barrier) slowed several-fold: on a cold
# machine the 4-step one-process run of test_distributed_cpu (about 1 min when quiet) took 10.5 min beside
# the Kueue build and one other compile.
# dockerd starts in hack/prepare-test.sh (the images build beside the Go builds), so the trap that stops
# the stack is set before it.
# The suite runs as four groups (tests/conftest.py, LORA_TEST_GROUP), two pytest processes at a time on the one
# stack: "cpu" (train, node, docker) beside "wait" (kube, s3, helm, mlflow, jobset, kueue: tests that mostly wait
# on servers and controllers), then "alone" (the tests that stop a shared server) beside "unit" (offline). The
# second of each pair runs under nice 5: it takes the CPU the first leaves, and a CPU training run (OpenMP
# threads that spin at each barrier) slows several-fold beside an equal-priority neighbour. The first prints as
# it runs, the second writes to a log printed when both are done. Each prints its own tier table and 25 slowest;
# the last lines say how each group ended, and make test fails if any failed (exit 5, nothing selected, is not
# a failure: PYTEST_ARGS may select one group's tests only).
PYTEST = "$$(hack/venv.sh)/bin/python" -m pytest -p no:cacheprovider --durations=25 $(PYTEST_ARGS)
# pair FIRST SECOND: the two groups side by side; sets rc_FIRST and rc_SECOND
PAIR = pair() { log=$$(mktemp /tmp/lora-jobs-test-$$2.XXXXXX); \
  { LORA_TEST_GROUP=$$2 nice -n 5 $(PYTEST) >"$$log" 2>&1 & bg=$$!; }; \
  echo "make test: group $$1 runs here; group $$2 runs beside it, its output follows"; \
  rc=0; LORA_TEST_GROUP=$$1 $(PYTEST) || rc=$$?; eval "rc_$$1=$$rc"; \
  rc=0; wait "$$bg" || rc=$$?; eval "rc_$$2=$$rc"; bg=; \
  printf '\n%s\n' "======== group $$2, run beside group $$1 ========"; cat "$$log"; rm -f "$$log"; }
test:  ## build and start the real local stack, run the whole test suite, stop the stack
	@bg=; trap '[ -z "$$bg" ] || kill "$$bg" 2>/dev/null || true; hack/stack.sh down' EXIT; \
	  hack/prepare-test.sh $(MODEL_CACHE) && \
	  $(LINT) && hack/stack.sh up && \
	  { chrt --idle 0 hack/build-stack.sh mc jobset kueue >/dev/null 2>&1 & } && \
	  export LORA_TEST_MODEL_DIR=$(MODEL_CACHE) && $(PAIR) && pair cpu wait && pair alone unit && \
	  outcome() { case $$2 in 0) echo "make test: group $$1: passed";; 5) echo "make test: group $$1: no test selected";; \
	    *) echo "make test: group $$1: FAILED (pytest exit $$2)";; esac; } && \
	  echo && outcome cpu $$rc_cpu && outcome wait $$rc_wait && outcome alone $$rc_alone && outcome unit $$rc_unit && \
	  ok() { [ $$1 = 0 ] || [ $$1 = 5 ]; } && ok $$rc_cpu && ok $$rc_wait && ok $$rc_alone && ok $$rc_unit && \
	  [ "$$rc_cpu$$rc_wait$$rc_alone$$rc_unit" != 5555 ]

test-unit:  ## lint (ruff, the import layers, mypy on the contract) and the fast offline tests
	@$(LINT)
	@$(PY) -m pytest -m unit -q -p no:cacheprovider $(PYTEST_ARGS)

stack-up:  ## start the local stack and leave it running (source .stack/env)
	@hack/install-system.sh && hack/stack.sh up

stack-down:  ## stop the local stack
	@hack/stack.sh down

images:  ## build the trainer and launcher images on the local Docker engine
	@hack/build-images.sh

kind-up:  ## kind cluster (node image built here when none can be pulled) + images + chart with dev MinIO + a sample run
	@hack/kind-up.sh

kind-down:
	@hack/kind-down.sh

clean:  ## remove local state (.stack, .demo); the build cache in ~/.cache/lora-jobs stays
	@hack/stack.sh down || true
	rm -rf .stack .demo
