# `make report` and `make test` each create .venv first when it is missing.
.PHONY: setup report test test-fast

setup:
	./scripts/setup.sh

report: setup
	.venv/bin/qkit report

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
