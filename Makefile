# The two commands of the README. Both create/refresh .venv first (seconds when up to date).
# The CPU behaves like one core here: one OpenMP thread avoids spin-wait overhead (KERNELS.md).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup test demo

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) train_net.py --config-file configs/Demo/shapes_retinanet.yaml
