#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the GPU machine beyond what that machine has, fetched into .whl/ (git-ignored)
# for the device tool to carry (`carry: [".whl"]`; the working tree and carried paths travel within 64 MiB).
#
# The GPU machine (Python 3.12; torch 2.11, transformers 5.17, pyarrow, numpy, pillow, timm, torchvision,
# onnxruntime, jinja2, scikit-image, scipy, pyyaml, sentencepiece, safetensors, fsspec, accelerate: the list in
# the device README) lacks what the stage modules import: pydantic (curate.config) with pydantic-core,
# annotated-types, typing-inspection and a typing-extensions >= 4.16; diffusers (the encode stage's VAE, the
# trainer's MMDiT); open_clip_torch with ftfy and wcwidth (the score stage). No Ray: bench/gpu.py calls each
# stage's setup and process directly, and nothing on that path imports Ray. Versions are this checkout's venv's,
# so the GPU run imports what the suite tested. Measured: 9 wheels, 11.6 MB.
#
#   bash bench/gpu_carry.sh          # then the command in docs/performance.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES="diffusers open_clip_torch pydantic pydantic_core annotated_types typing_inspection typing_extensions ftfy wcwidth"
pins=$("$PY" - "$PACKAGES" <<'PY'
import importlib.metadata as m, sys
print(" ".join(f"{name}=={m.version(name)}" for name in sys.argv[1].split()))
PY
)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls -l .whl
du -ch .whl/*.whl | tail -1
