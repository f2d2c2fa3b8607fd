"""What limits a merge of the text experts: oracle swaps of tensor groups, per domain.

    python benchmarks/quality/ceiling.py [--domains A|B] [--threads N] [--profile full|tiny]

For each domain, the merged model is scored with some groups of tensors (MLPs, attention,
token rows) taken from that domain's own expert and the rest merged. That is what perfect
routing could give if those groups were experts; with only the MLPs swapped it is the
ceiling of PACER's MLP upcycling. The rest is merged two ways:

* ``mean``: every tensor the models' mean (PACER without samples, `linear`);
* ``samples``: PACER's rules with the router-sample lines: linear layers by RegMean
  (pacer_stream.methods.regmean, each expert's own lines through transformers), token rows
  by usage (pacer_stream.methods.vocabulary), norms the mean.

It needs the trained models of run.py (the same cache and settings); results go to
benchmarks/results/quality-ceiling-<set>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from metrics import mean, pad_lines, retention  # noqa: E402
from pacer_stream.methods.regmean import DEFAULT_ALPHA, RegMeanSum, gram, shrink  # noqa: E402
from pacer_stream.methods.vocabulary import row_weights, token_usage  # noqa: E402
from settings import PROFILES  # noqa: E402
from tasks import TextTask  # noqa: E402
from textdata import load_domain, resolve_domains  # noqa: E402
from training import train_text  # noqa: E402

SWAPS = [(), ("mlp",), ("mlp", "attn"), ("mlp", "vocab"), ("mlp", "attn", "vocab")]
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def group(name: str) -> str:
    if name in VOCAB:
        return "vocab"
    if ".mlp." in name:
        return "mlp"
    if ".self_attn." in name and not name.endswith("norm.weight"):
        return "attn"
    return "norm"


def sample_rules(task: TextTask, folders: dict[str, Path], experts: dict[str, dict],
                 names: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor merged as PACER does with the router-sample lines (module docstring)."""
    stack = lambda key: torch.stack([experts[n][key].float() for n in names])  # noqa: E731
    merged = {key: stack(key).mean(0) for key in experts[names[0]]}
    sums: dict[str, RegMeanSum] = {}
    tokens, lengths, owner = [], [], []
    for k, name in enumerate(names):
        model = task.load(folders[name])
        linears = {m: mod for m, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and m + ".weight" not in VOCAB}
        seen: dict[str, list[torch.Tensor]] = {m: [] for m in linears}
        ids, mask = pad_lines(task.data[name].router)
        real = mask.bool()
        hooks = [mod.register_forward_pre_hook(
            lambda _, args, m=m: seen[m].append(args[0][real])) for m, mod in linears.items()]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for h in hooks:
            h.remove()
        for m, mod in linears.items():
            x = torch.cat(seen[m])
            sums.setdefault(m, RegMeanSum()).add(shrink(gram(x) / len(x), DEFAULT_ALPHA), 1.0,
                                                 {m: mod.weight.detach()})
        tokens.append(ids)
        lengths.append(mask.sum(1))
        owner.append(torch.full((len(ids),), k))
    for m, total in sums.items():
        merged[m + ".weight"] = total.solve()[m].float()
    width = max(t.shape[1] for t in tokens)
    ids = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tokens])
    vocab = experts[names[0]][VOCAB[0]].shape[0]
    r = row_weights(token_usage(ids, torch.cat(lengths), torch.cat(owner), len(names), vocab),
                    (1.0,) * len(names)).float()
    for key in VOCAB:
        if key in merged:
            merged[key] = (r[:, :, None] * stack(key)).sum(0)
    return merged


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Writes the table; returns {swapped groups: (mean retention, rest by mean / by samples)}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default="A")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", default="full", choices=sorted(PROFILES))
    p.add_argument("--cache", type=Path, default=REPO / "out" / "quality-cache")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = PROFILES[args.profile].text
    label, names = resolve_domains(args.domains)
    domains = [load_domain(n, s.context - 1, s.n_eval, s.n_router, s.train_bytes) for n in names]
    task = TextTask(domains)
    base_dir, folders, _ = train_text(domains, s, args.cache, print)
    experts = {n: load_file(str(Path(folders[n]) / "model.safetensors")) for n in names}
    model = task.load(base_dir)
    base = {d: task.score(model, d) for d in names}
    own = {d: task.score(task.load(folders[d]), d) for d in names}
    rules = {"mean": {k: torch.stack([experts[n][k].float() for n in names]).mean(0)
                      for k in experts[names[0]]},
             "samples": sample_rules(task, folders, experts, list(names))}
    lines = [f"# What limits a merge of the text experts: set {label}", "",
             f"Written by `benchmarks/quality/ceiling.py --domains {args.domains}` (its "
             "docstring says what each row is). Mean retention when the named groups come from "
             "each domain's own expert and the rest is merged by the rule of the column.", "",
             "| taken from the domain's expert | " + " | ".join(f"{rule}: {d}" for rule in rules
                                                          for d in names) +
             " | mean (mean) | mean (samples) |",
             "|---|" + "---:|" * (2 * len(names) + 2)]
    table = {}
    for swap in SWAPS:
        cells, means = [], []
        for rule, merged in rules.items():
            scores = []
            for d in names:
                state = {k: (experts[d][k].float() if group(k) in swap else merged[k])
                         for k in merged}
                model.load_state_dict(state, strict=False)
                scores.append(retention(base[d], task.score(model, d), own[d]))
            cells += [f"{x:.2f}" for x in scores]
            means.append(mean(scores))
        lines.append(f"| {' + '.join(swap) or 'nothing'} | " + " | ".join(cells) +
                     f" | {means[0]:.3f} | {means[1]:.3f} |")
        print(lines[-1], flush=True)
        table[" + ".join(swap) or "nothing"] = (means[0], means[1])
    out = args.results / f"quality-ceiling-{label}.md"
    args.results.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    main()
