# The README's commands (the test tiers, the demo) and the check that needs a CUDA GPU
# (docs/GPU_CHECK.md). All create/refresh .venv first (seconds when up to date).
# The CPU acts as one core here: one OpenMP thread avoids spin-waits (docs/BENCHMARKS.md#threads).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup test test-all demo gpu-check

setup:
	@bash tools/setup_env.sh

# test: every test but those marked slow (multi-process runs, trainings, torch.compile and kernel
# builds, scripts and Python run in child processes): about 3 minutes on 2 CPUs.
# test-all: the whole suite (CI, .ci/run).
test: setup
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) train_net.py --config-file configs/Demo/shapes_retinanet.yaml

# CUDA tests and GPU benchmarks (float32 and AMP, vs cuDNN and FlexAttention) in <= 8 minutes;
# without a CUDA GPU it says so and fails.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py
