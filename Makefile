# The two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HYPROF := $(VENV)/bin/hyprof
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard hybrid/*.c)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# A hybrid run on the default model (made and cached on first use), then its report and plots.
demo: $(STAMP)
	$(HYPROF) model make --preset tiny -o reports/tiny.gguf --force
	$(HYPROF) model info reports/tiny.gguf -ngl 99 -ot '\.ffn_.*_exps\.=CPU'

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) reports/* build *.egg-info
