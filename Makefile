# The two entry points: `make demo` (the main job on built-in data) and `make test`.
# Both create or reuse .venv and install what they need; nothing else is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: demo test docs venv clean

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

# The main job: train MobileNet 0.5-48 on the built-in digits with the paper's recipe (TF RMSprop,
# exponential decay; lr and decay scaled to a 15-epoch run: x0.85 a epoch), then score the final weights on
# the 359 held-out digits. Threads and loader processes are train's defaults (for these in-memory digits and
# this small model: one thread, no worker). About 2 minutes on 2 cores; README "Training" has the figures.
DEMO_TRAIN := --recipe paper --lr 0.02 --lr-step-size 1 --lr-gamma 0.85 --alpha 0.5 --resolution 48 --epochs 15 \
	--batch-size 32 --min-scale 0.5

demo: $(VENV)/.installed
	$(VENV)/bin/mobilenets summary --alpha 1.0 --resolution 224
	$(VENV)/bin/mobilenets paper --plot $(OUT)/paper
	rm -rf $(OUT)/digits
	$(VENV)/bin/mobilenets train $(DEMO_TRAIN) --out $(OUT)/digits
	$(VENV)/bin/mobilenets evaluate --checkpoint $(OUT)/digits/last.pt

# One pytest process per test file (tests/run_files.py says why); the last line sums the whole suite.
# JOBS=2 runs two files at a time, the slowest first (the files that time things still run alone).
JOBS ?= 1
test: $(VENV)/.installed-test
	$(PY) tests/run_files.py --jobs $(JOBS)

# The documentation site (mkdocs.yml) in site/, with warnings as errors, as tests/test_docs_site.py builds it.
docs: $(VENV)/.installed-test
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(OUT) .pytest_cache site
