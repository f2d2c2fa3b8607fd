"""`pacer-stream run`: every dense method against an independent in-memory reference,
slicing invariance, loadability, and mergekit's documented semantics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pacer_stream import accounting as acct
from pacer_stream.cli import main
from pacer_stream.methods.sparsify import dare_keep

MODELS = ["ft1", "ft2", "ft3"]
WEIGHTS = [0.5, 0.3, 0.2]


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def write_plan(tmp: Path, fixtures: Path, family: str, method: str, base: bool,
               extra: str = "", out: str = "out") -> Path:
    plan = tmp / f"{method}-{family}-{base}-{out}.yaml"
    models = "".join(f"  - {{model: {fixtures / family / m}, weight: {w}}}\n"
                     for m, w in zip(MODELS, WEIGHTS))
    text = f"models:\n{models}method: {method}\noutput: {{path: {tmp / out}, shard_size: 150KB}}\n"
    if base:
        text += f"base_model: {fixtures / family / 'anchor'}\n"
    plan.write_text(text + extra)
    return plan


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(main, ["run", *args, "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)


# -- independent references (plain formulas over whole tensors) ------------------


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k largest |delta|, ties by lowest flat index (stable sort)."""
    flat = delta.abs().reshape(-1)
    k = flat.numel() if density >= 1 else max(1, int(density * flat.numel()))
    order = torch.sort(-flat, stable=True).indices[:k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return mask.reshape(delta.shape)


def reference(method: str, xs: list[torch.Tensor], base: torch.Tensor | None, name: str,
              density: float = 0.5, lam: float = 1.0, seed: int = 0) -> torch.Tensor:
    w = torch.tensor(WEIGHTS).reshape(-1, *[1] * xs[0].dim())
    x = torch.stack([t.float() for t in xs])
    if method == "linear":
        return (w * x).sum(0) / w.sum()
    elects = method in ("ties", "dare_ties")
    if base is not None:
        b = base.float()
    elif elects:  # base-free election: the element-wise median is the pseudo-base
        ranked = x.sort(0).values
        n = len(xs)
        b = ranked[n // 2] if n % 2 else (ranked[n // 2 - 1] + ranked[n // 2]) / 2
    else:
        b = x.mean(0)
    d = x - b
    if method == "ties":
        d = torch.stack([dk * topk_mask(dk, density) for dk in d])
    if method.startswith("dare"):
        shape = tuple(xs[0].shape) or (1,)
        masks = [dare_keep(shape, (0, shape[0]), density, seed, name, k).reshape(d[k].shape)
                 for k in range(len(xs))]
        d = torch.stack([dk * m / density for dk, m in zip(d, masks)])
    wd = w * d
    if method in ("ties", "dare_ties"):
        if base is not None:  # mergekit: the sign of the sum, a zero sum counts as +
            majority = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        else:  # base-free: a vote by count; a tie keeps the pseudo-base
            majority = torch.sign(torch.sign(wd).sum(0))
        keep = torch.sign(wd) == majority
        mixed = (wd * keep).sum(0)
        divisor = (w * keep).sum(0)
        divisor[divisor == 0] = 1
        if method == "ties":  # normalize by default only for ties
            mixed = mixed / divisor
    else:
        mixed = wd.sum(0)
    return b + lam * mixed


@pytest.mark.parametrize("method, base, family", [
    ("linear", False, "qwen2"),
    ("task_arithmetic", True, "qwen2"),
    ("ties", True, "qwen2"),
    ("ties", False, "llama"),
    ("dare_linear", True, "qwen2"),
    ("dare_ties", False, "qwen3"),
    ("ties", True, "bert"),
])
def test_method_matches_reference(method, base, family, fixtures_dir, tmp_path):
    params = {"linear": "", "task_arithmetic": "parameters: {lambda: 0.9}\n"}.get(
        method, "parameters: {density: 0.5, lambda: 0.9}\n")
    run_cli(str(write_plan(tmp_path, fixtures_dir, family, method, base, params)))
    merged = load_all(tmp_path / "out")
    inputs = [load_all(fixtures_dir / family / m) for m in MODELS]
    anchor = load_all(fixtures_dir / family / "anchor") if base else None
    assert set(merged) == set(inputs[0])
    for name, value in merged.items():
        if not value.is_floating_point():
            assert torch.equal(value, inputs[0][name])
            continue
        lam = 0.9 if method != "linear" else 1.0
        expected = reference(method, [m[name] for m in inputs], anchor[name] if anchor else None,
                             name, lam=lam)
        assert value.dtype == inputs[0][name].dtype
        assert torch.allclose(value.float(), expected, atol=1e-6, rtol=1e-6), name


def test_bf16_output_within_one_ulp(fixtures_dir, tmp_path):
    """mistral fixtures are bf16: the merge rounds once, from fp32."""
    run_cli(str(write_plan(tmp_path, fixtures_dir, "mistral", "ties", True,
                           "parameters: {density: 0.5, lambda: 0.9}\n")))
    merged = load_all(tmp_path / "out")
    inputs = [load_all(fixtures_dir / "mistral" / m) for m in MODELS]
    anchor = load_all(fixtures_dir / "mistral" / "anchor")
    for name, value in merged.items():
        expected = reference("ties", [m[name] for m in inputs], anchor[name], name, lam=0.9)
        assert value.dtype == torch.bfloat16
        ulp = (expected.to(torch.bfloat16).float().abs() * 2.0 ** -7).clamp_min(1e-30)
        assert ((value.float() - expected).abs() <= ulp).all(), name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])
def test_slicing_does_not_change_a_single_byte(method, fixtures_dir, tmp_path):
    # dare_ties with mergekit's L1 rescaling: its norms are whole-tensor sums (gram.BlockSum)
    extra = {"linear": "", "dare_ties": "parameters: {density: 0.4, rescale: l1}\n"}.get(
        method, "parameters: {density: 0.4}\n")
    whole = write_plan(tmp_path, fixtures_dir, "llama", method, method != "linear", extra, "whole")
    sliced = write_plan(tmp_path, fixtures_dir, "llama", method, method != "linear", extra, "sliced")
    run_cli(str(whole))
    # a budget that leaves ~40 KB for merging forces every large tensor into row slices
    tiny = int((acct.PROCESS_BASE_BYTES + 40_000) / acct.HEADROOM) + 1
    run_cli(str(sliced), "--max-memory", str(tiny))
    report = json.loads((tmp_path / "sliced" / "pacer_report.json").read_text())
    assert report["budget_bytes"] == tiny
    planned = CliRunner().invoke(main, ["plan", str(sliced), "--json", "--max-memory", str(tiny)])
    assert sum(len(u["sliced"]) for u in json.loads(planned.stdout)["units"]) >= 10
    for file in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "sliced" / file.name).read_bytes(), file.name


def test_output_loads_with_transformers_and_runs(fixtures_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_cli(str(write_plan(tmp_path, fixtures_dir, "llama", "ties", True,
                           "parameters: {density: 0.5}\n")))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()
    bert = write_plan(tmp_path, fixtures_dir, "bert", "linear", False, out="bert")
    run_cli(str(bert))
    encoder = transformers.AutoModel.from_pretrained(tmp_path / "bert").eval()
    with torch.no_grad():
        assert torch.isfinite(encoder(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state).all()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ties" in card and "ft1" in card and "pacer-stream" in card


def _two_model_plan(tmp_path, deltas, weights, method="ties"):
    """Models whose task vectors are given per element, to pin down TIES semantics."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    src = Path(__file__).resolve().parents[1] / "fixtures" / "qwen2" / "anchor"
    shutil.copytree(src, base)
    anchor = load_all(base)
    name = "model.norm.weight"
    folders = []
    for k, (delta, w) in enumerate(zip(deltas, weights)):
        state = dict(anchor)
        bumped = anchor[name].clone()
        bumped[: len(delta)] += torch.tensor(delta)
        state[name] = bumped
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", folder)
        folders.append((folder, w))
    plan = tmp_path / "p.yaml"
    plan.write_text("models:\n" + "".join(f"  - {{model: {f}, weight: {w}}}\n" for f, w in folders)
                    + f"base_model: {base}\nmethod: {method}\noutput: {{path: {tmp_path / 'o'}}}\n")
    run_cli(str(plan))
    return (load_all(tmp_path / "o")[name][: len(deltas[0])] - anchor[name][: len(deltas[0])]).tolist()


def test_ties_sign_election_semantics(fixtures_dir, tmp_path):
    """mergekit's rules (DESIGN.md): weights apply before the election, a zero sum counts
    as +, and the mean divides by the weights of the agreeing models."""
    got = _two_model_plan(tmp_path, [[1.0, 1.0, 2.0], [-1.0, -2.0, -1.0]], [1.0, 1.0])
    assert got == pytest.approx([1.0, -2.0, 2.0])  # tie -> +; -2 wins; +2 wins
    got = _two_model_plan(tmp_path / "w", [[1.0], [-2.0]], [3.0, 1.0])
    assert got == pytest.approx([1.0])  # 3*1 outweighs 1*(-2): elected +, mean of kept = 1


def test_dare_mask_is_deterministic_and_slice_invariant():
    shape = (300, 7000)  # > one seed block, so slices cross block boundaries
    whole = dare_keep(shape, (0, 300), 0.3, 5, "t", 1)
    parts = torch.cat([dare_keep(shape, (a, min(a + 37, 300)), 0.3, 5, "t", 1)
                       for a in range(0, 300, 37)])
    assert torch.equal(whole, parts)
    assert abs(whole.float().mean().item() - 0.3) < 0.01
    assert not torch.equal(whole, dare_keep(shape, (0, 300), 0.3, 5, "t", 2))  # per model
    assert not torch.equal(whole, dare_keep(shape, (0, 300), 0.3, 6, "t", 1))  # per seed


def test_mergekit_parity_when_installed():
    """Where mergekit is importable, its sparsify/get_mask agree with ours element for element."""
    mk = pytest.importorskip("mergekit.sparsify")
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    from pacer_stream.methods.sparsify import MagnitudeSelect, magnitude_bits

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 33, generator=gen)
    select = MagnitudeSelect(delta.numel(), 0.3)
    select.observe_high(magnitude_bits(delta))
    select.observe_low(magnitude_bits(delta))
    mask = select.mask(magnitude_bits(delta)).reshape(delta.shape)
    assert torch.equal(delta * mask, mk.magnitude(delta, 0.3))
    stack = torch.randn(3, 50, generator=gen)
    mask = gta.get_mask(stack, method="sum")
    majority = stack.sum(0) >= 0
    ours = ((stack > 0) == majority) & (stack != 0)
    assert torch.equal(mask, ours)


def test_select_finds_the_bin_of_the_kth_largest():
    """sparsify._select: the bin b holding the k-th largest element (counts in bins >= b
    reach k, in bins > b do not) and k's rank inside it, on sparse random histograms and
    the edge ranks (0, 1, all)."""
    from pacer_stream.methods.sparsify import HIST_BINS, _select

    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        hist = torch.zeros(HIST_BINS, dtype=torch.int64)
        filled = torch.randint(0, HIST_BINS, (int(torch.randint(1, 40, (1,), generator=gen)),),
                               generator=gen)
        hist[filled] = torch.randint(1, 100, (len(filled),), generator=gen)
        total = int(hist.sum())
        for k in (1, total, total // 2 + 1, int(torch.randint(1, total + 1, (1,), generator=gen))):
            b, rank = _select(hist, k)
            above = int(hist[b + 1:].sum())
            assert above < k <= above + int(hist[b]), (k, b)
            assert rank == k - above
    assert _select(torch.zeros(HIST_BINS, dtype=torch.int64), 0) == (HIST_BINS - 1, 0)


@pytest.mark.parametrize("case", ["random", "bf16-ties", "zeros", "nonfinite", "nan-heavy"])
@pytest.mark.parametrize("slices", [1, 3])
def test_prune_is_the_keep_mask_bit_for_bit(case, slices):
    """MagnitudeSelect.prune_ (hardshrink, then the ties put back) zeroes exactly what the
    bit-pattern keep-mask drops, to the bit (the sign of zero included), whole or sliced,
    with many ties at the threshold (bf16 task vectors), zeros of both signs, inf and NaN."""
    from pacer_stream.methods.sparsify import MagnitudeSelect, magnitude_bits

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6000, generator=gen) * 0.01
    if case == "bf16-ties":  # few distinct magnitudes: many elements equal the threshold
        x = x.to(torch.bfloat16).float()
    elif case == "zeros":
        x[::3], x[1::3] = 0.0, -0.0
    elif case == "nonfinite":
        x[5], x[50], x[500] = float("nan"), float("inf"), -float("inf")
    elif case == "nan-heavy":  # the k-th largest magnitude is itself a NaN
        x[:4000] = float("nan")
    for density in (0.5, 0.013, 1.0):
        old, new = MagnitudeSelect(x.numel(), density), MagnitudeSelect(x.numel(), density)
        parts = list(x.tensor_split(slices))
        for select in (old, new):
            for part in parts:
                select.observe_high(magnitude_bits(part))
            for part in parts:
                select.observe_low(magnitude_bits(part))
        want = torch.cat([p.masked_fill(~old.mask(magnitude_bits(p)), 0) for p in parts])
        got = []
        for p in parts:
            p = p.clone()
            new.prune_(p, magnitude_bits(p))
            got.append(p)
        got = torch.cat(got)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (case, density)
