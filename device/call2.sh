#!/usr/bin/env bash
# Device call 2, at once after call 1 on the same warm machine (it is given back after 30 s idle): put
# EuroSAT together from both parts, then the full-scale study with call 1's fastest correct variant, for
# BUDGET seconds of training (set it from the device time left, less about 2 minutes for the rest).
# carry: [".device/eurosat.tar.ab"]; results: $OUT/gpu.study.jsonl (every line of every run, each run whole, header
# first), $OUT/study.log. report.py reads results/gpu-study/*.study.jsonl: copy the pack there under its name.
# Rehearsed on the CPU with: OUT=/tmp/rehearse BUDGET=60 STUDY_FLAGS="--train-examples 64 --inner-steps 2
#   --outer-steps 2 --seconds-per-outer 5 --compile-seconds 5" bash device/call2.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT}"
BUDGET=${BUDGET:-420}
PYTHON=${PYTHON:-python3}
if [ ! -f /tmp/eurosat-parts/eurosat.tar.aa ]; then
    echo "call2.sh: error: call 1's EuroSAT part is gone (the machine was given back in between): run call 1 again" >&2
    exit 2
fi
VARIANT=()
if [ -f /tmp/bench_variants.json ]; then VARIANT=(--variant-from /tmp/bench_variants.json);
else echo "call2.sh: call 1 left no bench figures: the study runs the default step"; fi
cp .device/eurosat.tar.ab /tmp/eurosat-parts/
rm -rf /tmp/EuroSAT_RGB
cat /tmp/eurosat-parts/eurosat.tar.* | tar -xzf - -C /tmp
echo "EuroSAT: $(find /tmp/EuroSAT_RGB -name '*.jpg' | wc -l) images"
# shellcheck disable=SC2086  # STUDY_FLAGS is a list of flags
"$PYTHON" study.py --dataset folder --data-dir /tmp/EuroSAT_RGB --dtype bfloat16 --output-dir /tmp/study \
    --pack "$OUT/gpu.study.jsonl" --budget-seconds "$BUDGET" "${VARIANT[@]}" ${STUDY_FLAGS:-} \
    2>&1 | tee "$OUT/study.log"
