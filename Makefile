# The two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HYPROF := $(VENV)/bin/hyprof
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard hybrid/*.c hybrid/*.h) analysis/_jsonl.c profiler/_lanes.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# A hybrid run on the default model (deepseek-v2-lite-mini, made and cached on first use):
# experts on the CPU, the rest on the emulated accelerator; then its report, plots and trace.
demo: $(STAMP)
	$(HYPROF) run -p 64 -n 16 -r 3 --accel emulated -ot '\.ffn_.*_exps\.=CPU' -o reports/demo.jsonl --force
	$(HYPROF) report reports/demo.jsonl --md reports/demo.md --force --plots reports/demo
	$(HYPROF) trace reports/demo.jsonl -o reports/demo.trace.json --force
	@echo "report: reports/demo.md, plots: reports/demo/, trace (Perfetto): reports/demo.trace.json"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) reports/* build *.egg-info
