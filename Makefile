# The two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HYPROF := $(VENV)/bin/hyprof
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard hybrid/*.c hybrid/*.h hybrid/kernels/*.c hybrid/kernels/*.h) analysis/_jsonl.c profiler/_lanes.c
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

# The suite, then the tests of the native paths again on every other SIMD path this CPU has
# (HYPROF_KERNELS) and with the torch small ops (HYPROF_OPS), so that a machine with AVX-512
# also proves the AVX2 and scalar paths its users' CPUs take.
PATH_TESTS := tests/test_kernels.py tests/test_ops.py tests/test_engine.py tests/test_forward.py tests/test_sched.py \
	tests/test_offload.py
test: $(STAMP)
	$(PY) -m pytest -q
	@for path in $$($(PY) -c 'from hybrid import cpu_kernels as k; print(*sorted(set(k.paths()) - {k.available()}))'); do \
		echo "== HYPROF_KERNELS=$$path"; HYPROF_KERNELS=$$path $(PY) -m pytest -q $(PATH_TESTS) || exit 1; \
	done
	@echo "== HYPROF_OPS=torch"
	HYPROF_OPS=torch $(PY) -m pytest -q $(PATH_TESTS)

clean:
	rm -rf $(VENV) reports/* build *.egg-info
