#!/usr/bin/env bash
# Issue 28's CPU results: models B and L (benchmarks/make_models.py) in both graph forms at
# fp32 / int8 / int4 beside ONNX Runtime GenAI and llama.cpp (bench --model --gguf), prefill and
# decode per token at 1 and 2 threads, resident memory (--memory); then the chain A -> adapter
# -> B end to end against eager PyTorch. Run on a quiet machine (nothing else running), from
# the repository root:  bash benchmarks/run_peers_cpu.sh [DATE-TAG] [LLAMA_CPP_SRC]
# LLAMA_CPP_SRC (the llama-cpp-python sdist's vendor/llama.cpp) converts the models to F32 GGUF
# files for llama.cpp; without it llama.cpp is listed as skipped.
# Model L's int8/int4 exports are written with validate=False: the random model's nearly flat
# logits fail the export's own top-1 gate at those precisions (docs/quantized-models.md).
set -euo pipefail
tag=${1:-$(date -u +%F)}
src=${2:-}
out=benchmarks/results
M=build/bench-models E=build/bench-exports P=build/bench-peers
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
pd="python -m prism_deploy"

for m in model-a model-b model-l; do
  [ -f "$M/$m/config.json" ] || python benchmarks/make_models.py -o "$M" "$m"
  if [ -n "$src" ] && [ "$m" != model-a ] && [ ! -f "$M/$m-f32.gguf" ]; then
    python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from make_models import write_gguf; write_gguf(Path('$M/$m'), Path('$src'))"
  fi
done
export_one() {  # NAME MODEL ROLE MAX_SEQ PRECISION FORM
  local name=$1 model=$2 role=$3 seq=$4 prec=$5 form=$6 validate=True
  [ -f "$E/$name/model.json" ] && return
  [ "$model" = model-l ] && [ "$prec" != fp32 ] && validate=False
  python -c "
from prism_deploy.models.lm_export import export_model
from prism_deploy.models.ort_form_builder import export_ort_form
fn = export_ort_form if '$form' == 'ort' else export_model
fn('$M/$model', '$role', '$E/$name', precision='$prec', max_seq=$seq, validate=$validate)"
}
for p in fp32 int8 int4; do
  export_one "A-$p" model-a first 256 $p portable
  export_one "A-ort-$p" model-a first 256 $p ort
  export_one "B-$p" model-b last 256 $p portable
  export_one "B-ort-$p" model-b last 256 $p ort
  export_one "L-$p" model-l last 512 $p portable
  export_one "L-ort-$p" model-l last 512 $p ort
done
gguf() { [ -f "$M/$1-f32.gguf" ] && echo --gguf "$M/$1-f32.gguf" || true; }
for t in 1 2; do
  $pd bench --model $E/B-fp32 $E/B-int8 $E/B-int4 $E/B-ort-fp32 $E/B-ort-int8 $E/B-ort-int4 --hf $M/model-b \
      $(gguf model-b) --peer-dir $P --memory --threads $t --prompt 64 --new-tokens 32 --repeat 8 \
      --json-out "$out/$tag-cpu-peers-model-b-t$t.json"
  $pd bench --model $E/L-fp32 $E/L-ort-fp32 --hf $M/model-l $(gguf model-l) --peer-dir $P --memory \
      --threads $t --prompt 64 --new-tokens 16 --repeat 3 --json-out "$out/$tag-cpu-peers-model-l-fp32-t$t.json"
  $pd bench --model $E/L-int8 $E/L-int4 $E/L-ort-int8 $E/L-ort-int4 --hf $M/model-l $(gguf model-l) --no-eager \
      --peer-dir $P --memory --threads $t --prompt 64 --new-tokens 16 --repeat 3 \
      --json-out "$out/$tag-cpu-peers-model-l-quant-t$t.json"
done
python benchmarks/bench_chain.py --a-hf $M/model-a --b-hf $M/model-b --repeat 5 \
    --chain fp32=$E/A-fp32,$E/B-fp32 --chain int8=$E/A-int8,$E/B-int8 --chain int4=$E/A-int4,$E/B-int4 \
    --chain ort-fp32=$E/A-ort-fp32,$E/B-ort-fp32 --chain ort-int8=$E/A-ort-int8,$E/B-ort-int8 \
    --chain ort-int4=$E/A-ort-int4,$E/B-ort-int4 --json "$out/$tag-cpu-chain.json"
# the files are committed: paths inside the checkout are written relative to it
sed -i "s#$PWD/##g" "$out/$tag"-cpu-peers-*.json "$out/$tag-cpu-chain.json"
