#!/usr/bin/env bash
# Issue 24's CPU results in benchmarks/results/: every gated form side by side with the floor
# (the 4096 -> 4096 three-gated-pipe adapter and the shipped example), INT8 (MatMulNBits)
# against FP32 on the dense 4096 pipe, and the per-bucket form choice of a build.
# Run from the repository root:  bash benchmarks/run_forms_cpu.sh [DATE-TAG]
set -euo pipefail
tag=${1:-$(date -u +%F)}
out=benchmarks/results
adapters=build/bench-adapters
bench="python -m prism_deploy bench"
forms="ort-cpu,ort-cpu/A,ort-cpu/B,ort-cpu/sparse,ort-cpu/grouped"

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
python benchmarks/make_adapters.py -o "$adapters"
$bench "$adapters/big-3pipe.safetensors" --backends "$forms" --precision fp32 --batch 1,8,64 --threads 1 \
    --warmup 500 --repeat 25 --json-out "$out/$tag-cpu-4096-3pipe-forms.json"
$bench "$adapters/big-dense.safetensors" --backends ort-cpu --precision fp32,int8 --batch 1,8,64 --threads 1 \
    --warmup 500 --repeat 40 --json-out "$out/$tag-cpu-4096-dense-int8.json"
$bench examples/demo-adapter.safetensors --backends "$forms" --precision fp32,int8 --batch 1,8,64 --threads 1 \
    --warmup 300 --repeat 50 --json-out "$out/$tag-cpu-example-forms.json"
python -m prism_deploy build "$adapters/big-3pipe.safetensors" --target ort-cpu --precision fp32 \
    --batch 1:1:64 --seq 1:1:1 --no-parity -o build/eng-3pipe
python -m prism_deploy inspect build/eng-3pipe
python -m prism_deploy inspect build/eng-3pipe --json > "$out/$tag-cpu-4096-3pipe-build-forms.json"
