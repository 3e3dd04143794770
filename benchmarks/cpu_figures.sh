#!/usr/bin/env bash
# The README's CPU speed figures, regenerated: loader-only images/s (`patfast bench data`: the digits and a JPEG
# ImageFolder) and the training step's paths on the bundled default pair (`patfast bench train`: fast, reference,
# floor). OUT/made_by.txt says which commit made them. About 10 minutes on 2 cores; run it with nothing else running.
# Usage: bash benchmarks/cpu_figures.sh OUT        (PYTHON=... picks the interpreter; default: python)
set -euo pipefail
out=${1:?usage: bash benchmarks/cpu_figures.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
mkdir -p "$out/data_cpu" "$out/e2e_cpu"
"$py" "$here/provenance.py" | tee "$out/made_by.txt"
loader=(--img-size 224 --batch-size 128 --batches 20 --workers 2 --no-progress)
"$py" -m patfast bench data --data digits "${loader[@]}" --json "$out/data_cpu/digits.json" \
    --md "$out/data_cpu/digits.md"
[ -d "$out/jpegs/train" ] || "$py" "$here/make_jpeg_folder.py" "$out/jpegs"
"$py" -m patfast bench data --data "imagefolder:$out/jpegs" "${loader[@]}" --json "$out/data_cpu/jpeg_folder.json" \
    --md "$out/data_cpu/jpeg_folder.md"
# the demo's pair at the demo's size; compiled where the path compiles (the first steps are untimed)
"$py" -m patfast bench train --teacher resnet10t --student deit_tiny_patch16_224 --img-size 32 --batch-size 64 \
    --classes 10 --steps 10 --warmup 3 --device cpu --json "$out/e2e_cpu/bench_train.json" \
    --md "$out/e2e_cpu/bench_train.md"
echo "done: $out"
