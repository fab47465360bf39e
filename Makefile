# The README's two commands:  `make demo`  and  `make test`.
# Each sets up .venv on first use (Python 3.11, pinned torch CPU wheel) and reuses it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= out/demo
STAMP := $(VENV)/.installed

PIP_PACKAGES := torch==2.13.0 monai==1.6.1 diffdrr==0.6.1 SimpleITK slicer-core==5.11.0.6 \
	slicer-layer-dm trame-slicer itk-rtk pytest hypothesis spekpy xraydb scipy tqdm vtk \
	pydicom pillow matplotlib

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in the same install as the packages that depend on it (monai, diffdrr),
	# so pip takes the local CPU wheel instead of a multi-GB CUDA build.
	$(PY) -m pip install $(PIP_PACKAGES) -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m PedicleScrewPoseLib.cli demo --out $(OUT)

test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed"
	$(PY) -m pytest Testing -q

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) out
