#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the main job -- the whole NAT experiment -- on the
# embedded default. NAT_RAY_RUN names the run (default: quickstart); re-running resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo
echo "== the NAT pipeline on the embedded model (CPU): rollout -> train w/o-Neg, NUT, NAT -> evaluate"
echo "   about 15 minutes on 2 cores; resumable: run this again to continue where it stopped"
.venv/bin/nat-ray pipeline --config configs/default.yaml --name "${NAT_RAY_RUN:-quickstart}"
