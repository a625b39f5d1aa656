#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA PyTorch, triton, transformers, numpy and pillow but no internet,
# downloaded for CPython 3.12 on x86-64 Linux, in two sets for transfer tools with a per-copy size limit:
#   DEST/core/*.whl                      DeepSpeed (built here, pure Python), diffusers, webdataset, torchmetrics and what
#                                        they need (~11 MiB): enough for `gpu_suite.sh OUT kernels|norm`
#   DEST/dali/part-NN/wheels.tar.part    DALI for CUDA 13 and its needs (~250 MiB), tarred and split into
#   DEST/dali/wheels.md5                 parts of at most 56 MiB, each in its own folder: `... OUT data`
#
#   bash benchmarks/offline_wheels.sh [DEST]        # default DEST: .gpu_wheels (git-ignored)
#
# On the GPU machine (a per-copy limit means one copy per folder, parts in order):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/core/*.whl
#   cat DEST/dali/part-*/wheels.tar.part | tar -x -C /tmp && (cd /tmp && md5sum -c $OLDPWD/DEST/dali/wheels.md5)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheels/*.whl
#   export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/core" "$work/dali/wheels"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() {  # download FOLDER REQUIREMENT...
  local into=$1
  shift
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$into" "$@"
}
# versions: those this project is tested with; the libraries' needs that the CUDA image lacks
download "$work/core" diffusers==0.42.1 importlib_metadata==10.2.0 webdataset==1.0.2 simplejpeg==1.9.0 braceexpand hjson \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  torchmetrics==1.9.0 lightning-utilities==0.15.3 nltk==3.10.4 joblib==1.6.0 click==8.5.1
# DALI's pins: libnvcomp 5 (not the newest, 6) and nvimgcodec[all] (nvjpeg, nvjpeg2k, nvtiff); --no-deps checks none
download "$work/dali/wheels" nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
  nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 nvtx==0.2.17 optree==0.20.0 \
  makefun==1.16.0 libcst==1.9.0 gast==0.7.0 astunparse==1.6.3
# DeepSpeed publishes only a source distribution: build its (pure Python) wheel without compiling ops
"$PY" -m venv "$work/build"
"$work/build/bin/pip" install --quiet wheel setuptools
"$work/build/bin/pip" wheel --quiet --no-deps --no-build-isolation -w "$work/core" deepspeed==0.19.8

(cd "$work/dali" && md5sum wheels/*.whl > wheels.md5 && tar -cf wheels.tar wheels && split -b 56M -d -a 2 wheels.tar part-)
rm -rf "$DEST"
mkdir -p "$DEST/dali"
mv "$work/core" "$DEST/core"
cp "$work/dali/wheels.md5" "$DEST/dali/"
for part in "$work"/dali/part-*; do
  mkdir -p "$DEST/dali/$(basename "$part")"
  mv "$part" "$DEST/dali/$(basename "$part")/wheels.tar.part"
done
ls "$DEST/core" "$work/dali/wheels" | sed 's/^/  /'
echo "core: $(ls "$DEST/core" | wc -l) wheels, $(du -sh "$DEST/core" | cut -f1); dali: $(ls "$work/dali/wheels" | wc -l)" \
  "wheels, $(du -sh "$work/dali/wheels.tar" | cut -f1) in $(ls -d "$DEST"/dali/part-* | wc -l) parts under $DEST/dali"
