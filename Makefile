# Two entry points: `make run` and `make test`. Each creates .venv and installs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: run test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,onednn]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/convgap analyze resnet50 mobilenet_v2 convnext_tiny convfirst --batch 1 --threads 2 --out reports/

test: install
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) reports
