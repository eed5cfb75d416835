# The README's two commands: `make demo` (main job) and `make test` (the suite CI runs).
.PHONY: setup demo test test-fast lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/hybridcn demo

lint: setup
	.venv/bin/ruff check .

test: setup lint
	.venv/bin/python -m pytest -q -rs --durations=10

# Unit tests only (no Triton, no browser, no training runs): the quick check while editing.
test-fast: setup lint
	.venv/bin/python -m pytest -q -m "not integration and not slow" tests/unit

bench: setup
	.venv/bin/python bench/bench_serving.py
