#!/usr/bin/env python
"""Parity benchmark: the same mergekit configs through mergekit and pacer-stream, output for output.

Builds (once) four tiny fp32 Llama checkpoints of one architecture (hidden 64, 4 layers,
vocab 256): a base and three "fine-tunes" (the base plus a shared and an own random
direction, so they partly agree). Then, for every row of CASES (a method and a mergekit
YAML), it

* asks ``pacer-stream plan`` whether pacer-stream accepts the config: the mergekit YAML
  itself (``pacer-stream plan config.yml OUT``), else, as a fallback the results name, the
  plan :func:`translate` writes from it. A config pacer-stream refuses is skipped, with
  its reason;
* runs mergekit (pinned to MERGEKIT_VERSION, in its own venv; every config in one process,
  as ``mergekit-yaml`` does it) and ``pacer-stream run``, both computing and writing fp32;
* compares every tensor (:func:`compare`): max |a - b|, the max difference in ulps of fp32
  at the larger of the two magnitudes, which tensor, and tensors only one output has.

DARE and DELLA drop entries at random (mergekit with torch's global RNG, pacer-stream with
its own mask seeded per tensor and model, ``methods/sparsify.py::dare_keep``), so their
outputs cannot agree element by element below density 1. Those rows compare statistics
that must agree (:func:`drop_stats`): the share of entries left at the base, the mean and
spread of the merged model's difference from the base and, where one model alone is merged,
whether each tensor's L1 norm was kept (mergekit's rescale) or only in expectation (1/density).

Results go to benchmarks/results/parity-vm.{json,md}.

    python benchmarks/bench_parity.py [--work /tmp/pacer-parity] [--mergekit PATH/TO/mergekit-yaml]
                                      [--only METHOD ...] [--results STEM]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dense import find_mergekit, machine, mergekit_version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MERGEKIT_VERSION = "0.1.5"
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
MODELS = ("base", "ft1", "ft2", "ft3", "far")
ULP_TOLERANCE = 4  # "agrees": no element further apart than this many fp32 ulps
# "agrees to fp32 rounding": pacer-stream's max |error| against mergekit run in float64 is at
# most this multiple of mergekit's own fp32 error (two fp32 evaluations of one formula in
# different orders round differently; near-zero results of cancelling terms show it as
# hundreds of ulps at their own magnitude, for mergekit's fp32 output too)
ROUNDING_FACTOR = 2.0


@dataclass(frozen=True)
class Case:
    """One row: a mergekit config (``$base``, ``$ft1``.. name the model folders)."""

    method: str
    summary: str
    yaml: str
    random: bool = False  # entries dropped at random: compare drop_stats, not elements
    why: str = ""  # the reason for a known difference (found by reading both sources)
    alone: str = ""  # the one model whose task vector makes the merge (the rescale check)


def entry(model: str, parameters: str = "") -> str:
    """One mergekit ``models:`` entry, e.g. ``entry("$ft1", "weight: 0.5")``."""
    return f"  - {{model: {model}" + (f", parameters: {{{parameters}}}}}\n" if parameters else "}\n")


def models(*entries: str) -> str:
    """A mergekit ``models:`` list of :func:`entry` lines (a bare name is an entry too)."""
    return "models:\n" + "".join(e if e.startswith("  - ") else entry(e) for e in entries)


W3 = (entry("$ft1", "weight: 0.5"), entry("$ft2", "weight: 0.3"), entry("$ft3", "weight: 0.2"))
TV3 = (entry("$ft1", "weight: 0.5"), entry("$ft2", "weight: 0.3"), entry("$ft3", "weight: 0.7"))
FP32 = "dtype: float32\n"
RESCALE_WHY = (
    "DARE's rescale: mergekit 0.1.5's default (rescale: true) multiplies each model's kept "
    "entries by ‖delta‖₁ / ‖kept‖₁ per tensor (mergekit/sparsify.py), so the L1 norm is "
    "kept exactly; pacer-stream's own default is 1/density (the DARE paper), equal in "
    "expectation only, and its rescale: l1 is mergekit's rule")

CASES: tuple[Case, ...] = (
    Case("linear", "3 fine-tunes, weights 0.5/0.3/0.2",
         "merge_method: linear\n" + models(*W3) + FP32),
    Case("linear", "weights 0.5/0.3/0.7, normalize false",
         "merge_method: linear\n" + models(*TV3) + "parameters: {normalize: false}\n" + FP32),
    Case("linear", "ft1 weight: self_attn gradient [0.2, 0.8], mlp 0.3, else 0.5; ft2/ft3 0.5",
         "merge_method: linear\n" + models(
             entry("$ft1", "weight: [{filter: self_attn, value: [0.2, 0.8]}, "
                           "{filter: mlp, value: 0.3}, {value: 0.5}]"),
             entry("$ft2", "weight: 0.5"), entry("$ft3", "weight: 0.5")) + FP32),
    Case("task_arithmetic", "base + 3, weights 0.5/0.3/0.7, lambda 0.8",
         "merge_method: task_arithmetic\nbase_model: $base\n" + models(*TV3)
         + "parameters: {lambda: 0.8}\n" + FP32),
    Case("task_arithmetic", "base + 3, weights 0.5/0.3/0.7, normalize true",
         "merge_method: task_arithmetic\nbase_model: $base\n" + models(*TV3)
         + "parameters: {normalize: true}\n" + FP32),
    Case("ties", "base + 3, densities 0.5/0.7/0.3, weights 1/0.5/0.8",
         "merge_method: ties\nbase_model: $base\n" + models(
             entry("$ft1", "weight: 1.0, density: 0.5"),
             entry("$ft2", "weight: 0.5, density: 0.7"),
             entry("$ft3", "weight: 0.8, density: 0.3")) + FP32),
    Case("ties", "base + 3, density 0.4, normalize false, lambda 1.2",
         "merge_method: ties\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 0.4, normalize: false, lambda: 1.2}\n" + FP32),
    Case("ties", "base + 3, density gradient [0.2, 0.9] over the layers",
         "merge_method: ties\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: [0.2, 0.9]}\n" + FP32),
    Case("ties", "base-free: 3 fine-tunes, no base_model, density 0.5",
         "merge_method: ties\n" + models(*TV3) + "parameters: {density: 0.5}\n" + FP32,
         why="mergekit needs a base_model for ties; pacer-stream's base-free TIES takes the "
             "element-wise median as base and elects the sign by count (README, methods/dense.py)"),
    Case("dare_linear", "base + 3, density 1 (no drop): task arithmetic",
         "merge_method: dare_linear\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 1.0}\n" + FP32),
    Case("dare_ties", "base + 3, density 1 (no drop): TIES election without pruning",
         "merge_method: dare_ties\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 1.0}\n" + FP32),
    Case("dare_linear", "base + 3, densities 0.5/0.7/0.6, rescale not given",
         "merge_method: dare_linear\nbase_model: $base\n" + models(
             entry("$ft1", "weight: 0.5, density: 0.5"),
             entry("$ft2", "weight: 0.3, density: 0.7"),
             entry("$ft3", "weight: 0.7, density: 0.6")) + FP32, random=True),
    Case("dare_linear", "base + ft1 alone (ft2 weight 0), density 0.5, rescale not given",
         "merge_method: dare_linear\nbase_model: $base\n"
         + models(entry("$ft1", "weight: 1.0"), entry("$ft2", "weight: 0.0"))
         + "parameters: {density: 0.5}\n" + FP32, random=True, alone="ft1",
         why=RESCALE_WHY),
    Case("dare_linear", "base + ft1 alone (ft2 weight 0), density 0.5, rescale: true",
         "merge_method: dare_linear\nbase_model: $base\n"
         + models(entry("$ft1", "weight: 1.0"), entry("$ft2", "weight: 0.0"))
         + "parameters: {density: 0.5, rescale: true}\n" + FP32, random=True, alone="ft1",
         why=RESCALE_WHY),
    Case("dare_ties", "base + 3, density 0.5, normalize true",
         "merge_method: dare_ties\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 0.5, normalize: true}\n" + FP32, random=True),
    Case("slerp", "ft1 -> far, t: self_attn [0, 0.5, 1], mlp [1, 0.5, 0], else 0.5 (the arc)",
         "merge_method: slerp\nbase_model: $ft1\n" + models("$ft1", "$far")
         + "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 1]}\n"
           "    - {filter: mlp, value: [1, 0.5, 0]}\n    - {value: 0.5}\n" + FP32),
    Case("slerp", "ft1 -> ft2, the same t (cos > 0.9995: the linear fallback)",
         "merge_method: slerp\nbase_model: $ft1\n" + models("$ft1", "$ft2")
         + "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 1]}\n"
           "    - {filter: mlp, value: [1, 0.5, 0]}\n    - {value: 0.5}\n" + FP32),
    Case("nuslerp", "ft1, ft2 weights 0.3/0.7, no base",
         "merge_method: nuslerp\n" + models(entry("$ft1", "weight: 0.3"),
                                            entry("$ft2", "weight: 0.7")) + FP32),
    Case("nuslerp", "base + ft1, ft2 weights 0.3/0.7: slerp of the task vectors",
         "merge_method: nuslerp\nbase_model: $base\n"
         + models(entry("$ft1", "weight: 0.3"), entry("$ft2", "weight: 0.7")) + FP32),
    Case("multislerp", "3 fine-tunes, weights 1/2/3, no base",
         "merge_method: multislerp\n" + models(entry("$ft1", "weight: 1.0"),
                                               entry("$ft2", "weight: 2.0"),
                                               entry("$ft3", "weight: 3.0")) + FP32),
    Case("karcher", "3 fine-tunes (equal weights)",
         "merge_method: karcher\n" + models("$ft1", "$ft2", "$ft3") + FP32),
    Case("karcher", "ft1, ft2, far (~0.3 rad apart)",
         "merge_method: karcher\n" + models("$ft1", "$ft2", "$far") + FP32),
    Case("model_stock", "base + 3",
         "merge_method: model_stock\nbase_model: $base\n" + models("$ft1", "$ft2", "$ft3") + FP32),
    Case("della", "base + 3, density 1 (no drop): TIES election without pruning",
         "merge_method: della\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 1.0, epsilon: 0.1}\n" + FP32),
    Case("della", "base + 3, density 0.5, epsilon 0.1",
         "merge_method: della\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 0.5, epsilon: 0.1}\n" + FP32, random=True),
    Case("della_linear", "base + 3, density 1 (no drop): task arithmetic",
         "merge_method: della_linear\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 1.0, epsilon: 0.1}\n" + FP32),
    Case("della_linear", "base + 3, density 0.5, epsilon 0.1",
         "merge_method: della_linear\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 0.5, epsilon: 0.1}\n" + FP32, random=True),
    Case("della_linear", "base + ft1 alone (ft2 weight 0), density 0.5, rescale not given",
         "merge_method: della_linear\nbase_model: $base\n"
         + models(entry("$ft1", "weight: 1.0"), entry("$ft2", "weight: 0.0"))
         + "parameters: {density: 0.5, epsilon: 0.1}\n" + FP32, random=True, alone="ft1",
         why=RESCALE_WHY),
    Case("breadcrumbs", "base + 3, density 0.8, gamma 0.05",
         "merge_method: breadcrumbs\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 0.8, gamma: 0.05}\n" + FP32),
    Case("breadcrumbs_ties", "base + 3, density 0.8, gamma 0.05",
         "merge_method: breadcrumbs_ties\nbase_model: $base\n" + models(*TV3)
         + "parameters: {density: 0.8, gamma: 0.05}\n" + FP32),
    Case("passthrough", "layer stack: ft1 layers 0-2, then ft2 layers 2-4",
         "merge_method: passthrough\nslices:\n"
         "  - sources: [{model: $ft1, layer_range: [0, 2]}]\n"
         "  - sources: [{model: $ft2, layer_range: [2, 4]}]\n" + FP32),
    Case("passthrough", "a frankenmerge: ft1 layers 0-3, then ft2 layers 1-4 (6 layers)",
         "merge_method: passthrough\nslices:\n"
         "  - sources: [{model: $ft1, layer_range: [0, 3]}]\n"
         "  - sources: [{model: $ft2, layer_range: [1, 4]}]\n" + FP32),
    Case("slerp", "two slices, ft1 -> far, t gradient within each slice; the second slice "
         "takes layers 1-3 of both",
         "merge_method: slerp\nbase_model: $ft1\nslices:\n"
         "  - sources: [{model: $ft1, layer_range: [0, 2]}, {model: $far, layer_range: [0, 2]}]\n"
         "    parameters: {t: [0, 1]}\n"
         "  - sources: [{model: $ft1, layer_range: [1, 3]}, {model: $far, layer_range: [1, 3]}]\n"
         "parameters:\n  t: [{filter: mlp, value: [1, 0]}, {value: 0.3}]\n" + FP32),
    Case("linear", "two slices of three models, per-source weights",
         "merge_method: linear\nslices:\n"
         "  - sources: [{model: $ft1, layer_range: [0, 2], parameters: {weight: 0.2}},\n"
         "              {model: $ft2, layer_range: [2, 4], parameters: {weight: 0.8}}]\n"
         "  - sources: [{model: $ft3, layer_range: [1, 4], parameters: {weight: 0.5}},\n"
         "              {model: $ft1, layer_range: [1, 4], parameters: {weight: 0.5}}]\n" + FP32),
)


def case_yaml(case: Case, folders: dict[str, Path]) -> str:
    """The case's mergekit YAML with the model folders filled in."""
    return Template(case.yaml).substitute({k: str(v) for k, v in folders.items()})


# --- the models ----------------------------------------------------------------------------

def make_models(root: Path) -> dict[str, Path]:
    """base, ft1..ft3 under ``root`` (made once): fp32 safetensors of one tiny Llama.

    ft_k = base + 0.02 * std(tensor) * (0.6 * shared + 0.8 * own_k), one shared random
    direction and one of its own per model: task vectors with cosine ~0.36, so sign
    elections and model_stock's angle have something to do. The fine-tunes are so close
    to each other (cos > 0.9995) that slerp takes its linear fallback; ``far`` =
    base + 0.3 * std * own is ~0.3 rad from them, so slerp and karcher follow the arc.
    """
    folders = {name: root / name for name in MODELS}
    if all((f / "model.safetensors").exists() for f in folders.values()):
        return folders
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_fixtures import make_model

    model = make_model("llama", seed=0, **LLAMA)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(18)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    for k, name in enumerate(MODELS):
        state = base if k == 0 else {
            key: v + 0.3 * v.std() * torch.randn(v.shape, generator=gen) if name == "far" else
            v + 0.02 * v.std() * (0.6 * shared[key] + 0.8 * torch.randn(v.shape, generator=gen))
            for key, v in base.items()}
        model.load_state_dict(state)
        model.save_pretrained(folders[name])  # fp32 model.safetensors + config.json
    return folders


# --- feeding the config to pacer-stream ------------------------------------------------------

MERGEKIT_RESCALES_BY_DEFAULT = ("dare_linear", "dare_ties", "della", "della_linear")


def translate(mk: dict, out: Path) -> dict:
    """A pacer-stream plan from a mergekit config (a stopgap until pacer-stream reads
    mergekit YAML itself; delete then). The keys map almost one to one: ``merge_method`` is
    ``method``, a model's ``parameters`` are flattened into its entry, ``dtype`` goes to
    ``output.dtype``, and mergekit's boolean ``rescale`` (on by default for DARE and DELLA,
    an L1-norm rescale in mergekit 0.1.5) becomes ``rescale: l1`` or ``none``. The base model
    is dropped from ``models`` unless that would leave fewer than two (slerp lists it)."""
    plan = {k: v for k, v in mk.items() if k not in
            ("merge_method", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "models")}
    plan["method"] = mk["merge_method"]
    entries = [m if isinstance(m, dict) else {"model": m} for m in mk.get("models") or []]
    others = [m for m in entries if m["model"] != mk.get("base_model")]
    if entries:
        plan["models"] = [{"model": m["model"], **(m.get("parameters") or {})}
                          for m in (others if len(others) >= 2 else entries)]
    parameters = dict(mk.get("parameters") or {})
    rescale = parameters.pop("rescale", mk["merge_method"] in MERGEKIT_RESCALES_BY_DEFAULT)
    if mk["merge_method"] in MERGEKIT_RESCALES_BY_DEFAULT:
        parameters["rescale"] = "l1" if rescale else "none"
    if parameters:
        plan["parameters"] = parameters
    plan["output"] = {"path": str(out), "dtype": mk.get("out_dtype", mk.get("dtype", "auto"))}
    return plan


def pacer(*args: str) -> subprocess.CompletedProcess:
    """``pacer-stream ARGS`` from this checkout."""
    return subprocess.run([sys.executable, "-m", "pacer_stream", *args], cwd=ROOT,
                          capture_output=True, text=True)


def last_line(text: str) -> str:
    """The last non-empty line, without the CLI's ``pacer-stream: error: <file>:`` prefix."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    line = line.removeprefix("pacer-stream: error: ")
    first, _, rest = line.partition(": ")
    return rest if rest and first.endswith((".yml", ".yaml")) else line


@functools.cache
def pacer_help(command: str) -> str:
    return pacer(command, "--help").stdout


def out_args(command: str, out: Path) -> list[str] | None:
    """How ``pacer-stream COMMAND`` takes the output folder of a mergekit file, from its
    --help: ``[OUT]`` after the file, or ``--out OUT``; None while it reads no mergekit."""
    usage = pacer_help(command)
    if "--out" in usage:
        return ["--out", str(out)]
    return [str(out)] if "[OUT]" in usage or " OUT" in usage.split("\n")[0] else None


def pacer_input(method: str, mk_path: Path, out: Path) -> dict:
    """How pacer-stream takes this config: ``{"how": "mergekit-yaml" | "translated",
    "args": [...]}`` for ``pacer-stream run``, or ``{"how": None, "note": why not}``.
    The mergekit file itself is tried first (``pacer-stream plan mergekit.yml OUT``); the
    translation is the fallback."""
    messages = []
    direct_out = out_args("plan", out)
    if direct_out is not None:
        direct = pacer("plan", str(mk_path), *direct_out)
        if direct.returncode in (0, 3):
            return {"how": "mergekit-yaml", "args": [str(mk_path), *out_args("run", out)],
                    "read_as": next((line for line in direct.stdout.splitlines()
                                     if "mergekit" in line), "")}
        messages.append(last_line(direct.stderr) or last_line(direct.stdout))
        if "unknown method" in messages[0]:  # a plan could not name it either
            return {"how": None, "note": f"pacer-stream does not have {method} yet"}
    plan_path = mk_path.with_name(mk_path.stem + ".pacer.yaml")
    plan_path.write_text(yaml.safe_dump(translate(yaml.safe_load(mk_path.read_text()), out),
                                        sort_keys=False))
    translated = pacer("plan", str(plan_path))
    if translated.returncode in (0, 3):
        return {"how": "translated", "args": [str(plan_path)]}
    messages.append(last_line(translated.stderr) or last_line(translated.stdout))
    if any("unknown method" in m for m in messages):
        return {"how": None, "note": f"pacer-stream does not have {method} yet"}
    return {"how": None, "note": f"pacer-stream refuses it: {messages[0]}"}


def run_pacer(given: dict) -> dict:
    """``pacer-stream run`` on the mergekit file (with OUT) or the translated plan."""
    start = time.perf_counter()
    proc = pacer("run", *given["args"], "--quiet", "--force")
    return {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - start, 2),
            "message": last_line(proc.stderr) if proc.returncode else ""}


# What mergekit-yaml does (mergekit/scripts/run_yaml.py: validate the YAML, run_merge), for
# a list of jobs in one process, so mergekit's start-up (~6 s) is paid once. Per job: CPU,
# no tokenizer (the tiny models have none), no card, random seed 0 set before the merge.
MERGEKIT_JOBS = textwrap.dedent("""
    import json, sys, time, traceback, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    for config, out in json.loads(sys.argv[1]):
        start = time.perf_counter()
        try:
            options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                   random_seed=0)
            options.apply_global_options()
            source = open(config, encoding="utf-8").read()
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), out,
                      options=options, config_source=source)
            result = {"ok": True, "message": ""}
        except Exception as exc:
            result = {"ok": False, "message": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        print("JOB " + json.dumps(result), flush=True)
""")


def run_mergekit(exe: str, jobs: list[tuple[Path, Path]]) -> list[dict]:
    """mergekit on every (config, output folder) job, with the Python beside ``exe``."""
    if not jobs:
        return []
    proc = subprocess.run([str(Path(exe).with_name("python")), "-c", MERGEKIT_JOBS,
                           json.dumps([[str(c), str(o)] for c, o in jobs])],
                          capture_output=True, text=True)
    results = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("JOB ")]
    if len(results) != len(jobs):
        raise SystemExit(f"mergekit stopped after {len(results)} of {len(jobs)} jobs: "
                         f"{proc.stderr[-2000:]}")
    return results


# --- comparing outputs ----------------------------------------------------------------------

def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, by name."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the fp32 spacing at max(|a|, |b|), element-wise (float64).

    For m in [2^(e-1), 2^e) the fp32 spacing is 2^(e-24) (frexp gives m = f * 2^e,
    f in [0.5, 1)); below the normal range it is 2^-149. Equal values (and two NaNs) are 0
    apart, a NaN against a number is inf.
    """
    a64, b64 = a.double(), b.double()
    larger = torch.maximum(a64.abs(), b64.abs())
    _, exponent = torch.frexp(larger)
    spacing = torch.ldexp(torch.ones_like(larger), exponent - 24).clamp_min(2.0 ** -149)
    dist = (a64 - b64).abs() / spacing
    dist = torch.where(a64 == b64, torch.zeros_like(dist), dist)
    both_nan = a64.isnan() & b64.isnan()
    one_nan = a64.isnan() ^ b64.isnan()
    return dist.masked_fill(both_nan, 0.0).masked_fill(one_nan, math.inf)


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Element-wise agreement of two checkpoints (``a``: pacer-stream, ``b``: mergekit):
    the max |a - b| and max ulp distance over every tensor both have, the tensor where the
    ulp distance is largest (with the values there), and tensors in one only or whose
    shapes differ."""
    result = {"compared": 0, "max_abs": 0.0, "max_ulp": 0.0, "worst": None,
              "only_pacer": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a)),
              "shape_mismatch": [], "dtype_mismatch": []}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            result["shape_mismatch"].append(f"{name}: {list(x.shape)} vs {list(y.shape)}")
            continue
        if x.dtype != y.dtype:  # compared all the same, in float64
            result["dtype_mismatch"].append(f"{name}: {x.dtype} vs {y.dtype}")
        result["compared"] += 1
        if x.numel() == 0:
            continue
        ulps = ulp_distance(x, y).reshape(-1)
        result["max_abs"] = max(result["max_abs"], float((x.double() - y.double()).abs().max()))
        at = int(ulps.argmax())
        if result["worst"] is None or float(ulps[at]) > result["max_ulp"]:
            result["max_ulp"] = float(ulps[at])
            result["worst"] = {"tensor": name, "pacer": float(x.reshape(-1)[at]),
                               "mergekit": float(y.reshape(-1)[at]),
                               "tensor_max_abs": float(y.abs().max())}
    return result


def drop_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
               alone: dict[str, torch.Tensor] | None = None) -> dict:
    """What a random drop must reproduce in distribution, over every tensor: the share of
    entries exactly at the base (every model's change dropped or out-voted), and the mean
    and standard deviation of merged - base (float64).

    With ``alone``, the only model whose change is merged (weight 1), also how the kept
    entries were rescaled: l1_dev = max over tensors of | ‖M - B‖₁ / ‖A - B‖₁ - 1 |,
    0 (to rounding) for an L1-norm rescale, the drop's sampling noise for 1/density.
    """
    names = [n for n in sorted(merged) if n in base]
    deltas = torch.cat([(merged[n].double() - base[n].double()).reshape(-1) for n in names])
    stats = {"at_base": float((deltas == 0).double().mean()), "mean": float(deltas.mean()),
             "std": float(deltas.std())}
    if alone is not None:
        ratios = [float((merged[n].double() - base[n].double()).abs().sum()
                        / (alone[n].double() - base[n].double()).abs().sum())
                  for n in names if bool((alone[n] != base[n]).any())]
        stats["l1_dev"] = max(abs(r - 1) for r in ratios)
    return stats


def stats_agree(p: dict, m: dict) -> bool:
    """Both drops alike: the share at the base within 0.01 (~10 standard errors at this
    size), the spread within 3 %, the means within 5 % of the spread, and the L1 rescale
    check (when there is one) within 0.01."""
    return (abs(p["at_base"] - m["at_base"]) <= 0.01 and abs(p["std"] / m["std"] - 1) <= 0.03
            and abs(p["mean"] - m["mean"]) <= 0.05 * m["std"]
            and abs(p.get("l1_dev", 0) - m.get("l1_dev", 0)) <= 0.01)


def within_rounding(reference: dict) -> bool:
    """pacer-stream no further from mergekit's float64 output than ROUNDING_FACTOR times
    mergekit's own fp32 output is (max |error| over every tensor)."""
    if not reference.get("ok") or "pacer" not in reference:
        return False
    return reference["pacer"]["max_abs"] <= ROUNDING_FACTOR * reference["mergekit"]["max_abs"]


def verdict(case: Case, row: dict) -> str:
    """agrees / differs: why / skipped: why, from a row's runs and comparison."""
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    if not row["mergekit"]["ok"]:
        return f"not comparable: mergekit refuses it ({row['mergekit']['message']})" + (
            f"; {case.why}" if case.why else "")
    if not row["pacer"]["ok"]:
        return f"pacer-stream failed: {row['pacer']['message']}"
    diff = row["diff"]
    extra = (diff["only_pacer"] or diff["only_mergekit"] or diff["shape_mismatch"]
             or diff["dtype_mismatch"])
    if case.random:
        ok = stats_agree(row["stats"]["pacer"], row["stats"]["mergekit"]) and not extra
    else:
        ok = diff["max_ulp"] <= ULP_TOLERANCE and not extra
    if ok:
        return "agrees" + (" (statistics)" if case.random else "")
    if not case.random and not extra and within_rounding(row.get("reference", {})):
        return ("agrees to fp32 rounding: as close to mergekit's float64 result as mergekit's "
                "fp32 output is" + (f" ({case.why})" if case.why else ""))
    reasons = []
    if extra:
        reasons.append(f"tensors in one output only: pacer {diff['only_pacer'][:3]}, "
                       f"mergekit {diff['only_mergekit'][:3]}; other shapes or dtypes: "
                       f"{(diff['shape_mismatch'] + diff['dtype_mismatch'])[:2]}")
    reasons.append(case.why or "not explained yet")
    return "differs: " + "; ".join(reasons)


# --- the run --------------------------------------------------------------------------------

def prepare_case(case: Case, index: int, folders: dict[str, Path], work: Path) -> dict:
    """Write the case's mergekit YAML and find how pacer-stream takes it (or why not)."""
    tag = f"{index:02d}-{case.method}"
    mk_path = work / "configs" / f"{tag}.yml"
    mk_path.parent.mkdir(parents=True, exist_ok=True)
    mk_path.write_text(case_yaml(case, folders))
    row: dict = {"method": case.method, "summary": case.summary, "random": case.random,
                 "config": str(mk_path), "pacer_out": str(work / "out" / f"{tag}-pacer"),
                 "mergekit_out": str(work / "out" / f"{tag}-mergekit")}
    given = pacer_input(case.method, mk_path, Path(row["pacer_out"]))
    row["pacer_input"] = given["how"]
    if given["how"] is None:
        row["skipped"] = given["note"]
    else:
        row["given"] = given
        row["read_as"] = given.get("read_as", "")
        if not case.random:  # mergekit's own code in float64: the reference for rounding
            row["reference_config"] = str(mk_path.with_name(f"{tag}.f64.yml"))
            row["reference_out"] = row["mergekit_out"] + "-f64"
            Path(row["reference_config"]).write_text(
                mk_path.read_text().replace("dtype: float32", "dtype: float64"))
        for folder in (row["pacer_out"], row["mergekit_out"], row.get("reference_out")):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
    return row


def finish_case(case: Case, row: dict, folders: dict[str, Path],
                base: dict[str, torch.Tensor]) -> None:
    """Run pacer-stream on a prepared row whose mergekit job ran, then compare."""
    row["pacer"] = run_pacer(row.pop("given"))
    if not (row["pacer"]["ok"] and row["mergekit"]["ok"]):
        return
    a, b = load_folder(Path(row["pacer_out"])), load_folder(Path(row["mergekit_out"]))
    row["diff"] = compare(a, b)
    if row.get("reference", {}).get("ok"):  # how far each is from mergekit in float64
        ref = load_folder(Path(row["reference"]["out"]))
        row["reference"]["pacer"] = compare(a, ref)
        row["reference"]["mergekit"] = compare(b, ref)
    if case.random:
        alone = load_folder(folders[case.alone]) if case.alone else None
        row["stats"] = {"pacer": drop_stats(a, base, alone), "mergekit": drop_stats(b, base, alone)}
    as_run = Path(row["pacer_out"]) / "pacer_plan.yaml"
    if as_run.exists():  # the settings pacer-stream used, defaults filled in
        row["pacer_parameters"] = (yaml.safe_load(as_run.read_text()) or {}).get("parameters")


def versions(exe: str) -> dict:
    import importlib.metadata as md

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    torch_mk = subprocess.run([str(Path(exe).with_name("python")), "-c",
                               "import torch; print(torch.__version__)"],
                              capture_output=True, text=True).stdout.strip()
    return {"mergekit": mergekit_version(exe), "torch_mergekit": torch_mk,
            "torch": torch.__version__, "pacer_stream": md.version("pacer-stream"),
            "pacer_stream_commit": commit, "transformers": md.version("transformers")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pacer-parity"))
    parser.add_argument("--mergekit", help="path to mergekit-yaml (default: <work>/mergekit-venv)")
    parser.add_argument("--only", nargs="*", help="run only these methods")
    parser.add_argument("--results", type=Path, default=RESULTS / "parity-vm",
                        help="results stem (.json and .md are written)")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    exe = find_mergekit(work, args.mergekit, MERGEKIT_VERSION)
    info = versions(exe)
    if info["mergekit"] != MERGEKIT_VERSION:
        raise SystemExit(f"{exe} is mergekit {info['mergekit']!r}, not {MERGEKIT_VERSION}: "
                         "pass --mergekit or another --work")
    folders = make_models(work / "models")
    base = load_folder(folders["base"])
    chosen = [(i, c) for i, c in enumerate(CASES) if not args.only or c.method in args.only]
    rows = [prepare_case(case, index, folders, work) for index, case in chosen]
    runnable = [row for row in rows if not row.get("skipped")]
    jobs = [(Path(r["config"]), Path(r["mergekit_out"])) for r in runnable]
    jobs += [(Path(r["reference_config"]), Path(r["reference_out"]))
             for r in runnable if "reference_config" in r]
    done = {out: result for (_, out), result in zip(jobs, run_mergekit(exe, jobs))}
    for row in runnable:
        row["mergekit"] = done[Path(row["mergekit_out"])]
        if "reference_out" in row:
            row["reference"] = done[Path(row.pop("reference_out"))]
            row["reference"]["out"] = str(Path(row["mergekit_out"]).with_name(
                Path(row["mergekit_out"]).name + "-f64"))
    for (_, case), row in zip(chosen, rows):
        if not row.get("skipped"):
            finish_case(case, row, folders, base)
        row["verdict"] = verdict(case, row)
        diff = row.get("diff", {})
        print(f"{case.method:16} {diff.get('max_ulp', '-')!s:>10} ulp  {row['verdict']}", flush=True)
    results = {"command": " ".join(["python", "benchmarks/bench_parity.py",
                                    *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(), "versions": info, "models": LLAMA,
               "ulp_tolerance": ULP_TOLERANCE, "rounding_factor": ROUNDING_FACTOR,
               "cases": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    args.results.with_suffix(".md").write_text(render(results))
    print(f"wrote {args.results}.json and .md")
    return 0


def render(results: dict) -> str:
    """The results as a markdown table, one row per case."""
    m, v = results["machine"], results["versions"]
    lines = [
        "# pacer-stream against mergekit, output for output (benchmarks/bench_parity.py)", "",
        f"Command: `{results['command']}`. Machine: {m['cpu']}, {m['cores']} cores, Python "
        f"{m['python']}. mergekit {v['mergekit']} (torch {v['torch_mergekit']}); pacer-stream "
        f"{v['pacer_stream']} at commit {v['pacer_stream_commit']} (working tree), torch "
        f"{v['torch']}.", "",
        "Models: a tiny fp32 Llama (hidden 64, 4 layers, vocab 256), a base, three "
        "close fine-tunes and one far model (`far`, ~0.3 rad away); both tools compute and write fp32. ulp: |a - b| over the fp32 spacing at "
        f"the larger magnitude; \"agrees\" is at most {results['ulp_tolerance']} ulp everywhere; "
        "\"agrees to fp32 rounding\": pacer-stream's largest error against mergekit's own code "
        "run in float64 (`dtype: float64`) is at most "
        f"{results['rounding_factor']}× mergekit's fp32 output's. "
        "Random-drop rows (DARE, DELLA below density 1) compare statistics of merged - base: "
        "the share of entries left at the base, mean and std.", "",
        "| method | config | pacer input | tensors | max abs diff | max ulp | worst tensor "
        "| max abs vs mergekit float64: pacer-stream / mergekit fp32 | verdict |",
        "|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for row in results["cases"]:
        diff = row.get("diff")
        if diff and row["random"]:  # element-wise numbers mean nothing after random drops
            cells = [str(diff["compared"]), "(random)", "(random)", "", ""]
        elif diff:
            ref = row.get("reference", {})
            cells = [str(diff["compared"]), f"{diff['max_abs']:.3g}", f"{diff['max_ulp']:.3g}",
                     f"`{diff['worst']['tensor']}`" if diff["max_ulp"] > 0 else "",
                     f"{ref['pacer']['max_abs']:.3g} / {ref['mergekit']['max_abs']:.3g}"
                     if "pacer" in ref else ""]
        else:
            cells = ["", "", "", "", ""]
        verdict_text = row["verdict"]
        if row.get("stats"):
            p, k = row["stats"]["pacer"], row["stats"]["mergekit"]
            rescale = (row.get("pacer_parameters") or {}).get("rescale", "its default")
            l1 = (f", L1 rescale check {p['l1_dev']:.2g} vs {k['l1_dev']:.2g}"
                  if "l1_dev" in p else "")
            verdict_text += (f": share at base {p['at_base']:.4f} vs {k['at_base']:.4f}, std "
                             f"{p['std']:.4g} vs {k['std']:.4g}, mean {p['mean']:.2g} vs "
                             f"{k['mean']:.2g}{l1} (pacer-stream vs mergekit; pacer-stream's "
                             f"rescale: {rescale})")
        cells = [row["method"], row["summary"], row.get("pacer_input") or "-", *cells, verdict_text]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "", "pacer input: `mergekit-yaml` means pacer-stream read the mergekit file itself "
        "(`pacer-stream run config.yml OUT`); `translated` means the script's `translate()` "
        "fallback wrote a pacer-stream plan from it; `-` means pacer-stream refused the config "
        "(the verdict says why) and neither tool ran it.", "",
        "Why random rows are statistics: mergekit drops DARE/DELLA entries with torch's global "
        "RNG (torch.bernoulli), pacer-stream with its own mask seeded by (seed, tensor, model) "
        "(`methods/sparsify.py::dare_keep`), so the same entries cannot be dropped; at density 1 "
        "nothing is dropped and those rows compare element by element. \"share at base\" is "
        "the fraction of entries equal to the base (every model's change dropped or out-voted); "
        "the L1 rescale check, where one model alone is merged, is max over tensors of "
        "|‖merged − base‖₁ / ‖ft1 − base‖₁ − 1|: 0 to rounding for mergekit's L1 rescale.", "",
        "Why \"agrees to fp32 rounding\" rows show hundreds of ulps: the worst elements are "
        "results near zero (1e-7 to 1e-6 in tensors of magnitude 0.2) where the merge's terms "
        "cancel; there the two tools' different evaluation orders (pacer-stream takes norms and "
        "dot products from fp64 sums over row slices, mergekit in fp32 over whole tensors) "
        "round differently. mergekit's own fp32 output is as far from its float64 result, "
        "which is what the column before the verdict shows."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
