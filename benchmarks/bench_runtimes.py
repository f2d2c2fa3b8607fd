#!/usr/bin/env python
"""Runtime check of merged outputs: does llama.cpp compute what transformers computes?

For every export kind (a dense merge; a PACER merge with some blocks upcycled, the rest in
``mlp_only_layers``; a PACER merge with every block upcycled) of every decoder family
(llama, mistral, qwen2, qwen3) under every export target (``output: {target: transformers}``,
the default, and ``output: {target: llama.cpp}``), this

1. merges tiny fixtures whose vocabulary is GPT-2's (scripts/make_fixtures.py
   --gpt2-tokenizer: llama.cpp's converter only converts a tokenizer it recognises) as a
   whole ``pacer-stream run PLAN.yaml`` process;
2. converts the output with llama.cpp's convert_hf_to_gguf.py (--outtype f32);
3. loads the GGUF with llama-cpp-python (flash attention off), evaluates a fixed token
   sequence and reads every position's logits;
4. computes the same logits with transformers (float32) and records the largest
   absolute difference.

Results go to benchmarks/results/runtimes-<host>.{json,md}.

    python benchmarks/bench_runtimes.py [--work /tmp/pacer-runtimes] [--family qwen3 ...]

llama.cpp is the one vendored in the PyPI sdist of llama-cpp-python 0.3.36, cached under
~/.cache/pacer-stream/llama.cpp-0.3.36/ (outside the repository, so a fresh clone reuses it):
the sdist (``pip download``, 76 MB), its converter extracted from it, and a venv with the
binding (built from the sdist, about 20 minutes on 2 cores, unless pip has a wheel of it
cached). The converter runs with this Python (its torch and transformers); sentencepiece,
which the converter imports and this Python may lack, is pip-installed into
<cache>/convert-deps, on the converter's PYTHONPATH only. One change to transformers inside
the converter's process is explained at CONVERT below.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp we run
SDIST = f"llama_cpp_python-{LLAMACPP_PYTHON}.tar.gz"
CACHE = Path.home() / ".cache" / "pacer-stream" / f"llama.cpp-{LLAMACPP_PYTHON}"
VENDOR = f"llama_cpp_python-{LLAMACPP_PYTHON}/vendor/llama.cpp/"
# What of the vendored llama.cpp the converter needs (pure Python, no build), and the
# GPT-2 vocabulary with llama.cpp's own tokenizer test of it (.inp/.out).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-gpt-2.gguf")
LLAMACPP_COMMIT = f"llama_cpp_python-{LLAMACPP_PYTHON}/.git/modules/vendor/llama.cpp/HEAD"
CONVERT_EXTRAS = "sentencepiece>=0.1.98,<0.3.0"  # the converter's requirements pin
BUILD_ENV = {"CMAKE_BUILD_PARALLEL_LEVEL": "2",
             "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"}

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TARGETS = ("transformers", "llama.cpp")
# kind -> the plan's method section. The fine-tunes disagree strongly only on block 2's MLP
# (make_fixtures.CONFLICT_BLOCK), weakly everywhere else: threshold 0.35 upcycles that block
# alone (as plans/tiny-smoke.yaml does), threshold 0 every block.
KINDS = {
    "dense": "method: linear\n",
    "moe-partial": "method: pacer\npacer: {interference_threshold: 0.35, top_k_experts: 2, "
                   "router: data_free}\n",
    "moe-full": "method: pacer\npacer: {interference_threshold: 0.0, top_k_experts: 2, "
                "router: data_free}\n",
}
# GPT-2's <|endoftext|>, then "The quick brown fox jumps over the lazy dog; merged experts
# route each token to two of three." and four ids from the vocabulary's far end.
TOKENS = [50256, 464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 26, 23791, 6154, 6339,
          1123, 11241, 284, 734, 286, 1115, 13, 40000, 45000, 50000, 50255]

# transformers 5 loads the tokenizer of any qwen2-type folder as Qwen2Tokenizer whatever its
# tokenizer_config.json names (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), and Qwen2Tokenizer
# imposes Qwen2's split regex: over GPT-2's vocabulary that hashes to no pre-tokenizer the
# converter knows ("BPE pre-tokenizer was not recognized"), an artefact of our fixtures (a
# real Qwen2 model has Qwen2's vocabulary). The converter pins transformers 4.57.6, which
# honours tokenizer_class; the converter runs here with that resolution restored for qwen2.
CONVERT = textwrap.dedent("""
    import os, runpy, sys
    from transformers.models.auto import tokenization_auto
    tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS.discard("qwen2")
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
""")
CONVERTER_PATCH = "qwen2 removed from transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS"

# The KV cache is float16 by default in llama.cpp, which alone moves these logits by ~1e-3;
# with a float32 cache they match transformers to float32 rounding (~1e-6), so a wrong
# tensor or routing shows. Both are measured: "f32" is the check, "f16" what users get.
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
LLAMA_EVAL = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llama_cpp import Llama
    path, tokens, out, verbose = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    logits = {}
    for name, kv in json.loads(sys.argv[5]).items():
        llm = Llama(model_path=path, logits_all=True, n_ctx=64, n_threads=2, flash_attn=False,
                    type_k=kv, type_v=kv, verbose=verbose)
        llm.eval(tokens)
        logits[name] = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
        llm.close()
    np.savez(out, **logits)
""")


# --- llama.cpp: the sdist, its converter, the binding ---------------------------------------

def find_sdist(cache: Path = CACHE) -> Path | None:
    """The llama-cpp-python sdist: $PACER_LLAMACPP_SDIST, else the cache's copy."""
    given = os.environ.get("PACER_LLAMACPP_SDIST")
    for path in ([Path(given)] if given else []) + [cache / SDIST]:
        if path.is_file():
            return path
    return None


def fetch_sdist(cache: Path) -> Path:
    """The sdist, downloaded into the cache by pip the first time."""
    found = find_sdist(cache)
    if found:
        return found
    print(f"downloading llama-cpp-python {LLAMACPP_PYTHON} (sdist, 76 MB) into {cache}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMACPP_PYTHON}",
                    "--no-deps", "--no-binary", ":all:", "-d", str(cache)], check=True)
    return cache / SDIST


def extract_converter(sdist: Path, dest: Path) -> Path:
    """convert_hf_to_gguf.py, conversion/, gguf-py/ and the GPT-2 vocabulary out of the sdist
    into ``dest`` (the layout of a llama.cpp checkout), with the vendored commit in COMMIT.
    Reads the archive only when ``dest`` lacks them."""
    if (dest / "COMMIT").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    commit = ""
    with tarfile.open(sdist) as tar:
        for member in tar:
            if member.name == LLAMACPP_COMMIT:
                commit = tar.extractfile(member).read().decode().strip()
            rel = member.name.removeprefix(VENDOR)
            if rel != member.name and rel.startswith(CONVERTER_PARTS):
                member.name = rel
                tar.extract(member, tmp, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{sdist}: no {VENDOR}convert_hf_to_gguf.py in it")
    (tmp / "COMMIT").write_text(commit + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def convert_env(converter: Path, extras: Path | None) -> dict:
    """The converter's environment: this Python, its gguf-py, the extras folder if any."""
    paths = [str(converter / "gguf-py")] + ([str(extras)] if extras else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])}


def ensure_convert_extras(cache: Path) -> Path | None:
    """sentencepiece for the converter, which imports it before looking for tokenizer.model
    (our fixtures have none; without the module the import fails first). None when this
    Python has it; else pip installs it into <cache>/convert-deps, on PYTHONPATH only there."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece"):
        return None
    extras = cache / "convert-deps"
    if not any(extras.glob("sentencepiece*")):
        print(f"installing {CONVERT_EXTRAS} into {extras} (for the converter only)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(extras),
                        CONVERT_EXTRAS], check=True)
    return extras


def cached_wheel() -> str | None:
    """A llama-cpp-python wheel of our version that pip built before (its wheel cache)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python",
                             "--format=abspath"], capture_output=True, text=True).stdout.split()
    return next((w for w in listed if f"-{LLAMACPP_PYTHON}-" in Path(w).name), None)


def ensure_venv(cache: Path, sdist: Path) -> Path:
    """The Python of <cache>/venv, where llama_cpp imports; made the first time, from pip's
    cached wheel if it has one, else built from the sdist (about 20 minutes on 2 cores)."""
    python = cache / "venv" / "bin" / "python"
    # cwd "/" everywhere the venv runs: in a folder holding llama_cpp's sources (an unpacked
    # sdist) `import llama_cpp` would find those, which have no compiled library
    probe = [str(python), "-c", "import llama_cpp"]
    if python.exists() and subprocess.run(probe, capture_output=True, cwd="/").returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(cache / "venv")], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["numpy"], check=True)
    wheel = cached_wheel()
    print(f"installing llama-cpp-python into {cache / 'venv'} from "
          + (wheel or f"{sdist} (building llama.cpp: about 20 minutes)"), flush=True)
    subprocess.run(pip + [wheel or str(sdist)], check=True, env={**os.environ, **BUILD_ENV})
    subprocess.run(probe, check=True, cwd="/")
    return python


# --- fixtures, merges, conversions, logits --------------------------------------------------

def make_fixtures():
    """scripts/make_fixtures.py, as a module."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import make_fixtures as module

    return module


def gguf_module(converter: Path):
    """The converter's own gguf-py (GGUFReader), the version that wrote the files."""
    return make_fixtures().import_gguf(converter / "models" / "ggml-vocab-gpt-2.gguf")


def gguf_facts(converter: Path, path: Path) -> dict:
    """Architecture, tensor count and tokenizer names a GGUF file records."""
    reader = gguf_module(converter).GGUFReader(str(path))
    value = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    return {"gguf_arch": value("general.architecture"), "gguf_tensors": len(reader.tensors),
            "gguf_pre": value("tokenizer.ggml.pre")}


def ensure_fixtures(work: Path, converter: Path, families: list[str]) -> Path:
    """The GPT-2-vocabulary fixture families under <work>/fixtures/gpt2, made again when
    make_fixtures.py changed."""
    fixtures = make_fixtures()
    root = work / "fixtures"
    stamp = root / "gpt2" / "FIXTURES.json"
    current = stamp.is_file() and json.loads(stamp.read_text()).get("script") == \
        fixtures.script_digest() and set(families) <= set(json.loads(stamp.read_text())["families"])
    if not current:
        print(f"making GPT-2-vocabulary fixtures ({', '.join(families)}) under {root / 'gpt2'}",
              flush=True)
        fixtures.make_gpt2_families(root, converter / "models" / "ggml-vocab-gpt-2.gguf",
                                         families)
    return root / "gpt2"


def write_plan(path: Path, fixtures: Path, family: str, kind: str, target: str) -> Path:
    """A plan merging the family's three fine-tunes as ``kind`` under export ``target``."""
    models = ", ".join(str(fixtures / family / f"ft{k}") for k in (1, 2, 3))
    target_key = "" if target == "transformers" else f", target: {target}"
    path.write_text(f"models: [{models}]\nseed: 0\n{KINDS[kind]}"
                    f"output: {{path: {path.with_suffix('')}{target_key}}}\n")
    return path


def error_line(stderr: str) -> str:
    """The error a failed process reports: its last exception line (or its last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Exit)|pacer-stream: error)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "failed with no message"


def pacer_stream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacer_stream", *args], capture_output=True,
                          text=True, cwd=ROOT)


def target_refused(stderr: str) -> bool:
    """Whether `pacer-stream` refused output.target itself: a version without the key, or
    without this value of it (other errors of such a plan are results, not this)."""
    return bool(re.search(r"unknown key 'target'|output\.target: expected one of", stderr))


def merge(plan: Path, target: str) -> tuple[str, str | None]:
    """("ok" | "target not available" | "error", message): `pacer-stream plan` first for a
    non-default target (a plan key this version may not know yet), then `pacer-stream run`."""
    if target != "transformers":
        checked = pacer_stream("plan", str(plan))
        if checked.returncode != 0 and target_refused(checked.stderr):
            return "target not available", error_line(checked.stderr)
    shutil.rmtree(plan.with_suffix(""), ignore_errors=True)
    proc = pacer_stream("run", str(plan), "--quiet")
    return ("ok", None) if proc.returncode == 0 else ("error", error_line(proc.stderr))


def convert(converter: Path, extras: Path | None, folder: Path, out: Path) -> str | None:
    """convert_hf_to_gguf.py FOLDER --outtype f32; None, or the first line of its error."""
    proc = subprocess.run([sys.executable, "-c", CONVERT, str(converter / "convert_hf_to_gguf.py"),
                           str(folder), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, env=convert_env(converter, extras))
    return None if proc.returncode == 0 and out.is_file() else error_line(proc.stderr)


def llama_logits(venv_python: Path, gguf_file: Path, tokens: list[int]):
    """({kv type: logits [len(tokens), vocab]} from llama.cpp, None) or (None, error). On a
    failure it runs again verbose, for llama.cpp's own reason (verbose=False hides it)."""
    import numpy as np

    out = gguf_file.with_suffix(".logits.npz")
    out.unlink(missing_ok=True)
    for verbose in ("0", "1"):
        proc = subprocess.run([str(venv_python), "-c", LLAMA_EVAL, str(gguf_file), json.dumps(tokens),
                               str(out), verbose, json.dumps(KV_TYPES)], capture_output=True,
                              text=True, cwd="/")
        if proc.returncode == 0:
            return dict(np.load(out)), None
    lines = [line.strip() for line in proc.stderr.splitlines()]
    reasons = [line for line in lines if "error loading model" in line] or \
        [line for line in lines if "error" in line.lower()]
    return None, (reasons[0][:300] if reasons else error_line(proc.stderr))


def transformers_logits(folder: Path, tokens: list[int]):
    """(logits [len(tokens), vocab] from transformers in float32, None) or (None, error)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a load failure is a result here
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    with torch.no_grad():
        return model.eval()(torch.tensor([tokens])).logits[0].numpy(), None


def output_facts(folder: Path) -> dict:
    """model_type, experts and the blocks upcycled, from the output's config and report."""
    config = json.loads((folder / "config.json").read_text())
    report_file = folder / "pacer_report.json"
    report = json.loads(report_file.read_text()).get("pacer") if report_file.is_file() else None
    report = report or {}  # a dense method reports "pacer": null
    blocks = [b["layer"] for b in report.get("blocks", []) if b.get("upcycled")]
    return {"model_type": config.get("model_type"),
            "num_experts": config.get("num_experts", config.get("num_local_experts")),
            "mlp_only_layers": config.get("mlp_only_layers"),
            "upcycled_blocks": blocks if report else None}


def timed(row: dict, step: str, fn, *args):
    """fn(*args), its wall seconds recorded in row["seconds"][step]."""
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        row.setdefault("seconds", {})[step] = round(time.perf_counter() - start, 2)


def run_case(work: Path, fixtures: Path, tools: dict, family: str, kind: str, target: str) -> dict:
    """One row: merge, convert, load in llama.cpp, compare logits with transformers."""
    import numpy as np

    row: dict = {"kind": kind, "family": family, "target": target}
    plan = write_plan(work / "plans" / f"{kind}-{family}-{target}.yaml", fixtures, family, kind,
                      target)
    row["merge"], row["merge_error"] = timed(row, "merge", merge, plan, target)
    if row["merge"] != "ok":
        return row
    folder = plan.with_suffix("")
    row.update(output_facts(folder))
    gguf_file = work / "gguf" / f"{kind}-{family}-{target}.gguf"
    gguf_file.parent.mkdir(parents=True, exist_ok=True)
    gguf_file.unlink(missing_ok=True)
    row["convert_error"] = timed(row, "convert", convert, tools["converter"], tools["extras"],
                                 folder, gguf_file)
    row["convert"] = "ok" if row["convert_error"] is None else "error"
    if row["convert"] == "ok":
        row.update(gguf_facts(tools["converter"], gguf_file))
    expected, row["transformers_error"] = timed(row, "transformers", transformers_logits, folder,
                                                TOKENS)
    if expected is not None:
        row["max_abs_logit"] = float(abs(expected).max())
    if row["convert"] != "ok":
        return row
    got, row["load_error"] = timed(row, "llama.cpp", llama_logits, tools["venv_python"], gguf_file,
                                   TOKENS)
    row["load"] = "ok" if got is not None else "error"
    if got is not None and expected is not None:
        for kv, logits in got.items():
            finite = np.isfinite(logits)
            row["logits_compared"] = int(logits.size)
            if finite.all():
                row[f"max_abs_diff_kv_{kv}"] = float(abs(logits - expected).max())
            else:  # NaN is no number to compare (nor valid JSON): count what is not finite
                row[f"nonfinite_kv_{kv}"] = int((~finite).sum())
    return row


# --- results ----------------------------------------------------------------------------------

def machine() -> dict:
    """The machine, as benchmarks/bench_dense.py records it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_dense import machine as dense_machine

    return dense_machine()


def provenance() -> dict:
    """The commit measured, and the files of pacer_stream/ changed since (work in progress)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=ROOT).stdout
    status = git("status", "--porcelain", "--", "pacer_stream").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "pacer_stream_changed": [line[3:] for line in status]}  # "XY path"


def summary(row: dict) -> str:
    """One progress line per row."""
    steps = [f"{step} {cell(row, step)}" for step in ("merge", "convert", "load") if step in row]
    diff = diff_cell(row, "f32")
    return (f"{row['kind']:<12} {row['family']:<8} {row['target']:<12} {row.get('model_type', ''):<11} "
            + ", ".join(steps) + (f", max abs diff {diff}" if diff != "—" else "")
            + f" ({sum(row['seconds'].values()):.0f} s)")


def versions(converter: Path, venv_python: Path, extras: Path | None) -> dict:
    import tokenizers
    import torch
    import transformers

    binding = subprocess.run([str(venv_python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True, cwd="/").stdout.strip()
    return {"llama_cpp_python": binding, "llama_cpp_commit": (converter / "COMMIT").read_text().strip(),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "converter_extras": CONVERT_EXTRAS if extras else None,
            "converter_patch": CONVERTER_PATCH}


def cell(row: dict, step: str) -> str:
    """A table cell for merge/convert/load: ok, or the error (a pipe would end the cell)."""
    if step not in row:
        return "—"
    value = row[step]
    error = row.get(f"{step}_error")
    text = value if value == "ok" or not error else f"{value}: {error}"
    return text.replace("|", "\\|")


def diff_cell(row: dict, kv: str) -> str:
    """max |llama.cpp - transformers| under KV cache type ``kv``, or why there is none."""
    if f"max_abs_diff_kv_{kv}" in row:
        return f"{row[f'max_abs_diff_kv_{kv}']:.1e}"
    if f"nonfinite_kv_{kv}" in row:
        count, total = row[f"nonfinite_kv_{kv}"], row["logits_compared"]
        return f"llama.cpp NaN/inf: {'all' if count == total else count} of {total}"
    return "—"


def render(results: dict) -> str:
    m, v = results["machine"], results["versions"]
    lines = [
        "# llama.cpp vs transformers on merged outputs (benchmarks/bench_runtimes.py)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1e9:.0f} GB RAM, "
        f"Python {m['python']}; llama-cpp-python {v['llama_cpp_python']} (vendored llama.cpp "
        f"{v['llama_cpp_commit'][:7]}), transformers {v['transformers']}, torch {v['torch']}.", "",
        "Fixtures: 4-block decoders (hidden 64) with GPT-2's vocabulary (50257 tokens, tokenizer "
        "rebuilt from llama.cpp's ggml-vocab-gpt-2.gguf, pre-tokenizer recognised as "
        f"{' / '.join(results['tokenizer']['pre']) or '(no conversion)'}, and encoding "
        "llama.cpp's own GPT-2 tokenizer test "
        + ("identically" if not results['tokenizer']['llama_cpp_test_mismatches'] else "**differently**")
        + "); three fine-tunes per family that disagree strongly "
        "only on block 2's MLP. dense = `method: linear` of the three; moe-partial = PACER, "
        "threshold 0.35; moe-full = PACER, threshold 0 (router data_free, top-2). GGUF by "
        "convert_hf_to_gguf.py --outtype f32; logits of "
        f"{len(results['tokens'])} tokens, every position, llama.cpp (flash attention off) vs "
        "transformers (float32) on the same output folder, with llama.cpp's KV cache in float32 "
        "(the check: rounding is ~1e-6) and in float16 (its default: ~1e-3). The converter runs "
        "with transformers' tokenizer-class choice for qwen2 folders set back to the one of the "
        "transformers it pins (4.57.6; see CONVERT in the script): transformers "
        f"{v['transformers']} imposes Qwen2's pre-tokenizer on any qwen2 folder, and our GPT-2 "
        "vocabulary then hashes to no known pre-tokenizer.", "",
        "| kind | source | target | output model_type | upcycled blocks | mlp_only_layers | merge "
        "| convert | GGUF arch (tensors) | load | max abs logit diff, KV f32 | KV f16 "
        "| max abs logit |",
        "|---|---|---|---|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in results["rows"]:
        diffs = [diff_cell(r, kv) for kv in KV_TYPES]
        if r.get("transformers_error"):
            diffs[0] = f"transformers: {r['transformers_error']}".replace("|", "\\|")
        scale = f"{r['max_abs_logit']:.2f}" if "max_abs_logit" in r else "—"
        blocks = r.get("upcycled_blocks")
        blocks = "—" if blocks is None else (", ".join(map(str, blocks)) or "none")
        dense = r.get("mlp_only_layers")
        dense = "—" if dense is None else (", ".join(map(str, dense)) or "[]")
        arch = f"{r['gguf_arch']} ({r['gguf_tensors']})" if "gguf_arch" in r else "—"
        lines.append(f"| {r['kind']} | {r['family']} | {r['target']} | {r.get('model_type', '—')} "
                     f"| {blocks} | {dense} | {cell(r, 'merge')} | {cell(r, 'convert')} | {arch} "
                     f"| {cell(r, 'load')} | {diffs[0]} | {diffs[1]} | {scale} |")
    src = results["source"]
    changed = f", with uncommitted changes to {', '.join(src['pacer_stream_changed'])}" \
        if src["pacer_stream_changed"] else ""
    lines += ["", f"pacer-stream at {src['commit']}{changed}. Total {results['seconds']:.0f} s "
              "(per-step seconds in the .json)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/pacer-runtimes"))
    parser.add_argument("--cache", type=Path, default=CACHE, help="llama.cpp cache folder")
    parser.add_argument("--family", action="append", choices=FAMILIES)
    parser.add_argument("--kind", action="append", choices=list(KINDS))
    parser.add_argument("--target", action="append", choices=TARGETS)
    parser.add_argument("--host", default=platform.node() or "host", help="results file suffix")
    args = parser.parse_args()
    start = time.perf_counter()
    families = args.family or list(FAMILIES)

    sdist = fetch_sdist(args.cache)
    converter = extract_converter(sdist, args.cache / "llama.cpp")
    tools = {"converter": converter, "extras": ensure_convert_extras(args.cache),
             "venv_python": ensure_venv(args.cache, sdist)}
    (args.work / "plans").mkdir(parents=True, exist_ok=True)
    fixtures = ensure_fixtures(args.work, converter, families)
    vocab_file = converter / "models" / "ggml-vocab-gpt-2.gguf"
    mismatches = make_fixtures().gpt2_tokenizer_mismatches(fixtures / families[0] / "anchor",
                                                           vocab_file)
    results = {"machine": machine(),
               "versions": versions(converter, tools["venv_python"], tools["extras"]),
               "source": provenance(), "tokens": TOKENS,
               "tokenizer": {"llama_cpp_test_mismatches": mismatches}, "rows": []}
    for kind in args.kind or list(KINDS):
        for family in families:
            for target in args.target or list(TARGETS):
                row = run_case(args.work, fixtures, tools, family, kind, target)
                results["rows"].append(row)
                print(summary(row), flush=True)
    results["tokenizer"]["pre"] = sorted({r["gguf_pre"] for r in results["rows"]
                                          if r.get("gguf_pre")})
    results["seconds"] = round(time.perf_counter() - start, 1)

    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"runtimes-{args.host}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
