# The two commands README.md promises: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test demo lint rust-test worker-image-test chart-test crds

## Run every test: formatting, clippy, Rust unit/integration/e2e tests (real Redis, RabbitMQ and
## Celery), the worker image's tests and the Helm chart's tests.
test: lint rust-test worker-image-test chart-test

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

rust-test:
	$(CARGO) test --workspace --lib --bins --tests --locked --no-fail-fast

worker-image-test:
	bash worker-image/test.sh

chart-test:
	bash charts/test.sh

## Regenerate crds/ (and the chart's copy) from the Rust types.
crds:
	$(CARGO) run -q -p celery-operator -- crd --out-dir crds
	bash charts/sync-crds.sh

## The operator's main job, live: the operator against the e2e control-plane double with a private
## Redis and real Celery workers; a burst of tasks, a timeline and target/demo/demo.svg. Not part of
## `make test`. `make demo DEMO_ARGS=--hold` keeps it running for kubectl until Ctrl-C.
demo:
	$(CARGO) build -q -p celery-operator
	$(CARGO) run -q -p celery-e2e --example demo -- $(DEMO_ARGS)
