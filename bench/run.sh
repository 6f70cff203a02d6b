#!/usr/bin/env bash
# The benchmark of issue 7: onnxq against ONNX Runtime's quantize_static on every model of
# SHARED_DIR/models (default ../shared), side by side, alternating, 3 repetitions: wall time,
# peak RSS, ratios, output SQNR in ONNX Runtime; then time and memory against the number of
# calibration samples and against model size. Prints markdown (the tables of BENCHMARKS.md).
#
#   bench/run.sh [SHARED_DIR] [bench/run.py options...]     e.g. bench/run.sh ../shared --reps 1
#   bench/run.sh --update BENCHMARKS.md                      also rewrites BENCHMARKS.md's tables
#
# Environment: ONNXQ=BIN to use that binary (default: cargo build --release, target/release/onnxq);
# VENV=DIR to use that Python venv as it is (default: target/bench-venv at the versions pinned in
# bench/requirements.txt, created or updated by bench/venv.sh). Outputs, logs and raw JSON go to
# target/bench-run. About 11 minutes on 2 idle cores (plus the release build when it is stale).
# Needs GNU time (/usr/bin/time) and coreutils' timeout. Not part of `cargo test` or CI.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then shared=$1; shift; fi
command -v /usr/bin/time >/dev/null || { echo "bench/run.sh: needs GNU time: apt-get install time" >&2; exit 1; }
if [ -z "${ONNXQ:-}" ]; then
  echo "bench/run.sh: cargo build --release" >&2
  cargo build --release --quiet >&2
  ONNXQ="${CARGO_TARGET_DIR:-target}/release/onnxq"
fi
python=$(bench/venv.sh)
shown="bench/run.sh"
[ "$shared" = ../shared ] || shown+=" $shared"
[ $# -eq 0 ] || shown+=" $*"
exec "$python" bench/run.py "$shared" --onnxq "$ONNXQ" --command "$shown" "$@"
