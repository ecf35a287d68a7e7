#!/usr/bin/env bash
# Device call 1 (about 4 minutes on an H100, start included): keep EuroSAT's first part on the machine for
# call 2, then time the step variants at the blog's batch in bf16 (the baseline, nn.Conv at the automatic
# microbatch, is the first variant; float32 is the last, for the record) with a kernel profile of each.
# carry: [".device/eurosat.tar.aa"]; results: $OUT/bench_variants.json, $OUT/bench.log, $OUT/gpu.txt.
# Rehearsed on the CPU with: OUT=/tmp/rehearse BATCH=64 STEPS=1 REPEATS=1 bash device/call1.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT}"
BATCH=${BATCH:-172800} STEPS=${STEPS:-3} REPEATS=${REPEATS:-3}
PYTHON=${PYTHON:-python3}
mkdir -p /tmp/eurosat-parts
cp .device/eurosat.tar.aa /tmp/eurosat-parts/
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt" 2>&1 || true
"$PYTHON" bench.py --batch "$BATCH" --dtype bfloat16 --inner-loop compiled --steps "$STEPS" --repeats "$REPEATS" \
    --variants base conv=space_to_depth conv=stem_patches conv=xla,remat_gelu=1 microbatch=2048 dtype=float32 \
    --profile /tmp/profile --json "$OUT/bench_variants.json" 2>&1 | tee "$OUT/bench.log" || true
# call 2 takes its fastest correct variant from here (and runs the default step if bench.py failed)
if [ -f "$OUT/bench_variants.json" ]; then cp "$OUT/bench_variants.json" /tmp/bench_variants.json; fi
