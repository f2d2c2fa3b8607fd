"""The model card: the output folder's ``README.md``, which says how the model was made.

``README.md`` is the model card the Hugging Face Hub reads: YAML front matter
(``base_model``, ``library_name``, ``tags``, ``pipeline_tag`` and, when every input
declares the same one, ``license``), then the method, the command, how to reproduce the
run from ``pacer_plan.yaml`` (the plan as run, :mod:`.plan_file`) and how to load the
output.

The card holds no timestamp or anything else that differs between a run and its resume:
a killed run resumed with the same command writes it byte for byte again. The command is
recorded without the options that do not change the output (``--max-memory`` and the like,
see :data:`UNRECORDED_OPTIONS`), so runs under other budgets write the same card too.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Sequence

import yaml

from .. import __version__
from ..config import PlanConfig
from ..errors import PacerError
from ..io.reader import CheckpointIndex
from ..io.writer import write_atomic
from .llamacpp import LLAMACPP
from .plan_file import PLAN_FILE, input_refs, ref_text

CARD_FILE = "README.md"
# `pacer-stream run` options left out of the recorded command: none changes the output's bytes
UNRECORDED_OPTIONS = ("--max-memory", "--state-dir", "--restart", "--force", "--hash-inputs",
                      "--quiet", "--debug", "--backend", "--address")
# architectures suffix -> (pipeline_tag, transformers Auto class)
TASKS = (("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
         ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
         ("ForImageClassification", "image-classification", "AutoModelForImageClassification"),
         ("ForSequenceClassification", "text-classification",
          "AutoModelForSequenceClassification"),
         ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"))
IMAGE_TYPES = ("vit", "vit_moe")
ENCODER_TYPES = ("bert", *IMAGE_TYPES)  # no architectures: every other family is a decoder
LICENSE_KEYS = ("license", "license_name", "license_link")  # license: other names its own


# -- README.md: front matter -------------------------------------------------------------


def front_matter(text: str) -> dict:
    """The YAML front matter of a README.md; {} when there is none or it does not parse."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def shared_license(inputs: Sequence[CheckpointIndex]) -> dict[str, str]:
    """``license`` (with ``license_name``/``license_link`` where given) when every input's
    README.md declares the same; {} when one has no README, no license or another one: a
    merge is under its inputs' terms, and the card must not claim what they do not say."""
    found = []
    for index in inputs:
        meta = _readme_meta(index)
        declared = {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), str)}
        if "license" not in declared:
            return {}
        found.append(declared)
    return found[0] if found and all(f == found[0] for f in found) else {}


def _readme_meta(index: CheckpointIndex) -> dict:
    try:
        if not index.files.has(CARD_FILE):
            return {}
        return front_matter(index.files.read_text(CARD_FILE))
    except (PacerError, OSError, UnicodeDecodeError):  # unreadable: declares nothing
        return {}


def task(config: dict) -> tuple[str, str]:
    """(pipeline_tag, transformers Auto class) of a config.json: from its architectures,
    else its model_type (an encoder without a head extracts features)."""
    model_type = config.get("model_type", "")
    for arch in config.get("architectures") or []:
        for suffix, tag, auto in TASKS:
            if arch.endswith(suffix):
                return tag, auto
    if model_type in IMAGE_TYPES:
        return "image-feature-extraction", "AutoModel"
    if model_type in ENCODER_TYPES:
        return "feature-extraction", "AutoModel"
    return "text-generation", "AutoModelForCausalLM"


def base_model_names(config: PlanConfig) -> list[str]:
    """The hub's ``base_model`` list: hub inputs by repo id, local ones by folder name (a
    local path names nothing on the hub; its folder name is what an upload usually keeps)."""
    names = [ref.repo_id if ref.repo_id else ref.path.name for ref in input_refs(config)]
    return list(dict.fromkeys(names))


def _front(config: PlanConfig, out_config: dict, moe: bool,
           license_keys: dict[str, str]) -> list[str]:
    meta: dict[str, Any] = {
        "base_model": base_model_names(config), "base_model_relation": "merge",
        "library_name": "transformers", "pipeline_tag": task(out_config)[0],
        "tags": ["merge", "pacer-stream", config.method] + (["moe"] if moe else []),
        **license_keys,
    }
    return ["---", yaml.safe_dump(meta, sort_keys=True, allow_unicode=True).rstrip(), "---"]


# -- README.md: the body -----------------------------------------------------------------


def model_card(config: PlanConfig, inputs: list[CheckpointIndex], family: str,
               params: dict, pacer: dict | None = None, *, out_config: dict | None = None,
               command: Sequence[str] | None = None, base: CheckpointIndex | None = None,
               side_files: Sequence[str] = ()) -> str:
    """A README.md that says exactly how the model was made and how to run it.

    ``config`` is the plan as run (:func:`plan_as_run`), ``inputs`` the models' indexes
    (``base`` the base model's), ``pacer`` the report's pacer section, ``out_config`` the
    written config.json, ``command`` the run's recorded command (``RunOptions.command``)
    and ``side_files`` the tokenizer/processor files copied. No timestamps: a resumed run
    writes the same bytes."""
    out_config = out_config if out_config is not None else inputs[0].config
    moe = pacer is not None and pacer["exported_as"] != "dense"
    everyone = list(inputs) + ([base] if base is not None else [])
    lines = _front(config, out_config, moe, shared_license(everyone))
    lines += [f"# {config.project_name}", "",
              f"A `{config.method}` merge of {len(input_refs(config))} {family} checkpoints, made "
              f"with pacer-stream {__version__}.", ""]
    lines += _inputs(config, inputs, params)
    lines += _method(config, params)
    if pacer is not None:
        lines += _pacer_table(config, pacer, out_config)
    if config.method == "split_merge":
        lines += _split(config)
    lines += _made(command)
    lines += _reproduce(config, command)
    lines += _usage(config, out_config, moe, side_files)
    return "\n".join(lines)


def _inputs(config: PlanConfig, inputs: list[CheckpointIndex], params: dict) -> list[str]:
    lines = ["## Inputs", ""]
    if config.slices:  # the output's blocks, slice by slice
        first = 0
        for piece in config.slices:
            sources = ", ".join(f"`{ref_text(s.ref)}` layers {s.start}-{s.end - 1}"
                                for s in piece.sources)
            lines.append(f"- blocks {first}-{first + piece.length - 1}: {sources}")
            first += piece.length
        return lines + [""]
    weights = params.get("weights") or [e.weight for e in config.models]
    for k, (entry, index) in enumerate(zip(config.models, inputs)):
        lines.append(f"- `{ref_text(entry.ref)}` (weight {weights[k]}"
                     + (f", density {entry.density}" if entry.density is not None else "")
                     + f"; read from `{index.files.label}`)")
    if config.base_model is not None:
        lines.append(f"- base model: `{ref_text(config.base_model)}`")
    return lines + [""]


def _method(config: PlanConfig, params: dict) -> list[str]:
    record = {"method": config.method, "seed": config.seed, **params}
    return ["## Method", "", "```json", json.dumps(record, indent=2, sort_keys=True), "```", ""]


def _pacer_table(config: PlanConfig, pacer: dict, out_config: dict) -> list[str]:
    """PACER's decision: which blocks became experts, how many, how routed, at what size."""
    d = pacer["decision"]
    upcycled = pacer["exported_as"] != "dense"
    layers = out_config.get("num_hidden_layers")
    blocks = (f"{', '.join(map(str, d['blocks']))}" + (f" (of {layers})" if layers else "")
              if upcycled else f"none ({d['note'] or 'no block over the threshold'})")
    router = pacer.get("router") or {}
    rows = [("interference threshold", config.pacer["interference_threshold"]),
            ("MLP blocks upcycled", blocks)]
    if upcycled:
        rows += [("experts per upcycled block (M)", d["num_experts"]),
                 ("top-k", d["top_k"]),
                 ("router", f"{router.get('kind', 'linear')} "
                            f"({config.pacer['router_mode']} gate)"),
                 ("exported as", f"`{out_config.get('model_type', pacer['exported_as'])}`")]
    rows.append(("parameters", f"{pacer['parameters']['growth']:.3f}x the source's"))
    return (["## PACER's decision", "", "| | |", "|---|---|"]
            + [f"| {name} | {value} |" for name, value in rows] + [""])


def _split(config: PlanConfig) -> list[str]:
    """What a Split-Merge folder holds beyond μ, and how to get an expert as a model."""
    out = config.output.path
    names = ", ".join(f"{k} = `{e.ref.path.name if e.ref.path else e.ref.repo_id}`"
                      for k, e in enumerate(config.models))
    return [
        "## Split-Merge: μ, η and one coefficient per expert", "",
        "The weights here are μ, the models' mean, a dense checkpoint that loads as it is. "
        "`eta.safetensors` is η, the experts' one shared sparse direction of difference from "
        "μ (a tensor is `NAME::indices` + `NAME::values` where that is smaller, else dense "
        "`NAME`); `split_merge.json` holds each expert's coefficient c_t. Expert t is "
        "μ + c_t·η. To write one expert as a dense model:", "",
        "```sh",
        shlex.join(["pacer-stream", "materialize", str(out), "--expert", "0", "--to",
                    f"{out.name}-expert-0"]),
        "```", "",
        f"(`--expert` takes an index or a model's name: {names}; `--coefficient c` writes "
        "μ + c·η for any c.)", "",
    ]


def _made(command: Sequence[str] | None) -> list[str]:
    lines = ["## How it was made", ""]
    if not command:
        return lines + ["Made through pacer-stream's Python functions (no command recorded).",
                        ""]
    if command[0] == "pacer-stream":
        return lines + ["```sh", shlex.join(command), "```", "",
                        "Options that do not change the output "
                        f"({', '.join(f'`{o}`' for o in UNRECORDED_OPTIONS)}) are not recorded: "
                        "a resumed run, or one under another budget, writes this same card.", ""]
    return lines + ["```python", *command, "```", ""]


def _reproduce(config: PlanConfig, command: Sequence[str] | None) -> list[str]:
    flags = _run_flags(command)
    return [
        "## Reproduce", "",
        f"`{PLAN_FILE}` in this folder is the plan as run: inputs as absolute paths (hub ids "
        "with their revision), every setting with its default filled in, the output's dtype, "
        "shard size and path. A plan may not lie inside its own output folder, so copy it "
        "out and point `output.path` at a new folder; the weights come out byte-identical "
        "(same inputs, same seed):", "",
        "```sh",
        f"cp {shlex.quote(str(config.output.path / PLAN_FILE))} {PLAN_FILE}   "
        "# then set output.path in it to a new folder",
        shlex.join(["pacer-stream", "run", PLAN_FILE, *flags]),
        "```", "",
    ]


def _run_flags(command: Sequence[str] | None) -> list[str]:
    """The recorded `pacer-stream run` options a re-run still needs (--device,
    --allow-nonfinite); --shard-size is in the plan as run already."""
    if not command or command[0] != "pacer-stream":
        return []
    flags, rest = [], list(command[3:])
    while rest:  # OUT, --shard-size and --no-copy-tokenizer are in the plan as run already
        option = rest.pop(0)
        value = [rest.pop(0)] if option in ("--device", "--shard-size") and rest else []
        if option in ("--device", "--allow-nonfinite"):
            flags += [option, *value]
    return flags


def _usage(config: PlanConfig, out_config: dict, moe: bool,
           side_files: Sequence[str]) -> list[str]:
    """A loading snippet for every runtime that serves this output."""
    folder = str(config.output.path)
    tag, auto = task(out_config)
    remote = "auto_map" in out_config  # ViT-MoE: its modeling code is in the folder
    args = f"{folder!r}" + (", trust_remote_code=True" if remote else "")
    lines = ["## Use", "", "transformers" + (" (the modeling code is in this folder: "
                                             "`trust_remote_code=True`)" if remote else "") + ":",
             "", "```python", f"from transformers import {auto}", "",
             f"model = {auto}.from_pretrained({args})"]
    preprocessor = _preprocessor(tag, side_files)
    if preprocessor:
        lines.insert(-2, f"from transformers import {preprocessor}")
        lines.append(f"{'tokenizer' if preprocessor == 'AutoTokenizer' else 'processor'} = "
                     f"{preprocessor}.from_pretrained({folder!r})")
    lines += ["```", ""]
    if tag == "text-generation":
        lines += ["vLLM:", "", "```sh", shlex.join(["vllm", "serve", folder]), "```", ""]
        lines += _llamacpp(config, out_config, moe)
    return lines


def _preprocessor(tag: str, side_files: Sequence[str]) -> str | None:
    if tag.startswith("image") and "preprocessor_config.json" in side_files:
        return "AutoImageProcessor"
    if not tag.startswith("image") and any(f.startswith("tokenizer") for f in side_files):
        return "AutoTokenizer"
    return None


def _llamacpp(config: PlanConfig, out_config: dict, moe: bool) -> list[str]:
    """llama.cpp runs dense decoders and the llama.cpp target's MoE; not the default
    qwen2_moe export, nor a qwen3_moe one with dense blocks (export/llamacpp.py)."""
    target = config.output.target
    model_type = out_config.get("model_type")
    unsupported = target != LLAMACPP and (model_type == "qwen2_moe" or (
        model_type == "qwen3_moe" and out_config.get("mlp_only_layers")))
    if unsupported:
        return [f"llama.cpp does not run this `{model_type}` export (its converter and runtime "
                "want experts in every block); for llama.cpp, add `output: {target: llama.cpp}` "
                "to the plan and run it again into a new folder.", ""]
    folder = str(config.output.path)
    gguf = f"{config.output.path.name}-f16.gguf"
    return ["llama.cpp" + (" (this folder is the `llama.cpp` target's layout)"
                           if moe and target == LLAMACPP else "") + ":", "", "```sh",
            shlex.join(["python", "convert_hf_to_gguf.py", folder, "--outtype", "f16",
                        "--outfile", gguf]),
            shlex.join(["llama-cli", "-m", gguf, "-p", "Hello"]), "```", ""]


def write_card(out_dir: Path, text: str) -> None:
    write_atomic(out_dir / CARD_FILE, text)
