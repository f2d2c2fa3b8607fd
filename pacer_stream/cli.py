"""The ``pacer-stream`` command line.

Every user error is printed as one line, ``pacer-stream: error: ...``, with exit
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import PacerError
from .sizes import parse_size


class _Group(click.Group):
    """Turns :class:`PacerError` and the system's errors (a full disk, a folder it may
    not read or write) into a one-line message and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (PacerError, OSError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            user_error = isinstance(exc, PacerError)
            click.echo(f"pacer-stream: error: {exc if user_error else os_error_line(exc)}",
                       err=True)
            ctx.exit(exc.exit_code if user_error else PacerError.exit_code)


def os_error_line(exc: OSError) -> str:
    """One line for an error of the file system: the file, the reason, what to do."""
    where = exc.filename or "a file"
    reason = exc.strerror or str(exc)
    advice = {
        errno.ENOSPC: "free some space, then re-run the same command to resume",
        errno.EDQUOT: "free some space, then re-run the same command to resume",
        errno.EACCES: "check the permissions of that path",
        errno.EPERM: "check the permissions of that path",
        errno.EROFS: "the file system is read-only: choose another output path",
    }.get(exc.errno, "check that path, then re-run the same command to resume")
    return " ".join(f"{where}: {reason}; {advice}".split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="pacer-stream",
                      message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Stream-merge N fine-tuned checkpoints of one architecture into one model."""
    ctx.obj = {"debug": debug}


def _load(plan_file: Path, out: Path | None, copy_tokenizer: bool | None, quiet: bool = False):
    """The validated plan: a pacer-stream plan or a mergekit configuration (said, unless
    quiet), with OUT and --copy-tokenizer/--no-copy-tokenizer applied."""
    import dataclasses

    from .config import load_plan

    config = load_plan(plan_file, out)
    if copy_tokenizer is not None and copy_tokenizer != config.output.copy_tokenizer:
        if not copy_tokenizer and config.output.tokenizer_source is not None:
            raise PacerError(f"--no-copy-tokenizer: {plan_file} names a tokenizer_source; "
                             "remove one of the two")
        config = dataclasses.replace(config, output=dataclasses.replace(
            config.output, copy_tokenizer=copy_tokenizer))
    if not quiet:
        for note in config.read_as:
            click.echo(note)
    return config


_OUT = click.argument("out", required=False, type=click.Path(path_type=Path))
_COPY_TOKENIZER = click.option(
    "--copy-tokenizer/--no-copy-tokenizer", "copy_tokenizer", default=None,
    help="Copy the tokenizer and generation files into the output (default: yes, from the "
         "base model, else the first model; output.tokenizer_source chooses another).")


@main.command()
@click.argument("plan_file", type=click.Path(path_type=Path))
@_OUT
@click.option("--max-memory", "max_memory", help="RAM budget, e.g. 16GB (default: 80% of RAM).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Estimate the run on one process or on a Ray cluster.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Machines of the Ray cluster to estimate the wall time for (--backend ray).")
def plan(plan_file: Path, out: Path | None, max_memory: str | None, device: str,
         as_json: bool, backend: str, workers: int | None) -> None:
    """Preview memory, disk traffic and time of PLAN_FILE from the headers alone.

    PLAN_FILE is a pacer-stream plan or a mergekit configuration; OUT (needed for a
    mergekit one) is the output folder. Exits with status 3 when the merge does not fit
    the budget (after the report)."""
    from .inputs import ModelSet
    from .plan_report import render
    from .planner import make_plan

    if workers is not None and backend != "ray":
        raise PacerError("--workers is the size of a Ray cluster: give it with --backend ray")
    budget = parse_size(max_memory, "--max-memory") if max_memory else None
    config = _load(plan_file, out, None, quiet=as_json)
    report = make_plan(config, ModelSet.from_plan(config), budget, device)
    cluster = None
    if backend == "ray":
        from . import cluster_plan

        cluster = cluster_plan.estimate(report, workers or 1)
    if as_json:
        click.echo(json.dumps({**report.to_json(), "cluster": cluster and cluster.to_json()},
                              indent=1))
    else:
        click.echo(render(report))
        if cluster is not None:
            click.echo(cluster_plan.render(cluster))
    if not report.fits:  # the same verdict `run` refuses with, from the same plan
        click.echo(f"pacer-stream: error: {report.reason}", err=True)
        sys.exit(3)  # not 2 (a user error): the plan is valid, the budget is too small


@main.command()
@click.argument("plan_file", type=click.Path(path_type=Path))
@_OUT
@click.option("--max-memory", "max_memory", help="RAM budget, e.g. 16GB (default: 80% of RAM).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--shard-size", "shard_size", help="Output shard size, e.g. 5GB (default: the plan's).")
@click.option("--state-dir", "state_dir", type=click.Path(path_type=Path),
              help="Where to keep the resumable run state (default: inside the output folder).")
@click.option("--restart", is_flag=True, help="Discard an unfinished run of a different plan.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty output folder.")
@click.option("--allow-nonfinite", "allow_nonfinite", is_flag=True,
              help="Merge tensors that contain NaN or Inf instead of refusing.")
@click.option("--hash-inputs", "hash_inputs", is_flag=True,
              help="Also fingerprint the input files by content (sha256; reads them once more), "
                   "so a resume tells copied or touched inputs from changed ones.")
@_COPY_TOKENIZER
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch (default: torch's, one per core).")
@click.option("--backend", type=click.Choice(["local", "ray"]),
              help="Where the units run: this process, or Ray tasks on a cluster whose "
                   "machines see the inputs and the output folder (pacer-stream[ray]). "
                   "Default: the plan's backend, else local.")
@click.option("--address", help="The Ray cluster to join (default: start one on this machine).")
@click.option("--shard-layout", "shard_layout", type=click.Choice(["size", "unit"]),
              help="Shards packed by size across units, or each unit's own (the Ray "
                   "backend's; give it to a local run to write the same files).")
@click.option("-v", "--verbose", is_flag=True,
              help="Print the plan (memory, traffic, stages) before the run and its totals after.")
@click.option("--quiet", is_flag=True, help="No progress bars and no summary line.")
def run(plan_file: Path, out: Path | None, max_memory: str | None, device: str,
        shard_size: str | None, state_dir: Path | None, restart: bool, force: bool,
        allow_nonfinite: bool, hash_inputs: bool, copy_tokenizer: bool | None,
        threads: int | None, backend: str | None, address: str | None,
        shard_layout: str | None,
        verbose: bool, quiet: bool) -> None:
    """Run the merge in PLAN_FILE; re-run the same command to resume after an interruption.

    PLAN_FILE is a pacer-stream plan or a mergekit configuration; OUT, the output folder,
    is needed for a mergekit one and overrides a plan's output.path."""
    from .calibration import routing_line
    from .executor import RunOptions
    from .run import run_merge
    from .summary import align_lines

    if verbose and quiet:
        raise PacerError("--verbose and --quiet: choose one")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    options = RunOptions(
        budget=parse_size(max_memory, "--max-memory") if max_memory else None,
        device=device,
        shard_size=parse_size(shard_size, "--shard-size") if shard_size else None,
        state_dir=state_dir.resolve() if state_dir else None,
        shard_layout=shard_layout, backend=backend, address=address,
        restart=restart, force=force, quiet=quiet, allow_nonfinite=allow_nonfinite,
        hash_inputs=hash_inputs,
        command=run_command(plan_file, device, shard_size, allow_nonfinite, out,
                            copy_tokenizer, shard_layout),
    )
    config = _load(plan_file, out, copy_tokenizer, quiet)
    if verbose:
        from .inputs import ModelSet
        from .plan_report import render
        from .planner import make_plan

        click.echo(render(make_plan(config, ModelSet.from_plan(config), options.budget, device)))
    try:
        summary = run_merge(config, options)
    except KeyboardInterrupt:
        click.echo("pacer-stream: interrupted; finished units are saved, re-run the same "
                   "command to resume", err=True)
        sys.exit(130)
    if quiet:  # a peer the cap stopped is said even so: its merge is not what was meant
        for line in align_lines(summary.align, unconverged_only=True):
            click.echo(line, err=True)
    else:
        for line in summary.align_lines():
            click.echo(line)
        if summary.pacer_line():
            click.echo(summary.pacer_line())
        if summary.dense_line():
            click.echo(summary.dense_line())
        routing = routing_line((summary.pacer or {}).get("router"))
        if routing:
            click.echo(routing)
        click.echo(summary.line())
    if verbose:
        click.echo(f"units: {len(summary.units_done)} merged this run, "
                   f"{len(summary.units_skipped)} already done; read {summary.read_bytes:,} "
                   f"bytes, wrote {summary.write_bytes:,}; peak RSS {summary.peak_rss:,} bytes "
                   f"of a {summary.budget:,}-byte budget")


def run_command(plan_file: Path, device: str, shard_size: str | None,
                allow_nonfinite: bool, out: Path | None = None,
                copy_tokenizer: bool | None = None,
                shard_layout: str | None = None) -> tuple[str, ...]:
    """``pacer-stream run`` as the model card records it: the plan as typed and the
    options that can change the output or are needed to repeat it. The rest (--max-memory,
    --state-dir, --restart, --force, --hash-inputs, --quiet, --debug; export/card.py's
    UNRECORDED_OPTIONS) are left out, so a resume or a run under another budget writes the
    same card; rebuilt from the parsed options, not sys.argv, so it is the same however
    they were spelled (and under click's test runner)."""
    return ("pacer-stream", "run", str(plan_file), *((str(out),) if out is not None else ()),
            *(("--no-copy-tokenizer",) if copy_tokenizer is False else ()),
            *(("--device", device) if device != "cpu" else ()),
            *(("--shard-size", shard_size) if shard_size else ()),
            *(("--shard-layout", shard_layout) if shard_layout == "unit" else ()),
            *(("--allow-nonfinite",) if allow_nonfinite else ()))


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--expert", help="The expert: its index, or the model's name in the plan.")
@click.option("--coefficient", type=float, help="Any c instead of an expert's c_t.")
@click.option("--to", "to", type=click.Path(path_type=Path), required=True,
              help="Folder for the dense checkpoint.")
def materialize(output: Path, expert: str | None, coefficient: float | None, to: Path) -> None:
    """Write mu + c * eta of a split_merge OUTPUT as a dense checkpoint of the source architecture."""
    from .materialize import materialize as write_expert

    c = write_expert(output, to, expert, coefficient)
    click.echo(f"wrote mu + {c:.6g} * eta to {to}")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--models", "as_models", is_flag=True,
              help="INPUTS are models (paths or hub ids) to analyze, not a plan file.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("pacer-analysis.json"),
              show_default=True, help="The JSON report; the figure goes beside it as .png.")
@click.option("--no-align", "no_align", is_flag=True, help="With --models: skip alignment.")
@click.option("--max-memory", "max_memory", help="RAM budget, e.g. 16GB (default: 80% of RAM).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--restart", is_flag=True, help="Discard the saved state of an earlier analysis.")
@click.option("--quiet", is_flag=True, help="No progress bars and no summary.")
def analyze(inputs: tuple[str, ...], as_models: bool, output: Path, no_align: bool,
            max_memory: str | None, device: str, restart: bool, quiet: bool) -> None:
    """Per-block interference, alignment and the would-be upcycling, as JSON and a figure.

    INPUTS is one plan file, or with --models two or more models.
    """
    from .analyze import analyze as run_analysis, plan_for_models
    from .calibration import routing_line
    from .config import load_plan
    from .executor import RunOptions
    from .summary import align_lines

    if as_models:
        config = plan_for_models(list(inputs), align=not no_align)
    elif len(inputs) != 1:
        raise PacerError("analyze: give one plan file, or --models followed by the models")
    else:
        config = load_plan(inputs[0])
    options = RunOptions(budget=parse_size(max_memory, "--max-memory") if max_memory else None,
                         device=device, restart=restart, quiet=quiet or not sys.stderr.isatty())
    report = run_analysis(config, output, options)
    if quiet:
        for line in align_lines(report.get("align"), unconverged_only=True):
            click.echo(line, err=True)
        return
    for line in align_lines(report.get("align")):
        click.echo(line)
    metric = report["metric"]
    for block in report["blocks"]:
        mlp = block.get("mlp", {})
        mark = "  <- upcycle" if block["selected"] else ""
        click.echo(f"block {block['layer']:>3}: MLP {metric} {mlp.get(metric) or 0:.4f}, "
                   f"attention {block.get('attn', {}).get(metric) or 0:.4f}{mark}")
    d = report["decision"]
    click.echo(f"would upcycle {len(d['blocks'])} block(s) to {d['num_experts']} experts "
               f"({d['mode']}); parameters x{report['parameters']['growth']:.3f}"
               + (f"; {d['note']}" if d["note"] else ""))
    routing = routing_line(report.get("router"))
    if routing:
        click.echo(f"{routing} (the finished run in {config.output.path})")
    figure = report.get("figure") or "no figure (pip install 'pacer-stream[analyze]')"
    click.echo(f"wrote {output} and {figure}")


def _register_router_commands() -> None:
    from .cli_router import route, router

    main.add_command(router)
    main.add_command(route)


_register_router_commands()


if __name__ == "__main__":
    sys.exit(main())
