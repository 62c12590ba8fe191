#!/usr/bin/env bash
# Builds .devcarry/ (git-ignored through .git/info/exclude) for experiments/gpu_checks.sh on a GPU
# machine that has CUDA PyTorch (Python 3.12) but no package index and no ../shared: the pure-Python
# and cp312 packages rlrank needs beyond that image (Ray without its Java jar and dashboard client,
# tensorly without its sample data sets), and the CIFAR-10 archive and ResNet checkpoints of ../shared.
# Under 64 MiB in all. Run from the repository root; needs pip access here.
set -euo pipefail
grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >>.git/info/exclude
wheels=$(mktemp -d); site=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$wheels" ray=="$(python3 -c 'import ray; print(ray.__version__)')" gymnasium stable-baselines3 tensorly \
  farama-notifications jsonschema jsonschema-specifications referencing rpds-py
unzip_keeping_modes='
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = wheel.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)  # Ray starts gcs_server and raylet as executables
'
for w in "$wheels"/*.whl; do python3 -c "$unzip_keeping_modes" "$w" "$site"; done
rm -rf "$site"/ray/jars "$site"/ray/dashboard/client "$site"/ray/rllib "$site"/ray/llm "$site"/tensorly/datasets/data
mkdir -p .devcarry/shared/data .devcarry/shared/models/cifar-resnet
tar -C "$site" -cf - . | xz -T2 -6 >.devcarry/site312.tar.xz
cp ../shared/data/cifar10-jpeg.tar.gz .devcarry/shared/data/
cp ../shared/models/cifar-resnet/resnet{20,56}-jpeg.pt .devcarry/shared/models/cifar-resnet/
cp experiments/gpu_checks.sh .devcarry/gpu.sh
rm -rf "$wheels" "$site"
du -sh .devcarry
