#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA PyTorch, triton, transformers, numpy and pillow but no internet:
# DeepSpeed (built here, pure Python), diffusers, webdataset, DALI for CUDA 13 and what they need that
# such an image lacks. Downloaded for CPython 3.12 on x86-64 Linux, tarred and split into parts of at most
# 56 MiB, each in its own folder (for transfer tools with a per-copy size limit).
#
#   bash benchmarks/offline_wheels.sh [DEST]        # default DEST: .gpu_wheels (git-ignored)
#
# On the GPU machine, with the parts' folders copied over in order:
#   cat DEST/part-*/wheels.tar.part | tar -x -C /tmp && md5sum -c DEST/wheels.md5 (run in /tmp)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheels/*.whl
#   export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$work/wheels" "$@"
}
# versions: those this project is tested with; the libraries' needs that the CUDA image lacks
download diffusers==0.42.1 importlib_metadata==10.2.0 webdataset==1.0.2 braceexpand hjson pydantic==2.14.3 \
  pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
download nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 nvidia-nvjpeg nvtx optree \
  makefun libcst gast astunparse
# DeepSpeed publishes only a source distribution: build its (pure Python) wheel without compiling ops
"$PY" -m venv "$work/build"
"$work/build/bin/pip" install --quiet wheel setuptools
"$work/build/bin/pip" wheel --quiet --no-deps --no-build-isolation -w "$work/wheels" deepspeed==0.19.8

(cd "$work" && md5sum wheels/*.whl > wheels.md5 && tar -cf wheels.tar wheels && split -b 56M -d -a 2 wheels.tar part-)
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$work/wheels.md5" "$DEST/"
for part in "$work"/part-*; do
  mkdir -p "$DEST/$(basename "$part")"
  mv "$part" "$DEST/$(basename "$part")/wheels.tar.part"
done
ls "$work/wheels" | sed 's/^/  /'
echo "$(ls "$work/wheels" | wc -l) wheels, $(du -sh "$work/wheels.tar" | cut -f1) in $(ls -d "$DEST"/part-* | wc -l) parts under $DEST"
