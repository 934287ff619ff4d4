# The README's two commands: `make demo` and `make test`. Both set up .venv/ on first use.
PY := .venv/bin/python
# PyTorch's CPU build, pinned so set-up never pulls a multi-GB CUDA build; the package itself asks only torch>=2.4.
TORCH := torch==2.13.0

.PHONY: install demo test test-slow test-gpu bench speedrun clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	test -d .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	rm -rf runs/abc-demo
	.venv/bin/build-llm train --out runs/abc-demo

test: install
	$(PY) -m pytest -q -rs  # -rs: each skipped test's reason, in the summary

test-slow: install
	$(PY) -m pytest -q -rs -m slow || test $$? -eq 5  # 5: no slow tests collected

# The GPU proof on one CUDA device (needs a CUDA build of torch); without CUDA each test says why it skips.
test-gpu: install
	$(PY) -m pytest -q -rs -s -m gpu tests/gpu

# The text for timing `build-llm train` (skipped when the file is absent).
BENCH_TEXT ?= ../shared/data/shakespeare.txt

bench: install
	.venv/bin/build-llm bench --out runs/bench $(if $(wildcard $(BENCH_TEXT)),--text $(BENCH_TEXT))

# Shakespeare speedrun: time to validation loss 1.88 and the loss at 150 s and 5 min, 3 seeds, beside the
# plain recipe in the same run (about 25 minutes of two cores; skipped when the text is absent).
speedrun: install
	$(PY) examples/speedrun.py --data $(BENCH_TEXT) --out runs/speedrun/$$(date -u +%Y%m%d-%H%M%S)

clean:
	rm -rf .venv runs build *.egg-info
