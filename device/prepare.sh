#!/usr/bin/env bash
# Here, before the device calls: the EuroSAT folder (92 MB of JPEGs, 86 MB as a gzipped tar) in two parts
# each under the 64 MiB a device call carries. Call 1 carries .device/eurosat.tar.aa, call 2 .device/eurosat.tar.ab.
set -euo pipefail
cd "$(dirname "$0")/.."
source=${EUROSAT_PARENT:-../shared/eurosat}
mkdir -p .device
rm -f .device/eurosat.tar.*
tar -czf - -C "$source" EuroSAT_RGB | split -b 50m - .device/eurosat.tar.
ls -l .device
