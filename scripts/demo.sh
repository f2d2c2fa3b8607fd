#!/usr/bin/env bash
# The main job on tiny local models: make the fixtures, preview the merge, run it, and
# load the result with transformers. Re-running it resumes (or says it is complete).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/make_fixtures.py --out fixtures
pacer-stream plan plans/tiny-smoke.yaml
pacer-stream run plans/tiny-smoke.yaml
python - <<'PY'
import torch, transformers
transformers.utils.logging.set_verbosity_error()
model = transformers.AutoModelForCausalLM.from_pretrained("out/tiny-smoke").eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
print(f"out/tiny-smoke loads with transformers as {type(model).__name__}: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")
PY
