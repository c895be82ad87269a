.PHONY: install test lint bench fuzz
install:
	python3 -m pip install -e '.[test]'
test:
	python3 -m pytest -q
lint:
	ruff check . && ruff format --check .
bench:
	python3 bench/run_all.py
fuzz:
	python3 -m pip install -q -e '.[fuzz]' && python3 tests/fuzz/run_all.py
