# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv when missing and installs the package (CPU torch 2.13.0 + pinned versions) in it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed
# MONAI Label's server environment (its own venv: monailabel must not change the test environment): see README
ML_VENV ?= .venv-monailabel
ML_PY := $(ML_VENV)/bin/python
ML_STAMP := $(ML_VENV)/.medseg-installed

.PHONY: demo test verify package onnx benchmark benchmark-cases clean-demo monailabel-env monailabel-test monailabel-timing

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# monailabel 0.8.5 imports distutils (Python <= 3.11); --no-deps: its requirements would replace CPU torch
$(ML_STAMP): setup.cfg pyproject.toml constraints.txt tools/monailabel/requirements.txt
	test -x $(ML_PY) || $(PYTHON) -m venv $(ML_VENV)
	$(ML_PY) -c "import distutils" || { echo "monailabel 0.8.5 needs Python <= 3.11 (distutils)"; exit 1; }
	$(ML_PY) -m pip install -q --upgrade pip
	$(ML_PY) -m pip install -q torch==2.13.0
	$(ML_PY) -m pip install -q -c constraints.txt -e .
	$(ML_PY) -m pip install -q -c constraints.txt -r tools/monailabel/requirements.txt
	$(ML_PY) -m pip install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
	touch $(ML_STAMP)

monailabel-env: $(ML_STAMP)

# the real server test alone (also part of `make test`)
monailabel-test: $(STAMP) $(ML_STAMP)
	MEDSEG_MONAILABEL_PYTHON=$(ML_PY) $(PY) -m pytest -q tests/test_monailabel.py

# inference time of each bundle through the server, configs as shipped, BraTS-sized studies (for the README)
monailabel-timing: $(STAMP) $(ML_STAMP)
	MEDSEG_MONAILABEL_FULL_SIZE=1 MEDSEG_MONAILABEL_PYTHON=$(ML_PY) $(PY) -m pytest -q -s tests/test_monailabel.py -k "infer"

demo: $(STAMP)
	$(PY) tools/demo.py --out demo_out

test: $(STAMP) $(ML_STAMP)
	MEDSEG_MONAILABEL_PYTHON=$(ML_PY) $(PY) -m pytest -q tests

verify: $(STAMP)
	$(PY) tools/verify_bundle.py --all

package: $(STAMP)
	$(PY) tools/package_bundle.py --all --check

onnx: $(STAMP)
	$(PY) tools/export_onnx.py --all --out build/onnx

benchmark: $(STAMP)
	$(PY) tools/benchmark.py --all --keep-freed-memory --out build/benchmark.md --json build/benchmark.json --plot build/benchmark.png

# issue 16's table: machine peaks, cost per patch, a whole synthetic BraTS case through each BraTS bundle, goals
# (2 threads; several minutes: three whole-case runs and the per-patch timings; the case is cached in build/bench_case)
benchmark-cases: $(STAMP)
	$(PY) tools/benchmark.py --cases --threads 2 --case-repeats 3 --out build/benchmark_cases.md --json build/benchmark_cases.json

clean-demo:
	rm -rf demo_out
