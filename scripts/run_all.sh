#!/bin/sh
# Regenerate every reference file under tests/data/{datasets,traps,lme4}. Run from the repository root.
# The trap verdicts are measured against bigmixed at commit d58e879 (0.1.0), unpacked to a temp dir.
set -eu
Rscript scripts/ref_single.R
Rscript scripts/ref_multi.R
Rscript scripts/ref_statsmodels_lme.R
python scripts/make_traps.py
tmp=$(mktemp -d)
git archive d58e879 bigmixed | tar -x -C "$tmp"
python scripts/bigmixed_traps.py --bigmixed-path "$tmp" --commit d58e879
rm -rf "$tmp"
Rscript scripts/ref_traps.R
