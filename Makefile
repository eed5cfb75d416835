# The README's two commands: `make demo` (main job) and `make test` (the suite CI runs).
.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/hybridcn demo

lint: setup
	.venv/bin/ruff check .

test: setup lint
	.venv/bin/python -m pytest -q -rs --durations=10

bench: setup
	.venv/bin/python bench/bench_serving.py
