"""The merge methods mergekit users use beyond task arithmetic / TIES / DARE: slerp,
model_stock, della, della_linear, breadcrumbs, breadcrumbs_ties, nuslerp, multislerp,
karcher, passthrough.

Each against an independent reference written here from its formula (fp64, whole
tensors, mergekit 0.1.5's semantics), sliced and unsliced runs byte for byte, hand-worked
small cases of the tricky formulas, and a bad plan per refusal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pacer_stream import accounting as acct
from pacer_stream.cli import main
from pacer_stream.methods.dense import MethodParams
from pacer_stream.methods.registry import tensor_merge
from pacer_stream.methods.sparsify import uniform_draws

FAMILY = "llama"  # tiny fp32 fixtures: anchor (the base) and ft1..ft3


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def run(plan: Path, *args: str) -> None:
    result = CliRunner().invoke(main, ["run", str(plan), "--quiet", *args])
    assert result.exit_code == 0, (result.output, result.exception)


def write(tmp: Path, fixtures: Path, method: str, models: list[str], base: str | None,
          body: str = "", out: str = "out") -> Path:
    entries = "".join(f"  - {m if m.startswith('{') else '{model: ' + m + '}'}\n"
                      .replace("@", str(fixtures / FAMILY) + "/") for m in models)
    text = f"method: {method}\nmodels:\n{entries}output: {{path: {tmp / out}}}\n"
    if base:
        text += f"base_model: {fixtures / FAMILY / base}\n"
    plan = tmp / f"{method}-{out}.yaml"
    plan.write_text(text + body)
    return plan


# -- independent references (plain formulas, fp64, whole tensors) -------------------


def slerp_ref(t: float, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a, c = b.double().flatten(), x.double().flatten()
    na = a.norm() if a.norm() > 1e-8 else 1.0
    nc = c.norm() if c.norm() > 1e-8 else 1.0
    dot = float(torch.clamp((a / na) @ (c / nc), -1, 1))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * c).reshape(b.shape)
    th = math.acos(dot)
    return ((math.sin((1 - t) * th) * a + math.sin(t * th) * c) / math.sin(th)).reshape(b.shape)


def model_stock_ref(base: torch.Tensor, xs: list[torch.Tensor], filter_wise: bool
                    ) -> torch.Tensor:
    b = base.double()
    ds = [x.double() - b for x in xs]
    if filter_wise:
        ds = [d.reshape(-1, d.shape[-1]) for d in ds]
    else:
        ds = [d.reshape(1, -1) for d in ds]
    n = len(xs)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            num = (ds[i] * ds[j]).sum(-1)
            cos.append((num / (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp_min(1e-6))
                       .clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    t = n * c / (1 + (n - 1) * c)
    t = t.reshape(-1, *[1] * (b.dim() - 1)) if filter_wise and b.dim() > 1 else t.reshape(())
    return b + t * sum(x.double() - b for x in xs) / n


def nuslerp_ref(w: tuple[float, float], x0, x1, base, flatten: bool, row_wise: bool):
    t = w[1] / (w[0] + w[1])
    b = base.double() if base is not None else 0.0
    v0, v1 = x0.double() - b, x1.double() - b
    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:  # vectors along the first axis
        v0, v1 = v0.reshape(v0.shape[0], -1).T, v1.reshape(v1.shape[0], -1).T
    else:
        v0, v1 = v0.reshape(-1, v0.shape[-1]), v1.reshape(-1, v1.shape[-1])
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    th = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    out = (torch.sin((1 - t) * th) * v0 + torch.sin(t * th) * v1) / torch.sin(th)
    if row_wise and not flatten:
        out = out.T
    return out.reshape(x0.shape) + b


def multislerp_ref(w: list[float], xs, base, eps: float = 1e-8):
    """mergekit's steps as written: mean on the sphere, tangent space, exponential map."""
    b = base.double() if base is not None else 0.0
    v = torch.stack([(x.double() - b).flatten() for x in xs])
    wt = torch.tensor(w, dtype=torch.float64)
    wt = wt / wt.sum()
    norms = v.norm(dim=-1, keepdim=True)
    u = v / (norms + eps)
    mean = (u * wt[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = u - (u @ mean)[:, None] * mean
    tangent = (tangents * wt[:, None]).sum(0)
    tn = tangent.norm() + eps
    out = mean * torch.cos(tn) + tangent * torch.sin(tn) / tn
    return (out * (norms.squeeze(-1) * wt).sum()).reshape(xs[0].shape) + b


def karcher_ref(xs, max_iter: int = 10, tol: float = 1e-5):
    """Riemannian gradient descent for the Fréchet mean on the sphere, on the vectors."""
    norms = [x.double().norm() for x in xs]
    units = [x.double().flatten() / n for x, n in zip(xs, norms)]
    a = 1 / len(xs)
    mu = sum(a * u for u in units)
    mu = mu / mu.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for u in units:
            dot = torch.clamp(mu @ u, -1, 1)
            th = torch.arccos(dot)
            if th < tol:
                continue
            tangent += a * th / torch.sin(th) * (u - dot * mu)
        tn = tangent.norm()
        if tn < tol:
            break
        mu = torch.cos(tn) * mu + torch.sin(tn) * tangent / tn
        mu = mu / mu.norm()
    return (sum(norms) / len(xs) * mu).reshape(xs[0].shape)


def band_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: rank by magnitude (largest first, ties by index); drop the n_bot
    smallest and keep the next int(density * n)."""
    n = d.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(-d.abs().flatten(), stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n - n_bot - target:n - n_bot]] = True
    return keep.reshape(d.shape)


def della_mask(d: torch.Tensor, density: float, eps: float, name: str, k: int):
    """Keep probability by magnitude rank within each row (a vector is one row)."""
    m = d.abs().reshape(1, -1) if d.dim() < 2 else d.abs()
    ranks = torch.argsort(torch.argsort(m, dim=1, stable=True), dim=1).double()
    p = (density - eps) + 2 * eps * ranks / (m.shape[1] - 1)
    shape = tuple(d.shape)
    draws = uniform_draws(shape, (0, shape[0]), 0, name, k).double()
    return (draws < p.reshape(shape)).reshape(shape)


def task_vector_ref(method: str, name: str, base, xs, density: float, extra: float):
    b = base.double()
    ds = []
    for k, x in enumerate(xs):
        d = x.double() - b
        if method.startswith("della"):
            kept = d * della_mask(x.float() - base.float(), density, extra, name, k)
            before, after = d.abs().sum(), kept.abs().sum()
            d = kept * (before / after) if before > 1e-7 and after > 1e-7 else kept
        else:
            d = d * band_mask(x.float() - base.float(), density, extra)
        ds.append(d)
    d = torch.stack(ds)
    if method in ("della", "breadcrumbs_ties"):
        majority = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        keep = torch.sign(d) == majority
        mixed = (d * keep).sum(0)
        if method == "della":  # normalize by the kept weights, by default
            divisor = keep.double().sum(0)
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        return b + mixed
    return b + d.sum(0)


# -- every method on every tensor of a tiny merge, whole and sliced --------------------

THREE = ["@ft1", "@ft2", "@ft3"]
CASES = {  # id: (method, models, base, plan body, reference(name, base, xs))
    "slerp-base-listed": ("slerp", ["@anchor", "@ft1"], "anchor", "parameters: {t: 0.3}\n",
                          lambda n, b, xs: slerp_ref(0.3, b, xs[1])),
    "slerp-base-apart": ("slerp", ["@ft2"], "anchor", "parameters: {t: 0.7}\n",
                         lambda n, b, xs: slerp_ref(0.7, b, xs[0])),
    "model_stock": ("model_stock", THREE, "anchor", "",
                    lambda n, b, xs: model_stock_ref(b, xs, False)),
    "model_stock-filter_wise": ("model_stock", THREE, "anchor",
                                "parameters: {filter_wise: true}\n",
                                lambda n, b, xs: model_stock_ref(b, xs, True)),
    "della": ("della", THREE, "anchor", "parameters: {density: 0.5, epsilon: 0.2}\n",
              lambda n, b, xs: task_vector_ref("della", n, b, xs, 0.5, 0.2)),
    "della_linear": ("della_linear", THREE, "anchor", "parameters: {density: 0.4}\n",
                     lambda n, b, xs: task_vector_ref("della_linear", n, b, xs, 0.4, 0.15)),
    "breadcrumbs": ("breadcrumbs", THREE, "anchor", "parameters: {density: 0.5, gamma: 0.1}\n",
                    lambda n, b, xs: task_vector_ref("breadcrumbs", n, b, xs, 0.5, 0.1)),
    "breadcrumbs_ties": ("breadcrumbs_ties", THREE, "anchor",
                         "parameters: {density: 0.3, gamma: 0.05}\n",
                         lambda n, b, xs: task_vector_ref("breadcrumbs_ties", n, b, xs, 0.3,
                                                          0.05)),
    "nuslerp": ("nuslerp", ["{model: @ft1, weight: 0.3}", "{model: @ft2, weight: 0.9}"],
                "anchor", "", lambda n, b, xs: nuslerp_ref((0.3, 0.9), *xs, b, True, False)),
    "nuslerp-rows": ("nuslerp", ["@ft1", "@ft3"], None, "parameters: {nuslerp_flatten: false}\n",
                     lambda n, b, xs: nuslerp_ref((1, 1), *xs, None, False, False)),
    "nuslerp-columns": ("nuslerp", ["{model: @ft1, weight: 2}", "@ft2"], "anchor",
                        "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
                        lambda n, b, xs: nuslerp_ref((2, 1), *xs, b, False, True)),
    "multislerp": ("multislerp", ["{model: @ft1, weight: 0.5}", "@ft2", "@ft3"], "anchor", "",
                   lambda n, b, xs: multislerp_ref([0.5, 1, 1], xs, b)),
    "karcher": ("karcher", THREE, None, "", lambda n, b, xs: karcher_ref(xs)),
    "passthrough": ("passthrough", ["{model: @ft2, scale: 0.5}"], None, "",
                    lambda n, b, xs: xs[0].double() * 0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_reference_at_any_budget(case, fixtures_dir, tmp_path, monkeypatch):
    method, models, base, body, ref = CASES[case]
    whole = write(tmp_path, fixtures_dir, method, models, base, body, "whole")
    sliced = write(tmp_path, fixtures_dir, method, models, base, body, "sliced")
    chunked = write(tmp_path, fixtures_dir, method, models, base, body, "chunked")
    run(whole)
    with monkeypatch.context() as patch:  # read whole, computed a row or a few at a time
        patch.setattr(acct, "COMPUTE_CHUNK_ELEMS", 100)
        run(chunked)
    # ~16 KB left for merging: every large tensor goes through in row slices
    tiny = str(int((acct.PROCESS_BASE_BYTES + 16_000) / acct.HEADROOM) + 1)
    run(sliced, "--max-memory", tiny)
    planned = CliRunner().invoke(main, ["plan", str(sliced), "--json", "--max-memory", tiny])
    assert sum(len(u["sliced"]) for u in json.loads(planned.stdout)["units"]) >= 10
    for file in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "sliced" / file.name).read_bytes(), file.name
        assert file.read_bytes() == (tmp_path / "chunked" / file.name).read_bytes(), file.name
    merged = load_all(tmp_path / "whole")
    names = [m.split("@")[1].split("}")[0].split(",")[0] for m in models]
    xs = [load_all(fixtures_dir / FAMILY / m) for m in names]
    b = load_all(fixtures_dir / FAMILY / base) if base else None
    assert set(merged) == set(xs[0])
    for name, value in merged.items():
        expected = ref(name, b[name] if b else None, [x[name] for x in xs])
        assert value.dtype == torch.float32
        assert torch.allclose(value.double(), expected, atol=2e-6, rtol=1e-5), (name, (
            value.double() - expected).abs().max())


# -- hand-worked small cases ------------------------------------------------------------


def merge_whole(method: str, xs: list[list[float]], base: list[float] | None = None,
                parameters: dict | None = None, base_index: int | None = None,
                weights: list[float] | None = None) -> torch.Tensor:
    """One tensor through the method's protocol, whole (as the executor drives it)."""
    x = torch.tensor(xs, dtype=torch.float32)
    models = [{"weight": w} for w in (weights or [1.0] * len(xs))]
    params = MethodParams.resolve(method, models, parameters or {}, 0)
    merge = tensor_merge("w", tuple(x.shape[1:]), params, None, base_index)
    b = torch.tensor(base, dtype=torch.float32) if base is not None else None
    offset, v = merge.split(x, b)
    for pass_name in merge.passes:  # one slice: every pass sees the same split
        merge.observe(pass_name, (0, x.shape[1]), v)
    return merge.merge((0, x.shape[1]), offset, v)


def coarse_family(fixtures: Path, tmp: Path) -> Path:
    """The fixture family on a grid of 1/2048 (exact in fp32): the fine-tunes' task vectors
    take a few magnitudes, so TIES' k-th value is shared by many entries, and the ties kept
    at the threshold cross chunk and slice cuts."""
    import shutil

    from safetensors.torch import save_file

    root = tmp / "coarse"
    grid = lambda v: (v * 2048).round() / 2048  # noqa: E731
    anchor = load_all(fixtures / FAMILY / "anchor")
    for model in ("anchor", "ft1", "ft2", "ft3"):
        shutil.copytree(fixtures / FAMILY / model, root / model)
        for file in (root / model).glob("*.safetensors"):
            tensors = {k: grid(anchor[k]) + grid(v - anchor[k]) if v.is_floating_point() else v
                       for k, v in load_file(str(file)).items()}
            save_file(tensors, str(file), metadata={"format": "pt"})
    return root


@pytest.mark.slow  # twelve runs; the quick subset keeps test_method_matches_reference_*
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_dense_methods_give_the_same_bytes_whole_chunked_and_sliced(method, fixtures_dir,
                                                                   tmp_path, monkeypatch):
    """The executor reads a tensor whole or in budget slices and computes on row chunks of
    what it read: neither cut may change a byte (TIES' ties at the threshold, DARE's seeded
    row blocks and the election all cross chunk boundaries here)."""
    family = coarse_family(fixtures_dir, tmp_path)
    body = "parameters: {density: 0.4}\n" if method in ("ties", "dare_ties") else ""
    if method != "linear":
        body += f"base_model: {family / 'anchor'}\n"
    plans = {}
    for out in ("whole", "chunked", "sliced"):
        models = "".join(f"  - {{model: {family / m}}}\n" for m in ("ft1", "ft2", "ft3"))
        plans[out] = tmp_path / f"{out}.yaml"
        plans[out].write_text(f"method: {method}\nmodels:\n{models}"
                              f"output: {{path: {tmp_path / out}}}\n{body}")
    run(plans["whole"])
    with monkeypatch.context() as patch:
        patch.setattr(acct, "COMPUTE_CHUNK_ELEMS", 100)
        run(plans["chunked"])
    run(plans["sliced"], "--max-memory",
        str(int((acct.PROCESS_BASE_BYTES + 16_000) / acct.HEADROOM) + 1))
    files = sorted((tmp_path / "whole").glob("*.safetensors"))
    assert files
    for file in files:
        for other in ("chunked", "sliced"):
            assert file.read_bytes() == (tmp_path / other / file.name).read_bytes(), file.name


def test_slerp_by_hand():
    # orthogonal, t = 0.5: theta = pi/2, both coefficients sin(pi/4)
    out = merge_whole("slerp", [[0, 2]], [1, 0], {"t": 0.5})
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]))
    # t = 0 gives the base, t = 1 the other model, the base listed first or second
    assert torch.equal(merge_whole("slerp", [[1, 0], [0, 2]], [1, 0], {"t": 0.0}, 0),
                       torch.tensor([1.0, 0.0]))
    assert torch.allclose(merge_whole("slerp", [[0, 2], [1, 0]], [1, 0], {"t": 1.0}, 1),
                          torch.tensor([0.0, 2.0]))
    # nearly parallel (cos = 0.99995 > 0.9995): linear interpolation of the raw tensors
    out = merge_whole("slerp", [[2, 0.02]], [1, 0], {"t": 0.25})
    assert torch.allclose(out, torch.tensor([0.75 * 1 + 0.25 * 2, 0.25 * 0.02]), atol=0)
    # antiparallel: linear too (|cos| = 1)
    out = merge_whole("slerp", [[-3, 0]], [1, 0], {"t": 0.5})
    assert torch.allclose(out, torch.tensor([-1.0, 0.0]))


def test_karcher_of_two_points_is_the_slerp_midpoint_scaled_by_the_mean_norm():
    out = merge_whole("karcher", [[1, 0], [0, 3]])
    assert torch.allclose(out, torch.tensor([math.sqrt(2), math.sqrt(2)]), atol=1e-6)
    # and at 60 degrees: the midpoint direction at 30 degrees, norm (2 + 4) / 2
    a, b = [2, 0], [4 * math.cos(math.pi / 3), 4 * math.sin(math.pi / 3)]
    out = merge_whole("karcher", [a, b])
    assert torch.allclose(out, 3 * torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]),
                          atol=1e-6)


def test_model_stock_t_for_known_cosines():
    # two task vectors at 60 degrees: cos = 1/2, t = 2 * 1/2 / (1 + 1/2) = 2/3
    base = [1.0, 1.0]
    d1, d2 = [1, 0], [0.5, math.sqrt(3) / 2]
    out = merge_whole("model_stock", [[1 + d1[0], 1 + d1[1]], [1 + d2[0], 1 + d2[1]]], base)
    mean = torch.tensor([(d1[0] + d2[0]) / 2, (d1[1] + d2[1]) / 2])
    assert torch.allclose(out, torch.tensor(base) + 2 / 3 * mean, atol=1e-6)
    # three orthogonal task vectors: cos = 0, t = 0: the base
    out = merge_whole("model_stock", [[2, 0, 0], [0, 2, 0], [0, 0, 2]], [0, 0, 0])
    assert torch.allclose(out, torch.zeros(3))
    # identical task vectors: cos = 1, t = 1: the models' mean
    out = merge_whole("model_stock", [[1, 2, 3], [1, 2, 3]], [0, 0, 0])
    assert torch.allclose(out, torch.tensor([1.0, 2, 3]))


def test_multislerp_and_nuslerp_by_hand():
    # two orthogonal unit vectors, equal weights: their bisector, norm 1
    out = merge_whole("multislerp", [[1, 0], [0, 1]])
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # nuslerp with weights 1 and 3: t = 3/4 of the way along the arc
    out = merge_whole("nuslerp", [[1, 0], [0, 1]], weights=[1, 3])
    assert torch.allclose(out, torch.tensor([math.cos(3 * math.pi / 8),
                                             math.sin(3 * math.pi / 8)]))
    # antipodal with balancing weights: multislerp of three models refuses
    with pytest.raises(Exception, match="zero"):
        merge_whole("multislerp", [[1, 0], [-1, 0], [0, 0]], weights=[1, 1, 0])


def test_della_keeps_density_on_average_and_favours_large_magnitudes():
    """Random, so not mergekit's bits: its distribution. p runs linearly from
    density - epsilon (smallest in the row) to density + epsilon (largest)."""
    torch.manual_seed(0)
    rows, cols, density, eps = 400, 256, 0.5, 0.3
    d = torch.randn(rows, cols)
    params = MethodParams.resolve("della_linear", [{}], {"density": density, "epsilon": eps,
                                                         "rescale": "none"}, 7)
    merge = tensor_merge("t", (rows, cols), params)
    offset, v = merge.split(d.clone()[None], torch.zeros(rows, cols))
    kept = merge.merge((0, rows), offset, v) != 0
    assert abs(kept.float().mean().item() - density) < 0.01
    rank = torch.argsort(torch.argsort(d.abs(), dim=1), dim=1)
    low = kept[rank < cols // 10].float().mean()
    high = kept[rank >= cols - cols // 10].float().mean()
    assert abs(low - (density - eps + 0.1 * eps)) < 0.03
    assert abs(high - (density + eps - 0.1 * eps)) < 0.03


# -- refusals: each bad plan is one line and exit status 2 --------------------------------

BAD = [  # (method, models, base, body, the problem named)
    ("slerp", ["@ft1"], None, "parameters: {t: 0.5}\n", "method slerp needs 'base_model'"),
    ("slerp", ["@anchor", "@ft1", "@ft2"], "anchor", "parameters: {t: 0.5}\n",
     "merges exactly 1 model"),
    ("slerp", ["@ft1", "@ft2"], "anchor", "parameters: {t: 0.5}\n", "merges exactly 1 model"),
    ("slerp", ["@ft1"], "anchor", "", "needs parameters.t"),
    ("slerp", ["@ft1"], "anchor", "parameters: {t: 1.5}\n", "parameters.t must be in [0, 1]"),
    ("slerp", ["@ft1"], "anchor", "parameters: {t: 0.5, gamma: 0.1}\n",
     "parameters.gamma has no effect with method slerp"),
    ("model_stock", ["@anchor", "@ft1"], "anchor", "", "merges at least 2 model"),
    ("model_stock", ["@ft1", "@ft2"], None, "", "method model_stock needs 'base_model'"),
    ("model_stock", THREE, "anchor", "parameters: {filter_wise: yes please}\n",
     "filter_wise must be true or false"),
    ("della", THREE, None, "parameters: {density: 0.5}\n", "method della needs 'base_model'"),
    ("della", THREE, "anchor", "parameters: {density: 0.5, epsilon: 0.7}\n",
     "epsilon must be in [0, 0.5)"),
    ("della", ["{model: @ft1, density: 0.2}", "@ft2"], "anchor",
     "parameters: {density: 0.5, epsilon: 0.3}\n", "models[0]: della needs density - epsilon"),
    ("breadcrumbs", THREE, "anchor", "parameters: {gamma: 2}\n", "gamma must be in [0, 1]"),
    ("breadcrumbs_ties", THREE, "anchor", "parameters: {rescale: inverse_density}\n",
     "rescale inverse_density has no meaning"),
    ("ties", ["{model: @ft1, epsilon: 0.1}", "@ft2"], "anchor", "",
     "models[0].epsilon has no effect with method ties"),
    ("nuslerp", THREE, None, "", "method nuslerp merges exactly 2 model"),
    ("karcher", THREE, "anchor", "", "karcher is the models' mean on the sphere"),
    ("karcher", THREE, None, "parameters: {max_iter: 0}\n", "max_iter must be a positive integer"),
    ("karcher", THREE, None, "parameters: {tol: -1}\n", "tol must be positive"),
    ("multislerp", THREE, None, "parameters: {eps: 0}\n", "eps must be positive"),
    ("passthrough", ["@ft1", "@ft2"], None, "", "method passthrough merges exactly 1 model"),
    ("passthrough", ["@ft1"], "anchor", "", "passthrough copies its one model"),
    ("ties", ["@ft1"], None, "", "'models' must list at least two models"),
]


@pytest.mark.parametrize("bad", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_plan_is_refused_in_one_line(bad, fixtures_dir, tmp_path):
    method, models, base, body, problem = bad
    plan = write(tmp_path, fixtures_dir, method, models, base, body)
    result = CliRunner().invoke(main, ["plan", str(plan)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], result.output


SLICED = [  # method, plan values, base, where the base sits among the models
    ("slerp", {"t": 0.4}, True, 0), ("nuslerp", {"nuslerp_flatten": False}, True, None),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, False, None),
    ("multislerp", {}, True, None), ("karcher", {}, False, None),
    ("model_stock", {"filter_wise": True}, True, None), ("model_stock", {}, True, 1),
    ("della", {"density": 0.6, "epsilon": 0.3}, True, None),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "rescale": "l1"}, True, None),
]


@pytest.mark.parametrize("method, values, with_base, base_index", SLICED)
@pytest.mark.parametrize("shape", [(37, 5), (53,)])
def test_any_slicing_gives_the_same_bytes(method, values, with_base, base_index, shape):
    """The executor's protocol driven by hand: slices cut anywhere, vectors included."""
    torch.manual_seed(1)
    n = 2 if method in ("slerp", "nuslerp") else 3
    base = torch.randn(shape) if with_base else None
    x = torch.randn(n, *shape) * 0.1 + (base if base is not None else 0)
    if base_index is not None:
        x[base_index] = base
    params = MethodParams.resolve(method, [{}] * n, values, 3)

    def merged(cuts: list[int]) -> torch.Tensor:
        merge = tensor_merge("w", shape, params, None, base_index)
        ranges = list(zip(cuts[:-1], cuts[1:]))
        sub = lambda a, b: (x[:, a:b].clone(), base[a:b] if base is not None else None)  # noqa
        if len(ranges) == 1:
            split = merge.split(*sub(0, shape[0]))
            for pass_name in merge.passes:  # one slice: every pass sees the same split
                merge.observe(pass_name, ranges[0], split[1])
            return merge.merge(ranges[0], *split)
        for pass_name in merge.passes:
            for a, b in ranges:
                merge.observe(pass_name, (a, b), merge.split(*sub(a, b))[1])
        return torch.cat([merge.merge((a, b), *merge.split(*sub(a, b))) for a, b in ranges])

    whole = merged([0, shape[0]])
    for cuts in ([0, 1, shape[0]], [0, 7, 8, 30, shape[0]], list(range(shape[0] + 1))):
        assert torch.equal(merged(cuts), whole), cuts
