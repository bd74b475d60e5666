#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo
echo "== the agent answers a GSM8K question on the embedded model (vLLM CPU engine; about 2 minutes)"
.venv/bin/nat-ray agent --task gsm8k --gold 36 "A farmer has 3 pens with 12 hens each. How many hens?"
