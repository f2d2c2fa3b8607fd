"""PACER end to end: alignment, consensus, upcycling of the conflicting block, qwen2_moe export.

The "conflict" fixture family is three 4-block Llama fine-tunes that agree everywhere
except block 2's MLP (scripts/make_fixtures.py). A PACER merge must upcycle exactly that
block, write a qwen2_moe checkpoint stock transformers loads, account for its parameters
exactly, resume to the same bytes, and stay in its memory budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import make_fixtures
from runs import digests, run_cli
from pacer_stream import __version__
from pacer_stream.cli import main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = make_fixtures.CONFLICT_BLOCK
BUDGET = 600 * 2**20


def run_budgeted(plan: Path, *args: str, **kwargs):
    return run_cli(plan, "--max-memory", str(BUDGET), *args, **kwargs)


def write_plan(tmp: Path, fixtures: Path, out: str = "out", **pacer) -> Path:
    models = ", ".join(str(fixtures / "conflict" / f"m{k}") for k in (1, 2, 3))
    options = {"interference_threshold": 0.35, "top_k_experts": 2, "router": "data_free", **pacer}
    text = ", ".join(f"{k}: {json.dumps(v)}" for k, v in options.items())
    plan = tmp / f"{out}.yaml"
    plan.write_text(f"models: [{models}]\nmethod: pacer\nseed: 0\npacer: {{{text}}}\n"
                    f"output: {{path: {tmp / out}, shard_size: 200KB}}\n")
    return plan


@pytest.fixture(scope="module")
def merged(tmp_path_factory, fixtures_dir) -> Path:
    tmp = tmp_path_factory.mktemp("pacer")
    proc = run_budgeted(write_plan(tmp, fixtures_dir))
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def test_exactly_the_conflicting_block_is_upcycled(merged):
    config = json.loads((merged / "config.json").read_text())
    report = json.loads((merged / "pacer_report.json").read_text())["pacer"]
    assert config["model_type"] == "qwen2_moe"
    assert config["mlp_only_layers"] == [b for b in range(4) if b != BLOCK]
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert [b["layer"] for b in report["blocks"] if b["upcycled"]] == [BLOCK]
    interference = {b["layer"]: b["mlp"]["interference"] for b in report["blocks"]}
    assert max(interference, key=interference.get) == BLOCK
    assert interference[BLOCK] > 0.35 > max(v for k, v in interference.items() if k != BLOCK)
    assert report["exported_as"] == "qwen2_moe"


def test_output_loads_and_generates_with_stock_transformers(merged):
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        merged, output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert not info["unexpected_keys"] and not info["missing_keys"]
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_parameters_are_accounted_exactly(merged):
    report = json.loads((merged / "pacer_report.json").read_text())["pacer"]
    params = report["parameters"]
    written = sum(t.numel() for t in make_fixtures.file_state(merged).values())
    assert params["output"] == written
    config = json.loads((merged / "config.json").read_text())
    d, layers, m = config["hidden_size"], config["num_hidden_layers"], config["num_experts"]
    kv = config["num_key_value_heads"] * (d // config["num_attention_heads"])
    shared = d + 3 * d * config["shared_expert_intermediate_size"]  # its gate, all-zero MLP
    router_and_zeros = (m * d + shared) + layers * (d + 2 * kv)  # router, shared, q/k/v biases
    assert written == round(params["formula"]) + router_and_zeros
    mlp = 3 * d * config["intermediate_size"]
    assert params["formula"] == pytest.approx(params["source"] * (
        1 + params["mlp_fraction"] * (1 / layers) * (m - 1)))
    assert round(params["formula"]) == params["source"] + (m - 1) * mlp


def test_experts_are_cluster_means_and_router_routes_to_them(merged, fixtures_dir):
    """With top-1 routing the MoE block computes the mean MLP of the chosen cluster."""
    import transformers

    report = json.loads((merged / "pacer_report.json").read_text())
    for peer in report["align"]["peers"].values():  # fine-tunes of one basin: nothing moves
        assert all(k["moved"] == 0 for k in peer["kinds"].values())
    clusters = report["pacer"]["decision"]["clusters"][str(BLOCK)]
    sources = [make_fixtures.file_state(fixtures_dir / "conflict" / f"m{k}") for k in (1, 2, 3)]
    prefix = f"model.layers.{BLOCK}.mlp."
    out = make_fixtures.file_state(merged)
    experts = {}
    for e in range(3):
        members = [k for k, c in enumerate(clusters) if c == e]
        experts[e] = {p: torch.stack([sources[k][prefix + p + ".weight"] for k in members]).mean(0)
                      for p in ("gate_proj", "up_proj", "down_proj")}
        for p, w in experts[e].items():
            assert torch.allclose(out[f"{prefix}experts.{e}.{p}.weight"], w, atol=1e-6)
    # three models, no samples: the data-free router, fitted by the calibration stage
    assert report["pacer"]["router"]["kind"] == "data_free"
    assert list(report["pacer"]["router"]["layers"]) == [str(BLOCK)]
    router = out[prefix + "gate.weight"]
    assert router.shape == (3, sources[0][prefix + "gate_proj.weight"].shape[1])
    assert torch.isfinite(router).all() and router.abs().sum() > 0

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, num_experts_per_tok=1)
    block = model.model.layers[BLOCK].mlp
    gen = torch.Generator().manual_seed(0)
    chosen = set()
    for _ in range(40):
        x = torch.randn(1, 1, router.shape[1], generator=gen)
        m = int((x.reshape(-1) @ out[prefix + "gate.weight"].T).argmax())
        chosen.add(m)
        w = experts[m]
        expected = (torch.nn.functional.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)) \
            @ w["down_proj"].T
        got = block(x)
        got = got[0] if isinstance(got, tuple) else got
        assert torch.allclose(got, expected, atol=1e-5)
    assert len(chosen) >= 2  # the router does route to different experts


def test_merge_stays_within_its_memory_budget(merged):
    report = json.loads((merged / "pacer_report.json").read_text())
    assert report["this_run"]["peak_rss_bytes"] <= BUDGET


@pytest.mark.slow
def test_budget_mode_caps_parameter_growth(tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, fixtures_dir, max_param_growth=1.05)
    assert run_budgeted(plan).returncode == 0
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())["pacer"]
    assert report["parameters"]["growth"] <= 1.05
    assert not report["decision"]["blocks"]  # one upcycled block costs ~+28%: over the cap

    plan = write_plan(tmp_path, fixtures_dir, out="cap", max_param_growth=1.3)
    assert run_budgeted(plan).returncode == 0
    report = json.loads((tmp_path / "cap" / "pacer_report.json").read_text())["pacer"]
    assert report["decision"]["mode"] == "max_param_growth"
    assert report["decision"]["blocks"] == [BLOCK]  # the most conflicting one, and only it fits
    assert 1.0 < report["parameters"]["growth"] <= 1.3


@pytest.mark.slow
def test_disabled_upcycling_keeps_the_source_architecture(tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, fixtures_dir, enable_moe_upcycle=False)
    assert run_budgeted(plan).returncode == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama"


def test_python_api_writes_the_same_files(merged, tmp_path, fixtures_dir, monkeypatch):
    from pacer_stream import PACERMerger

    monkeypatch.chdir(tmp_path)
    merger = PACERMerger([str(fixtures_dir / "conflict" / f"m{k}") for k in (1, 2, 3)],
                         max_memory=str(BUDGET))
    summary = merger.merge(interference_threshold=0.35, top_k_experts=2, output_path="api",
                           router="data_free",
                           shard_size="200KB")
    assert summary["exported_as"] == "qwen2_moe" and summary["upcycled_blocks"] == [BLOCK]
    ours = {k: v for k, v in digests(tmp_path / "api").items() if k != "README.md"}
    assert ours == {k: v for k, v in digests(merged).items() if k != "README.md"}


def test_analyze_reports_the_conflicting_block_as_the_highest_bar(tmp_path, fixtures_dir):
    from matplotlib import image

    plan = write_plan(tmp_path, fixtures_dir)
    output = tmp_path / "analysis.json"
    result = CliRunner().invoke(main, ["analyze", str(plan), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert f"block {BLOCK:>3}" in result.output and "<- upcycle" in result.output
    report = json.loads(output.read_text())
    values = {b["layer"]: b["mlp"]["interference"] for b in report["blocks"]}
    assert max(values, key=values.get) == BLOCK
    assert report["decision"]["blocks"] == [BLOCK]
    pixels = image.imread(str(tmp_path / "analysis.png"))[..., :3]

    def column_heights(hex_color: str) -> torch.Tensor:
        rgb = torch.tensor([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        match = (torch.from_numpy(pixels.copy()) - rgb).abs().amax(-1) < 0.02
        return match.sum(0)

    red, blue = column_heights("#d62728"), column_heights("#1f77b4")
    assert red.max() > 0 and red.max() > blue.max()  # the tallest bar is the red (upcycled) one

    models = CliRunner().invoke(main, ["analyze", "--models",
                                       *[str(fixtures_dir / "conflict" / f"m{k}") for k in (1, 2)],
                                       "--output", str(tmp_path / "two.json"), "--quiet"])
    assert models.exit_code == 0, models.output
    assert len(json.loads((tmp_path / "two.json").read_text())["model_similarity"]) == 2


def test_analyze_refuses_bad_arguments(tmp_path, fixtures_dir):
    one = CliRunner().invoke(main, ["analyze", "--models", str(fixtures_dir / "conflict" / "m1")])
    assert one.exit_code == 2 and "at least two models" in one.output
    plan = write_plan(tmp_path, fixtures_dir)
    bad = CliRunner().invoke(main, ["analyze", str(plan), "--output", str(tmp_path / "x.txt")])
    assert bad.exit_code == 2 and "ending in .json" in bad.output


def test_bad_upcycling_options_are_refused(tmp_path, fixtures_dir):
    for options, words in (({"max_experts": 1}, "max_experts"),
                           ({"upcycle_fraction": 1.5}, "upcycle_fraction"),
                           ({"expert_distance": -0.1}, "expert_distance"),
                           ({"upcycle_fraction": 0.5, "max_param_growth": 1.3}, "not both")):
        plan = write_plan(tmp_path, fixtures_dir, **options)
        result = CliRunner().invoke(main, ["run", str(plan)])
        assert result.exit_code == 2 and words in result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family, exported", [("qwen2", "Qwen2MoeForCausalLM"),
                                              ("qwen3", "Qwen3MoeForCausalLM"),
                                              ("mistral", "Qwen2MoeForCausalLM"),
                                              ("vit", "ViTMoeForImageClassification"),
                                              ("bert", None)])
def test_every_family_upcycles_or_says_why_not(family, exported, tmp_path, fixtures_dir):
    """γ = 0 upcycles every block whose models differ at all: each decoder family exports
    its MoE class and loads cleanly; encoders are merged dense with the reason recorded."""
    import transformers

    models = ", ".join(str(fixtures_dir / family / m) for m in ("ft1", "ft2", "ft3"))
    plan = tmp_path / "plan.yaml"
    tome = ", tome_r: 2" if family == "vit" else ""  # ViT-MoE: token merging at inference
    plan.write_text(f"models: [{models}]\nmethod: pacer\n"
                    f"pacer: {{interference_threshold: 0.0, router: data_free{tome}}}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    proc = run_budgeted(plan)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())["pacer"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert report["decision"]["blocks"] == [0, 1]
    if exported is None:
        assert report["exported_as"] == "dense" and config["model_type"] == family
        assert "not supported" in report["decision"]["note"]
        return
    assert config["architectures"] == [exported]
    if family == "vit":  # no stock ViT-MoE: the modeling code travels with the checkpoint
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            tmp_path / "out", output_loading_info=True, trust_remote_code=True)
        assert config["tome_r"] == 2 and config["moe_layers"] == [0, 1]
        pixels = torch.randn(1, 3, 32, 32)
        logits = model(pixel_values=pixels).logits
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert [h.shape[1] for h in hidden] == [17, 15, 13]  # 16 patches + CLS, 2 merged/block
    else:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "out", output_loading_info=True)
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert type(model).__name__ == exported
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(logits).all()
    written = sum(t.numel() for t in make_fixtures.file_state(tmp_path / "out").values())
    assert report["parameters"]["output"] == written


def test_vit_moe_deviation_norm_router(tmp_path, fixtures_dir):
    """The seed's per-input router R_m(x) = ||Delta_m x|| (custom-code runtime only)."""
    import transformers

    models = ", ".join(str(fixtures_dir / "vit" / m) for m in ("ft1", "ft2", "ft3"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{models}]\nmethod: pacer\npacer: {{interference_threshold: 0.0, "
                    "router_mode: deviation_norm, router_temperature: 0.5, top_k_experts: 1}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    proc = run_budgeted(plan)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())["pacer"]
    model = transformers.AutoModelForImageClassification.from_pretrained(
        tmp_path / "out", trust_remote_code=True)
    moe = model.vit.encoder.layer[0].moe
    labels = report["decision"]["clusters"]["0"]
    sizes = torch.tensor([labels.count(e) for e in range(3)], dtype=torch.float32)
    fc1 = torch.stack([e.fc1.weight.detach() for e in moe.experts])
    consensus = (sizes[:, None, None] * fc1).sum(0) / sizes.sum()
    x = torch.randn(32, fc1.shape[2], generator=torch.Generator().manual_seed(0))
    scores = torch.stack([(x @ (w - consensus).T).norm(dim=-1) for w in fc1], dim=-1)
    with torch.no_grad():
        weights, chosen = moe.route(x)
        logits = moe.logits(x)
    assert torch.allclose(logits, scores / 0.5, rtol=1e-5)
    assert torch.equal(chosen[:, 0], scores.argmax(-1))
    assert torch.all(weights == 1.0)
    assert torch.isfinite(model(pixel_values=torch.randn(1, 3, 32, 32)).logits).all()


def test_deviation_norm_router_is_refused_for_stock_moe_exports(tmp_path, fixtures_dir):
    plan = write_plan(tmp_path, fixtures_dir, router_mode="deviation_norm")
    proc = run_budgeted(plan)
    assert proc.returncode == 2 and "router_mode" in proc.stderr and "ViT-MoE" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_llamacpp_target_gives_the_default_layouts_logits(merged, tmp_path, fixtures_dir):
    """output.target llama.cpp: the same merge as a mixtral checkpoint whose every block
    is a MoE block; plan states the cost up front, the report counts it, and transformers
    computes the default layout's logits from it."""
    import transformers

    plan = write_plan(tmp_path, fixtures_dir)
    plan.write_text(plan.read_text().replace("shard_size: 200KB}",
                                             "shard_size: 200KB, target: llama.cpp}"))
    shown = CliRunner().invoke(main, ["plan", str(plan)])
    assert shown.exit_code == 0 and "output target: llama.cpp - mixtral" in shown.output
    proc = run_budgeted(plan)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 3
    target = json.loads((tmp_path / "out" / "pacer_report.json").read_text())["pacer"]["target"]
    assert target["name"] == "llama.cpp" and target["model_type"] == "mixtral"
    assert target["parameters"] > target["default_parameters"]
    assert target["active_parameters"] > target["default_active_parameters"]
    ids = torch.tensor([[1, 5, 9, 200, 3, 7, 7, 42]])
    logits = []
    for folder in (merged, tmp_path / "out"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-6)


def test_llamacpp_target_refuses_a_vit_before_any_work(tmp_path, fixtures_dir):
    models = ", ".join(str(fixtures_dir / "vit" / m) for m in ("ft1", "ft2"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{models}]\nmethod: pacer\npacer: {{router: data_free}}\n"
                    f"output: {{path: {tmp_path / 'out'}, target: llama.cpp}}\n")
    for command in ("plan", "run"):
        result = CliRunner().invoke(main, [command, str(plan), "--quiet"][:3 if command == "run"
                                                                           else 2])
        assert result.exit_code == 2, result.output
        assert "no llama.cpp MoE layout for vit" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_python_api_restart_and_force(tmp_path, fixtures_dir):
    """The API's errors advise its own arguments, and restart/force do what the CLI's
    --restart/--force do: force overwrites a folder holding something else, restart
    discards a finished merge of another plan."""
    from pacer_stream import PACERMerger
    from pacer_stream.errors import PacerError

    merger = PACERMerger([str(fixtures_dir / "llama" / m) for m in ("ft1", "ft2")])
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PacerError, match=r"pass force=True") as err:
        merger.merge(out, enable_moe_upcycle=False)
    assert "--force" not in str(err.value) and (out / "notes.txt").read_text() == "mine"
    assert merger.merge(out, enable_moe_upcycle=False, force=True)["exported_as"] == "dense"
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    with pytest.raises(PacerError, match=r"re-run with restart=True"):
        merger.merge(out, enable_moe_upcycle=False, interference_threshold=0.2)
    assert merger.merge(out, enable_moe_upcycle=False, interference_threshold=0.2,
                        restart=True)["exported_as"] == "dense"


def test_version_and_short_help():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"pacer-stream {__version__}"
    shown = CliRunner().invoke(main, ["-h"])  # click names the program after its caller
    assert shown.exit_code == 0 and "Stream-merge N fine-tuned checkpoints" in shown.output
