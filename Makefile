# make demo : set up .venv (CPU) and run the main job on the tiny preset
# make test : set up .venv (CPU) and run the test suite (kernels through TRITON_INTERPRET=1)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= out

.PHONY: setup demo test test-gpu clean

$(VENV)/.installed: setup.py requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-cpu.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/liveact generate --preset tiny --out-dir $(OUT) --dura-print

test: setup
	$(BIN)/python -m pytest -q -x --durations=15

test-gpu:
	python3 -m pytest -q -m gpu

clean:
	rm -rf $(VENV) $(OUT)
