#!/usr/bin/env bash
# The main job on tiny local models: make the fixtures, then preview the merge.
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/make_fixtures.py --out fixtures
pacer-stream plan plans/tiny-smoke.yaml
