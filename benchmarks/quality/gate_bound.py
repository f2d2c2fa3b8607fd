"""How far a stock linear gate can take PACER's M = N MoE: routing accuracy vs retention.

    python benchmarks/quality/gate_bound.py [--domains A|B] [--threads N] [--profile full|tiny]

The M = N row of run.py upcycles every MLP to the models' own MLPs, so what it keeps is set
by routing alone. This script runs that merge (few-shot router) and scores it three ways:

1. **as exported**: the fitted gate, top-2, as transformers runs it;
2. **oracle routing at accuracy a**: every token of a domain goes (top-1) to its domain's
   expert, except a random share 1 − a of the tokens, which go to a uniformly chosen other
   expert (fixed seed): the retention a gate of per-token accuracy a could give when its
   mistakes are random;
3. **the linear bound**: per upcycled layer, a multinomial logistic regression with a bias
   (which a stock gate does not even have) fitted on the *eval* tokens' gate inputs
   themselves, the very tokens it is scored on. Its accuracy bounds any linear gate on the
   hidden states this model produces (the exported routers upstream held fixed).

Results go to benchmarks/results/quality-gate-bound-<set>.md. It needs the trained models
of run.py (the same cache and settings); the merge goes to out/quality-gate-bound/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from merging import Row, cli, fresh, merge_rows, write_plan  # noqa: E402
from metrics import mean, retention  # noqa: E402
from report import machine  # noqa: E402
from routing_probe import gates, routing_accuracy  # noqa: E402
from settings import PROFILES  # noqa: E402
from tasks import TextTask  # noqa: E402
from textdata import load_domain, resolve_domains  # noqa: E402
from training import train_text  # noqa: E402

ACCURACIES = (1.0, 0.95, 0.9, 0.8, 0.7)
ROW = "pacer-all-fewshot"


class OracleRouting:
    """Replaces the top-k choice of every MoE gate: top-1 to ``expert``, a share 1 − accuracy
    of the tokens to a random other expert. Off (the gate's own choice) while ``expert`` is None.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.expert: int | None = None
        self.accuracy = 1.0
        self.generator = torch.Generator()
        for gate in gates(model).values():
            gate.forward = self._wrap(gate.forward)

    def _wrap(self, forward):
        def routed(hidden):
            logits, scores, indices = forward(hidden)  # transformers' TopKRouter contract
            if self.expert is None:
                return logits, scores, indices
            n, m = logits.shape
            chosen = torch.full((n,), self.expert)
            wrong = torch.rand(n, generator=self.generator) >= self.accuracy
            other = (chosen + torch.randint(1, m, (n,), generator=self.generator)) % m
            chosen = torch.where(wrong, other, chosen)
            indices = torch.stack([chosen] + [(chosen + j) % m for j in range(1, indices.shape[1])], 1)
            scores = torch.zeros_like(scores)
            scores[:, 0] = 1
            return logits, scores, indices
        return routed


def scored(task: TextTask, model, base: dict, own: dict, experts: list[int] | None,
           routing: OracleRouting, accuracy: float) -> list[float]:
    """Retention per domain (domain k's oracle expert is experts[k], or the gate's own choice)."""
    out = []
    for k, d in enumerate(task.domains):
        routing.expert = None if experts is None else experts[k]
        routing.accuracy = accuracy
        routing.generator.manual_seed(k)
        out.append(retention(base[d], task.score(model, d), own[d]))
    routing.expert = None
    return out


@torch.no_grad()
def gate_inputs(model, task: TextTask) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per gated layer, the eval tokens' gate inputs [n, d]; and each token's domain index."""
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [gate.register_forward_pre_hook(
        lambda _, args, layer=layer: seen.setdefault(layer, []).append(args[0]))
        for layer, gate in gates(model).items()]
    xs: dict[int, list[torch.Tensor]] = {}
    labels = []
    try:
        for k, domain in enumerate(task.domains):
            for inputs, mask in task.probe_batches(domain):
                seen.clear()
                model(**inputs)
                real = mask.reshape(-1).bool()
                for layer, (x,) in seen.items():
                    xs.setdefault(layer, []).append(x.reshape(-1, x.shape[-1])[real].double())
                labels.append(torch.full((int(real.sum()),), k))
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.cat(v) for layer, v in xs.items()}, torch.cat(labels)


def linear_bound(x: torch.Tensor, labels: torch.Tensor, m: int) -> float:
    """In-sample accuracy of a multinomial logistic regression with a bias (tiny L2), domains
    weighted equally."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    weights = torch.zeros(x.shape[1], m, dtype=x.dtype, requires_grad=True)
    counts = torch.bincount(labels, minlength=m).double()
    balance = (1 / counts)[labels] / m
    opt = torch.optim.LBFGS([weights], max_iter=500, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(x @ weights, labels, reduction="none")
        value = (ce * balance).sum() + 1e-5 * (weights ** 2).sum()
        value.backward()
        return value

    opt.step(loss)
    hit = ((x @ weights).argmax(1) == labels).double()
    return float(sum(hit[labels == e].mean() for e in range(m)) / m)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default="A")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", default="full", choices=sorted(PROFILES))
    p.add_argument("--cache", type=Path, default=REPO / "out" / "quality-cache")
    p.add_argument("--work", type=Path, default=REPO / "out" / "quality-gate-bound")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    s = profile.text
    label, names = resolve_domains(args.domains)
    domains = [load_domain(n, s.context - 1, s.n_eval, s.n_router, s.train_bytes) for n in names]
    task = TextTask(domains)
    base_dir, folders, _ = train_text(domains, s, args.cache, print)
    base = {d: task.score(task.load(base_dir), d) for d in names}
    own = {d: task.score(task.load(folders[d]), d) for d in names}

    row: Row = next(r for r in merge_rows(profile.merge) if r.slug == ROW)
    work = fresh(args.work / label)
    samples = task.write_router_samples(work / "router-samples")
    out = work / "merge"
    models = [Path(folders[d]) for d in names]
    write_plan(row, models, Path(base_dir), {Path(folders[d]): samples[d] for d in names}, out,
               work / "plan.yaml", 0)
    run = cli(["run", str(work / "plan.yaml"), "--quiet"], args.threads, work / "run.log")
    if not run.ok:
        raise SystemExit(f"the {ROW} merge failed: {run.error}")
    report = json.loads((out / "pacer_report.json").read_text())
    clusters = report["pacer"]["decision"]["clusters"]
    layer0 = clusters[min(clusters, key=int)]
    model = task.load(out)
    routing = OracleRouting(model)

    lines = [f"# How far a stock linear gate takes the M = N MoE: set {label}", "",
             f"Written by `python benchmarks/quality/gate_bound.py --domains {args.domains}` (its "
             "docstring says what each row is).", "",
             "Machine: {cpu}, {cores} cores, {torch_threads} torch threads; torch {torch}, "
             "pacer_stream at {pacer_stream}.".format(**machine()), "",
             f"The merge is run.py's `{row.name}` row. Domains: {', '.join(names)}.", "",
             "| routing | per-token accuracy | " + " | ".join(names) + " | mean retention |",
             "|---|---:|" + "---:|" * len(names) + "---:|"]
    accuracy = routing_accuracy(model, task, clusters)
    exported = scored(task, model, base, own, None, routing, 1.0)
    table = {"exported gate": (mean(list(accuracy.values())), mean(exported))}
    lines.append(f"| exported few-shot gate, top-{report['pacer']['decision']['top_k']} | "
                 f"{table['exported gate'][0]:.3f} | " + " | ".join(f"{x:.2f}" for x in exported)
                 + f" | {mean(exported):.3f} |")
    for a in ACCURACIES:
        got = scored(task, model, base, own, layer0, routing, a)
        table[f"oracle {a}"] = (a, mean(got))
        lines.append(f"| oracle, random mistakes, top-1 | {a:.2f} | "
                     + " | ".join(f"{x:.2f}" for x in got) + f" | {mean(got):.3f} |")
        print(lines[-1], flush=True)
    xs, labels = gate_inputs(model, task)
    bound = {layer: linear_bound(x, labels, len(names)) for layer, x in sorted(xs.items())}
    lines += ["", "Per upcycled layer, the eval tokens' top-1 accuracy of the exported gate and "
              "the in-sample bound of any linear gate (logistic regression with a bias, fitted "
              "on those very tokens):", "",
              "| layer | exported gate | linear bound (in-sample) |", "|---:|---:|---:|"]
    for layer in sorted(xs):
        lines.append(f"| {layer} | {accuracy[str(layer)]:.3f} | {bound[layer]:.3f} |")
    table["linear bound"] = (mean(list(bound.values())), None)
    path = args.results / f"quality-gate-bound-{label}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    return {"table": table, "bound": bound, "accuracy": accuracy}


if __name__ == "__main__":
    main()
