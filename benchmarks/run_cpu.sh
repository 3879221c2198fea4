#!/usr/bin/env bash
# The CPU results in benchmarks/results/: the shipped example and the two 4096 -> 4096
# adapters, ONNX Runtime CPU against torch eager per precision, batch 1, 8, 64.
# Run from the repository root:  bash benchmarks/run_cpu.sh [DATE-TAG]
set -euo pipefail
tag=${1:-$(date -u +%F)}
out=benchmarks/results
adapters=build/bench-adapters
bench="python -m prism_deploy bench"
common="--precision fp32,fp16,int8 --batch 1,8,64 --threads 1 --warmup 300"

# the checkout's package, even where another copy is installed
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
python benchmarks/make_adapters.py -o "$adapters"
$bench examples/demo-adapter.safetensors --backends torch,torch-compile,ort-cpu $common --repeat 50 \
    --json-out "$out/$tag-cpu-example.json" --plot "$out/$tag-cpu-example.png"
$bench "$adapters/big-dense.safetensors" --backends torch,ort-cpu $common --repeat 30 \
    --json-out "$out/$tag-cpu-4096-dense.json" --plot "$out/$tag-cpu-4096-dense.png"
$bench "$adapters/big-3pipe.safetensors" --backends torch,ort-cpu $common --repeat 20 \
    --json-out "$out/$tag-cpu-4096-3pipe.json" --plot "$out/$tag-cpu-4096-3pipe.png"
python benchmarks/summarize.py "$out/$tag-cpu-example.json" "$out/$tag-cpu-4096-dense.json" "$out/$tag-cpu-4096-3pipe.json"
