"""The output folder describes itself: the model card README.md (front matter the Hugging
Face Hub reads, the command, how to reproduce and load it) and pacer_plan.yaml (the plan as
run, which reproduces the weights byte for byte)."""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from runs import DESCRIBING, digests
from pacer_stream import failpoints
from pacer_stream.cli import main
from pacer_stream.config import load_plan, parse_plan
from pacer_stream.config_schema import OutputSpec
from pacer_stream.export.card import model_card, shared_license, task
from pacer_stream.export.plan_file import PLAN_FILE, plan_as_run, plan_yaml
from pacer_stream.io.reader import CheckpointIndex
from pacer_stream.io.sources import LocalFolder

LICENSED = "---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a tiny fine-tune\n"


def licensed_copies(tmp: Path, fixtures: Path, names=("anchor", "ft1", "ft2")) -> list[Path]:
    """Copies of tiny llama inputs whose README.md declares apache-2.0."""
    copies = []
    for name in names:
        copy = tmp / "inputs" / name
        shutil.copytree(fixtures / "llama" / name, copy)
        (copy / "README.md").write_text(LICENSED)
        copies.append(copy)
    return copies


def ties_plan(tmp: Path, anchor: Path, models: list[Path], out: str = "out") -> Path:
    plan = tmp / f"{out}.yaml"
    plan.write_text(f"models: [{', '.join(map(str, models))}]\nbase_model: {anchor}\n"
                    f"method: ties\nparameters: {{density: 0.5}}\nseed: 3\n"
                    f"output: {{path: {tmp / out}}}\n")
    return plan


def invoke(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.fixture(scope="module")
def ties_run(tmp_path_factory, fixtures_dir) -> tuple[Path, Path]:
    """A finished ties merge of licensed copies: (plan file, output folder). --shard-size is
    recorded in the command and folded into the plan; --max-memory is left out."""
    tmp = tmp_path_factory.mktemp("card")
    anchor, *models = licensed_copies(tmp, fixtures_dir)
    plan = ties_plan(tmp, anchor, models)
    invoke("run", str(plan), "--quiet", "--max-memory", "2GB", "--shard-size", "90KB")
    return plan, tmp / "out"


def card_meta(out: Path) -> dict:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_front_matter_is_the_hubs_metadata(ties_run):
    meta = card_meta(ties_run[1])
    # local inputs are named by their folder names (a path names nothing on the hub)
    assert meta["base_model"] == ["ft1", "ft2", "anchor"]
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "pacer-stream", "ties"]
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # every input declares it


def test_license_only_when_every_input_declares_the_same(tmp_path):
    """A merge is under its inputs' terms: one silent or different input, no license key."""
    def inputs(*readmes: str | None):
        out = []
        for k, text in enumerate(readmes):
            folder = tmp_path / f"{len(list(tmp_path.iterdir()))}-{k}"
            folder.mkdir()
            if text is not None:
                (folder / "README.md").write_text(text)
            out.append(SimpleNamespace(files=LocalFolder(folder)))
        return out

    mit = LICENSED.replace("apache-2.0", "mit")
    assert shared_license(inputs(LICENSED, LICENSED)) == {"license": "apache-2.0"}
    assert shared_license(inputs(LICENSED, mit)) == {}
    assert shared_license(inputs(LICENSED, None)) == {}
    assert shared_license(inputs(LICENSED, "# no front matter\n")) == {}
    assert shared_license(inputs(LICENSED, "---\nlanguage: en\n---\n")) == {}
    other = "---\nlicense: other\nlicense_name: tiny\n---\n"
    assert shared_license(inputs(other, other)) == {"license": "other", "license_name": "tiny"}


def test_unlicensed_inputs_give_no_license_key(fixtures_dir):
    folders = [fixtures_dir / "llama" / m for m in ("ft1", "ft2")]
    indexes = [CheckpointIndex.open(LocalFolder(folder)) for folder in folders]
    config = parse_plan({"models": [str(folder) for folder in folders],
                         "method": "linear", "output": {"path": "/tmp/unused"}})
    card = model_card(config, indexes, "llama", {})
    assert "license" not in yaml.safe_load(card.split("---\n")[1])


def test_card_names_the_command_without_the_budget(ties_run):
    plan, out = ties_run
    card = (out / "README.md").read_text()
    assert f"```sh\n{shlex.join(['pacer-stream', 'run', str(plan), '--shard-size', '90KB'])}\n" \
        in card
    assert "2GB" not in card  # --max-memory does not change the output: not recorded
    assert "pacer-stream run pacer_plan.yaml\n```" in card  # its shard size is in the plan


def test_pacer_plan_reproduces_the_run(ties_run, tmp_path):
    """Copied out and pointed elsewhere, the plan as run makes the same bytes, with no
    command-line option: the --shard-size of the first run is in it."""
    raw = yaml.safe_load((ties_run[1] / PLAN_FILE).read_text())
    assert raw["output"]["shard_size"] == 90_000
    raw["output"]["path"] = str(tmp_path / "again")
    plan = tmp_path / PLAN_FILE
    plan.write_text(yaml.safe_dump(raw))
    invoke("run", str(plan), "--quiet")
    first = digests(ties_run[1])
    assert sum(name.endswith(".safetensors") for name in first) >= 3  # several shards
    assert digests(tmp_path / "again") == first


def round_trip(plan: Path) -> None:
    """The dumped plan parses back to an equal PlanConfig, and dumps to the same text."""
    config = load_plan(plan)
    copy = plan.parent / "elsewhere" / PLAN_FILE
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(plan_yaml(config))
    again = load_plan(copy)
    assert dataclasses.replace(again, source=None) == dataclasses.replace(config, source=None)
    assert plan_yaml(again) == plan_yaml(config)


def test_plan_yaml_round_trips_a_pacer_plan(fixtures_dir, tmp_path):
    for m in ("ft1", "ft2", "ft3"):
        shutil.copytree(fixtures_dir / "llama" / m, tmp_path / m)
        (tmp_path / f"{m}.txt").write_text("some sample lines\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(  # relative paths: the dump has them absolute, the config is the same
        "project_name: rt\nmodels: [./ft1, {model: ./ft2, weight: 0.7}, ./ft3]\n"
        "method: pacer\nseed: 5\nparameters: {weight: 0.5, normalize: false}\n"
        "accept_config_differences: [rope_theta]\n"
        "output: {path: ./out, dtype: bfloat16, shard_size: 1MB}\n"
        "pacer: {anchor_strategy: ./ft2, interference_threshold: 0.2, max_experts: 2,\n"
        "        router_samples: {./ft1: ft1.txt, ./ft2: ft2.txt, ./ft3: ft3.txt},\n"
        "        vocabulary: mean, regmean_alpha: 0.5}\n")
    round_trip(plan)
    samples = load_plan(plan).pacer["router_samples"]
    assert str(samples[1]) in plan_yaml(load_plan(plan))  # absolute sample paths


def test_plan_yaml_round_trips_an_aligned_ties_plan(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{{model: {base / 'ft1'}, density: 0.3}}, {base / 'ft2'}]\n"
                    f"base_model: {base / 'anchor'}\nmethod: ties\nalign: true\n"
                    f"parameters: {{density: 0.5, lambda: 1.5}}\n"
                    f"pacer: {{max_sweeps: 3}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    round_trip(plan)
    assert "max_sweeps: 3" in plan_yaml(load_plan(plan))


def test_hub_models_are_pinned_to_the_commit_read(tmp_path):
    """A hub id without a revision is written at the cache's snapshot commit."""
    config = parse_plan({"models": ["org/a", "org/b@v1"], "method": "linear",
                         "output": {"path": str(tmp_path / "out")}}, base_dir=tmp_path)

    def cached(commit: str):
        path = tmp_path / "models--org" / "snapshots" / commit / "config.json"
        return SimpleNamespace(files=SimpleNamespace(local_path=lambda name: path))

    pinned = plan_as_run(config, [cached("abc123"), cached("def456")], 1000)
    text = plan_yaml(pinned)
    assert "model: org/a@abc123" in text and "model: org/b@def456" in text
    assert "shard_size: 1000" in text
    assert parse_plan(yaml.safe_load(text), base_dir=tmp_path) == dataclasses.replace(
        pinned, source=None)


@pytest.mark.parametrize("family, tag", [("llama", "text-generation"), ("bert", "fill-mask"),
                                         ("vit", "image-classification")])
def test_pipeline_tag_follows_the_anchor(fixtures_dir, family, tag):
    index = CheckpointIndex.open(LocalFolder(fixtures_dir / family / "anchor"))
    assert task(index.config)[0] == tag


def synthetic_card(fixtures_dir: Path, out_config: dict, target: str | None = None,
                   exported: str = "qwen2_moe") -> str:
    """The card of a PACER run that upcycled block 2 to 3 experts (a report's pacer
    section), for the export ``out_config`` and ``output.target``."""
    models = [str(fixtures_dir / "conflict" / f"m{k}") for k in (1, 2, 3)]
    output = {"path": "/tmp/unused", **({"target": target} if target else {})}
    config = parse_plan({"models": models, "method": "pacer", "output": output,
                         "pacer": {"router": "data_free"}})
    indexes = [CheckpointIndex.open(LocalFolder(Path(m))) for m in models]
    pacer = {"decision": {"blocks": [2], "num_experts": 3, "top_k": 2, "note": None},
             "exported_as": exported, "parameters": {"growth": 1.285},
             "router": {"kind": "data_free"}}
    return model_card(config, indexes, "llama", {}, pacer, out_config=out_config,
                      command=("pacer-stream", "run", "plan.yaml"))


QWEN2_MOE = {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
             "num_hidden_layers": 4, "mlp_only_layers": [0, 1, 3]}


def test_moe_card_has_the_decision_and_says_llamacpp_needs_its_target(fixtures_dir):
    card = synthetic_card(fixtures_dir, QWEN2_MOE)
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == ["merge", "pacer-stream", "pacer",
                                                              "moe"]
    assert "| MLP blocks upcycled | 2 (of 4) |" in card
    assert "| experts per upcycled block (M) | 3 |" in card and "| top-k | 2 |" in card
    assert "data_free" in card and "1.285x" in card
    assert "vllm serve" in card and "AutoModelForCausalLM" in card
    assert "output: {target: llama.cpp}" in card and "convert_hf_to_gguf" not in card


def test_llamacpp_snippet_where_llamacpp_runs_the_output(fixtures_dir):
    """The llama.cpp target's layout, and a qwen3_moe with no dense block, run there."""
    if "target" not in {f.name for f in dataclasses.fields(OutputSpec)}:
        pytest.skip("output.target is not in this checkout yet")
    mixtral = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
    for card in (synthetic_card(fixtures_dir, mixtral, target="llama.cpp"),
                 synthetic_card(fixtures_dir, {**QWEN2_MOE, "model_type": "qwen3_moe",
                                               "mlp_only_layers": []})):
        assert "convert_hf_to_gguf.py /tmp/unused --outtype f16" in card
        assert "llama-cli -m" in card and "target: llama.cpp}` to the plan" not in card
    qwen3_dense_blocks = {**QWEN2_MOE, "model_type": "qwen3_moe"}
    assert "convert_hf_to_gguf" not in synthetic_card(fixtures_dir, qwen3_dense_blocks)


def test_vit_moe_card_loads_with_remote_code(fixtures_dir):
    vit_moe = {"model_type": "vit_moe", "architectures": ["ViTMoeForImageClassification"],
               "auto_map": {"AutoModelForImageClassification": "x.y"}}
    card = synthetic_card(fixtures_dir, vit_moe, exported="vit_moe")
    assert yaml.safe_load(card.split("---\n")[1])["pipeline_tag"] == "image-classification"
    assert "AutoModelForImageClassification.from_pretrained('/tmp/unused', " \
           "trust_remote_code=True)" in card
    assert "vllm" not in card and "llama.cpp" not in card


def test_split_merge_card_explains_eta_and_materialize(fixtures_dir, tmp_path, monkeypatch):
    """The card's materialize command, run as written, writes an expert."""
    models = ", ".join(str(fixtures_dir / "llama" / m) for m in ("ft1", "ft2", "ft3"))
    plan = tmp_path / "split.yaml"
    plan.write_text(f"models: [{models}]\nmethod: split_merge\nparameters: {{density: 0.05}}\n"
                    f"output: {{path: {tmp_path / 'split'}, shard_size: 200KB}}\n")
    invoke("run", str(plan), "--quiet")
    card = (tmp_path / "split" / "README.md").read_text()
    assert "`eta.safetensors` is η" in card and "split_merge.json" in card
    line = next(l for l in card.splitlines() if l.startswith("pacer-stream materialize "))
    monkeypatch.chdir(tmp_path)
    invoke(*shlex.split(line)[1:])
    assert (tmp_path / "split-expert-0" / "config.json").is_file()
    assert load_plan(tmp_path / "split" / PLAN_FILE).method == "split_merge"


def test_a_resumed_run_writes_the_same_card_and_plan(ties_run, monkeypatch):
    """Interrupted after two units and resumed under another budget: README.md and
    pacer_plan.yaml are the bytes of the uninterrupted run (no timestamp, no budget)."""
    plan, out = ties_run
    before = {name: (out / name).read_bytes() for name in DESCRIBING[1:]}
    shutil.rmtree(out)
    monkeypatch.setattr(failpoints, "_counts", {})
    monkeypatch.setenv("PACER_STREAM_FAILPOINT", "unit-done:2:SIGINT")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = CliRunner().invoke(main, ["run", str(plan), "--quiet", "--shard-size", "90KB"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 130, result.output
    assert not (out / "README.md").exists()
    monkeypatch.delenv("PACER_STREAM_FAILPOINT")
    invoke("run", str(plan), "--quiet", "--max-memory", "1GB", "--shard-size", "90KB")
    assert {name: (out / name).read_bytes() for name in DESCRIBING[1:]} == before


def test_python_api_records_its_call(fixtures_dir, monkeypatch):
    """PACERMerger.merge hands the run its own call form (keywords that differ from the
    defaults; not max_memory, which does not change the output)."""
    from pacer_stream import api

    seen = []

    class Stop(Exception):
        pass

    def fake_run(config, options):
        seen.append(options.command)
        raise Stop

    monkeypatch.setattr(api, "run_merge", fake_run)
    models = [str(fixtures_dir / "conflict" / f"m{k}") for k in (1, 2)]
    with pytest.raises(Stop):
        api.PACERMerger(models, seed=4, max_memory="2GB").merge("api", router="data_free",
                                                                top_k_experts=2)
    assert seen == [("from pacer_stream import PACERMerger", "",
                     f"merger = PACERMerger({models!r}, seed=4)",
                     "merger.merge('api', router='data_free')")]
