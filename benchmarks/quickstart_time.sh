#!/usr/bin/env bash
# The README's quick-start figure, regenerated: a fresh clone of this checkout's HEAD, a new venv and an empty
# teacher cache; the README's first quick-start line, timed. Writes OUT/first_line.log and OUT/made_by.txt.
# About 9 minutes on 2 cores; run it with nothing else running.
# Usage: bash benchmarks/quickstart_time.sh OUT
set -euo pipefail
out=$(mkdir -p "${1:?usage: bash benchmarks/quickstart_time.sh OUT}" && cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/patfast"
line=$(awk '/^```bash quickstart/{getline; print; exit}' "$repo/README.md")
cd "$work/patfast"
echo "+ $line" | tee "$out/first_line.log"
start=$(date +%s)
set +e
PATFAST_CACHE="$work/cache" bash -c "$line" >> "$out/first_line.log" 2>&1
rc=$?
set -e
echo "rc $rc, wall $(( $(date +%s) - start )) s" | tee -a "$out/first_line.log"
.venv/bin/python benchmarks/provenance.py | tee "$out/made_by.txt"  # the clone's commit, in the venv it made
exit $rc
