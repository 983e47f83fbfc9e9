#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv/ and install everything san_det needs.
#
# Idempotent: a stamp file records a hash of this script and setup.py; when both are unchanged and
# the venv imports, the script returns in about a second.
#
# detectron2 0.6 comes from the PyPI sdist `pb1-detectron2==0.6`, whose Python sources equal
# upstream v0.6 but which lacks the C++ sources; it is built here with its extension step removed
# (see san_det/compat.py for the run-time side of that).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAN_DET_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.san_det_stamp"
WANT="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.py" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
    && "$VENV/bin/python" -c "import torch, detectron2, san_det, faster_coco_eval" 2>/dev/null; then
    exit 0
fi

echo "[setup_env] installing into $VENV (takes a minute or two on a fresh machine)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
# Pin torch to what is installed so no later requirement can pull another build.
CONSTRAINTS="$VENV/san_det_constraints.txt"
"$VENV/bin/python" - "$CONSTRAINTS" <<'PYEOF'
import sys, torch, torchvision
open(sys.argv[1], "w").write(
    f"torch=={torch.__version__.split('+')[0]}\ntorchvision=={torchvision.__version__.split('+')[0]}\n"
)
PYEOF
PIP+=(-c "$CONSTRAINTS")

# detectron2 0.6's own runtime needs (it is installed with --no-deps below: its metadata pins
# black==21.4b2); san_det's come from setup.py's install_requires at the end.
"${PIP[@]}" "fvcore==0.1.5.post20221221" "iopath>=0.1.7,<0.1.10" pycocotools termcolor yacs \
    tabulate cloudpickle tqdm tensorboard matplotlib omegaconf hydra-core Pillow

if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
    BUILD="$(mktemp -d)"
    "$VENV/bin/python" -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: \
        "pb1-detectron2==0.6" -d "$BUILD"
    tar -xzf "$BUILD"/pb1*detectron2-0.6.tar.gz -C "$BUILD"
    SRC="$(ls -d "$BUILD"/pb1*detectron2-0.6)"
    # The sdist has no detectron2/layers/csrc: build the pure-Python package only.
    sed -i 's/ext_modules=get_extensions(),//' "$SRC/setup.py"
    if grep -q "get_extensions()" <(grep -n "ext_modules" "$SRC/setup.py"); then
        echo "[setup_env] could not strip the C++ extension from detectron2's setup.py" >&2
        exit 1
    fi
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation "$SRC"
    rm -rf "$BUILD"
fi

# san_det with its dependencies, the test extra and CuPy for CUDA 13 (torch 2.14.1's default build);
# also installs san_det_compat.pth (see setup.py).
"${PIP[@]}" --no-build-isolation -e "$ROOT[test,cuda13]"
echo "$WANT" > "$STAMP"
echo "[setup_env] done"
