#!/usr/bin/env bash
# Issue 18's figures: models A and B (benchmarks/make_models.py) exported at fp32, int8 and int4,
# then bench-model (B: prefill + decode per token; A: prefill) and the chain (bench_chain.py),
# all on ONNX Runtime CPU with one thread, interleaved, against transformers eager.
# Run from the repository root:  bash benchmarks/run_models_cpu.sh [DATE-TAG]
set -euo pipefail
tag=${1:-$(date -u +%F)}
out=benchmarks/results
models=build/bench-models
exports=build/bench-exports
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
pd="python -m prism_deploy"

[ -f "$models/model-b/config.json" ] && [ -f "$models/model-a/config.json" ] || python benchmarks/make_models.py -o "$models"
export_one() {  # ROLE MODEL NAME [export-model options]
  local role=$1 model=$2 name=$3; shift 3
  [ -f "$exports/$name/model.json" ] || $pd export-model "$models/$model" --role "$role" -o "$exports/$name" --max-seq 256 "$@"
}
for side in "lower model-b B" "upper model-a A"; do
  set -- $side
  export_one $1 $2 $3-fp32
  export_one $1 $2 $3-int8 --precision int8
  export_one $1 $2 $3-int4 --precision int4
  export_one $1 $2 $3-int4-b128 --precision int4 --block-size 128
  export_one $1 $2 $3-int8-dq --precision int8 --form dq
  export_one $1 $2 $3-int4-dq --precision int4 --form dq
done
export_one lower model-b B-int8-acc0 --precision int8 --accuracy-level 0
export_one lower model-b B-int4-acc0 --precision int4 --accuracy-level 0

E=$exports
$pd bench --model $E/B-fp32 $E/B-int8 $E/B-int4 $E/B-int4-b128 $E/B-int8-dq $E/B-int4-dq $E/B-int8-acc0 $E/B-int4-acc0 \
    --threads 1 --prompt 64 --new-tokens 32 --repeat 8 --json-out "$out/$tag-cpu-model-b.json"
$pd bench --model $E/A-fp32 $E/A-int8 $E/A-int4 $E/A-int4-b128 $E/A-int8-dq $E/A-int4-dq \
    --threads 1 --prompt 64 --repeat 8 --json-out "$out/$tag-cpu-model-a.json"
python benchmarks/profile_model.py $E/B-fp32 $E/B-int8 $E/B-int4 $E/B-int4-b128 $E/B-int8-dq $E/B-int4-dq \
    --weights-only --calls 50 --json "$out/$tag-cpu-model-b-weights-only.json"
python benchmarks/bench_chain.py --a-hf $models/model-a --b-hf $models/model-b --repeat 5 \
    --chain fp32=$E/A-fp32,$E/B-fp32 --chain int8=$E/A-int8,$E/B-int8 --chain int4=$E/A-int4,$E/B-int4 \
    --chain int4-b128=$E/A-int4-b128,$E/B-int4-b128 --chain int8-dq=$E/A-int8-dq,$E/B-int8-dq \
    --chain int4-dq=$E/A-int4-dq,$E/B-int4-dq --json-out "$out/$tag-cpu-chain.json"
