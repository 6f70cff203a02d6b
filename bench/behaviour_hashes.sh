#!/usr/bin/env bash
# Behaviour hashes: the sha256 of the model onnxq writes for a fixed set of (model, config)
# cases, so a refactoring can be proved byte-identical to the code it started from.
# Usage (from the repo root):
#   bench/behaviour_hashes.sh ONNXQ_BINARY OUTFILE          # record: writes OUTFILE
#   bench/behaviour_hashes.sh ONNXQ_BINARY --check FILE     # recompute, diff against FILE, exit 1 if different
# e.g. bench/behaviour_hashes.sh /work/baseline/onnxq bench/behaviour.sha256
#      cargo build --release && bench/behaviour_hashes.sh target/release/onnxq --check bench/behaviour.sha256
# Env: SHARED (default ../shared, relative to the repo root) holds models/<m>.onnx and
# data/<m>/calib.npz. Every model in $SHARED/models/*.onnx (sorted) is run with
#   calib   calibration: {data: $SHARED/data/<m>/calib.npz}
#   passes  calib + weights: {granularity: per_tensor} + passes: [fold_batchnorm,
#           {equalize: {relu6: per_channel, hardswish: per_channel}}, absorb_bias, gptq, correct_bias]
#   mixed   (crepe_tiny only) calib + mixed_precision: {target_sqnr_db: 30}
# One line per case, sorted: "<model> <case> <sha256 of the output>", or "<model> <case> exit=<code>"
# when onnxq fails (no message text: it may hold timings). Progress goes to stderr.
# The hashes are the machine's as well as the code's: tract picks its matrix kernels by CPU
# (AVX-512 or not), which sums in another order. Compare a change with its base on one machine
# (on 2026-12-02 the base itself differed from the recorded file in ppocr_mobile_v2_cls and
# ppocr_v3_det on an AVX-512 machine: those four lines were re-recorded there).
set -euo pipefail

usage() { echo "usage: $0 ONNXQ_BINARY OUTFILE | $0 ONNXQ_BINARY --check FILE" >&2; exit 2; }
[[ $# -eq 2 || ( $# -eq 3 && $2 == --check ) ]] || usage
bin=$(realpath "$1")
[[ -x $bin ]] || { echo "not an executable: $1" >&2; exit 2; }
if [[ $2 == --check ]]; then mode=check; target=$(realpath "$3"); [[ -f $target ]] || usage
else mode=record; target=$(realpath -m "$2"); fi
shared_in=${SHARED:-}
[[ -n $shared_in ]] && shared_in=$(realpath "$shared_in")

cd "$(dirname "$0")/.."
shared=${shared_in:-$(realpath ../shared)}
export LC_ALL=C

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results="$work/results"
: > "$results"

run_case() { # model case config-file
  local model=$1 case=$2 cfg=$3 start code secs
  rm -f "$work/out.onnx"
  start=$(date +%s.%N)
  code=0
  "$bin" "$shared/models/$model.onnx" --config "$cfg" -o "$work/out.onnx" > "$work/$model.$case.log" 2>&1 || code=$?
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  if [[ $code -ne 0 ]]; then
    echo "$model $case exit=$code" >> "$results"
    echo "$model $case: exit=$code (${secs} s): $(tail -1 "$work/$model.$case.log")" >&2
  elif [[ ! -f $work/out.onnx ]]; then
    echo "$model $case no-output" >> "$results"
    echo "$model $case: exit 0 but no output (${secs} s)" >&2
  else
    echo "$model $case $(sha256sum "$work/out.onnx" | cut -d' ' -f1)" >> "$results"
    echo "$model $case: ok (${secs} s)" >&2
  fi
}

total_start=$(date +%s)
shopt -s nullglob
models=("$shared"/models/*.onnx)
[[ ${#models[@]} -gt 0 ]] || { echo "no models in $shared/models" >&2; exit 2; }
mapfile -t models < <(printf '%s\n' "${models[@]}" | sort)
for path in "${models[@]}"; do
  model=$(basename "$path" .onnx)
  calib="calibration:
  data: $shared/data/$model/calib.npz"
  printf '%s\n' "$calib" > "$work/calib.yaml"
  run_case "$model" calib "$work/calib.yaml"
  printf '%s\n' "$calib" "weights:" "  granularity: per_tensor" \
    "passes: [fold_batchnorm, {equalize: {relu6: per_channel, hardswish: per_channel}}, absorb_bias, gptq, correct_bias]" \
    > "$work/passes.yaml"
  run_case "$model" passes "$work/passes.yaml"
  if [[ $model == crepe_tiny ]]; then
    printf '%s\n' "$calib" "mixed_precision:" "  target_sqnr_db: 30" > "$work/mixed.yaml"
    run_case "$model" mixed "$work/mixed.yaml"
  fi
done
sort "$results" > "$work/sorted"
echo "total: $(( $(date +%s) - total_start )) s" >&2

if [[ $mode == record ]]; then
  cp "$work/sorted" "$target"
  echo "wrote $target ($(wc -l < "$target") cases)" >&2
else
  if diff "$target" "$work/sorted" > "$work/diff"; then
    echo "identical to $target ($(wc -l < "$target") cases)" >&2
  else
    echo "DIFFERENT from $target (< recorded, > now):" >&2
    grep '^[<>]' "$work/diff"
    exit 1
  fi
fi
