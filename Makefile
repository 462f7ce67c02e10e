# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv when missing and installs the package (CPU torch 2.13.0 + pinned versions) in it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: demo test verify package onnx benchmark clean-demo

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

verify: $(STAMP)
	$(PY) tools/verify_bundle.py --all

package: $(STAMP)
	$(PY) tools/package_bundle.py --all --check

onnx: $(STAMP)
	$(PY) tools/export_onnx.py --all --out build/onnx

benchmark: $(STAMP)
	$(PY) tools/benchmark.py --all --keep-freed-memory --out build/benchmark.md --json build/benchmark.json --plot build/benchmark.png

clean-demo:
	rm -rf demo_out
