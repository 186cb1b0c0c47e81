#!/usr/bin/env bash
# Where pip works: fetch what the device kit needs on a GPU image that has Python 3.12 and a CUDA
# build of torch but no megatron-core (the lent single-GPU machine) into .whl/ (git ignores it).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "megatron-core==0.16.1"
ls -l .whl
