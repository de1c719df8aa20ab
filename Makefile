# The two entry points: `make demo` (the main job on built-in data) and `make test`.
# Both create or reuse .venv and install what they need; nothing else is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: demo test venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps record what was installed; they are redone when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/mobilenets summary --alpha 1.0 --resolution 224
	$(VENV)/bin/mobilenets paper --plot $(OUT)/paper

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT) .pytest_cache
