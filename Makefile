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
	$(CARGO) test --workspace --lib --bins --tests --locked

worker-image-test:
	bash worker-image/test.sh

chart-test:
	bash charts/test.sh

## Regenerate crds/ (and the chart's copy) from the Rust types.
crds:
	$(CARGO) run -q -p celery-operator -- crd --out-dir crds
	bash charts/sync-crds.sh

## The operator's main job, locally: print the CRDs and the Deployments it would create from examples/.
demo:
	$(CARGO) build -q -p celery-operator
	./target/debug/celery-operator crd | grep -E '^(kind|  name):'
	./target/debug/celery-operator render examples/
