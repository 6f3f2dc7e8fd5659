# Every target does its own set-up: typing `make test` or `make repro` on a fresh machine is all it takes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests and CPU runs: one BLAS thread per process, so parallel notebooks do not oversubscribe the cores.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: venv check test test-wheel test-faults test-paper export-check notebooks lab repro verify budget bench bench-gpu

venv: $(STAMP)

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel packaging
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

## THE test command, what CI runs (`.ci/run`): everything the README relies on. Notebooks and library agree and are
## clean; every notebook's tests, `slow` cells included (only `gpu` cells need a GPU); every test in tests/: the smoke
## pipeline end to end, the fault-injection suite, the paper profile's dry run and the wheel (~40 min on 2 cores).
## pytest lists each skipped test with its reason, one line each (-rs in pytest.ini).
check: venv export-check
	$(BIN)/nbdev_test --n_workers 2 --timing --flags slow
	$(BIN)/python -m pytest -q tests

## The quick developer loop (~10 min): the same without the slow cells and the slow tests (`make check` runs them).
test: venv export-check
	$(BIN)/nbdev_test --n_workers 2 --timing
	$(BIN)/python -m pytest -q -m "not slow" tests

## The built wheel in an empty virtualenv, used outside the repository (~3 min, ~6 GB of runtime requirements).
test-wheel: venv
	$(BIN)/python -m pytest -q -m slow tests/test_wheel.py

## Fault injection on the smoke pipeline (~10 min): inputs changed under a running `dvc repro`, Ctrl-C of a stage,
## each run-state file corrupted, a tampered world (the fast fault tests also run in `make test`).
test-faults: venv
	$(BIN)/python -m pytest -q -m slow tests/test_faults.py

export-check: venv
	@before="$$(git status --porcelain; git diff | sha1sum)"; \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_export && PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_clean; \
	after="$$(git status --porcelain; git diff | sha1sum)"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "export-check: nbdev_export/nbdev_clean changed the tree; run them and commit the result:"; \
	  git status --short; exit 1; \
	fi; echo "export-check: library and notebooks agree, notebooks are clean"

## Execute library notebooks top to bottom in place, so they are committed with their outputs (NB=nbs/x.ipynb for one).
NB ?= $(wildcard nbs/[0-9]*.ipynb) nbs/index.ipynb
notebooks: venv
	OMP_NUM_THREADS=1 $(BIN)/python tools/execute_notebooks.py $(NB)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_clean

## JupyterLab on the notebooks, with the project's kernel (the venv's python3).
lab: venv
	$(BIN)/jupyter lab nbs

## Dry run of the paper profile: its own dvc.yaml stages via `dvc repro` in a temporary copy, on CPU, ViT-B-32 (QuickGELU,
## 224 px) with random weights behind the `openai` tag, fixture datasets in their real layouts, tiny budgets (<= 15 min).
test-paper: venv
	cd tests && ../$(BIN)/python paper_dry_run.py

## The main job: reproduce the whole study with DVC, exactly `dvc repro` with the venv's binaries (params.yaml: the
## miniature profile, ~57 min on 2 CPU cores). The data stage makes data/ itself. Other profiles are an explicit switch
## that git shows: `python -m tga_zsr.pipeline profile smoke|paper` (see README).
repro: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

## Re-run the study, then say per metric whether it reproduces the published numbers committed in git (tolerance in
## percentage points). `dvc repro` re-runs only what is missing or out of date; FORCE=1 re-runs every stage.
TOLERANCE ?= 1.0
verify: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro $(if $(FORCE),--force)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m tga_zsr.pipeline verify --tolerance $(TOLERANCE)

## The fine-tuning budget check (issue 10): FT-Adv, TeCoA and TGA-ZSR fine-tuned for 100..1600 steps, one seed, on the
## data/ and pretrained model of this checkout (`dvc repro pretrain` makes them); writes results/budget/ (commit it:
## the report's stages read it). Resumable; ~40 min on 2 CPU cores.
budget: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro pretrain
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m tga_zsr.budget

bench: venv
	$(BIN)/python benchmarks/bench_step.py

## GPU readiness (needs CUDA): the paper-scale TGA-ZSR step and PGD-100 evaluation, next to the paper's Table 8.
bench-gpu: venv
	$(BIN)/python benchmarks/bench_paper_gpu.py
