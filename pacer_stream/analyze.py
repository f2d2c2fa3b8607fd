"""``pacer-stream analyze``: per-block alignment and interference, before deciding what to upcycle.

Runs the same streamed, resumable stages as a PACER ``run`` up to the upcycling
decision (alignment, then the consensus statistics of every block) and writes,
instead of a model, a JSON report and a figure::

    pacer-stream analyze plans/tiny-smoke.yaml --output analysis.json
    pacer-stream analyze --models ./ft1 ./ft2 ./ft3 --output analysis.json

The figure (``analysis.png`` beside the JSON; needs matplotlib, the ``analyze``
extra) shows the MLP interference per block as bars, the blocks the policy would
upcycle in red and the threshold as a dashed line, next to the models' pairwise
cosine similarity.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import parse_plan
from .config_schema import PlanConfig
from .errors import PacerError
from .backends.local import LocalBackend
from .executor import Runner
from .inputs import ModelSet
from .io.writer import write_atomic
from .methods.dense import MethodParams, pacer_dense
from .job import MergeContext, RunOptions
from .planner import make_plan, require_fit
from .preflight import check_outside_inputs
from .report import REPORT, pacer_report
from .stages.align import AlignStage
from .stages.consensus import ConsensusStage
from .stages.upcycle import UpcycleStage
from .state import RunState

SELECTED = "#d62728"  # bars of the blocks the policy would upcycle
OTHER = "#1f77b4"


def plan_for_models(models: list[str], align: bool = True) -> PlanConfig:
    """A PACER plan for ``--models`` given on the command line (paths or hub ids)."""
    if len(models) < 2:
        raise PacerError("analyze --models: give at least two models")
    return parse_plan({"models": list(models), "method": "pacer", "align": align},
                      base_dir=Path.cwd(), label="analyze --models")


def analyze(config: PlanConfig, output: Path, options: RunOptions) -> dict:
    """Align, gather the consensus statistics, and write ``output`` (JSON) and its PNG."""
    output = Path(output)
    if output.suffix != ".json":
        raise PacerError(f"--output {output}: the report is JSON; give a path ending in .json")
    models = ModelSet.from_plan(config)
    state_dir = options.state_dir or output.with_name(f".{output.stem}.state")
    check_outside_inputs("--output", output, models)
    check_outside_inputs("the analysis state", state_dir, models)
    require_fit(make_plan(config, models, options.budget, options.device))
    output.parent.mkdir(parents=True, exist_ok=True)
    params = MethodParams.resolve(pacer_dense(config)[0], config.models, {}, config.seed)
    ctx = MergeContext(config, models, params, options)
    runner = Runner(ctx, RunState.open(state_dir, ctx.fingerprint(), restart=options.restart),
                    LocalBackend(), options.quiet)
    stages = [AlignStage()] if config.align else []  # a PACER run's stages up to the decision
    for stage in [*stages, ConsensusStage(), UpcycleStage()]:
        runner.run(stage)
    report = {"models": [m.label for m in models.models], "family": models.spec.family,
              "align": ctx.align_report, **pacer_report(ctx)}
    report["router"] = finished_router(config)
    write_atomic(output, json.dumps(report, indent=1, sort_keys=True) + "\n")
    report["figure"] = draw(report, output.with_suffix(".png"))
    return report


def finished_router(config: PlanConfig) -> dict | None:
    """The router section (kind, routing accuracy per block) of the plan's finished run:
    routing is measured on the merged blocks, which only ``run`` writes."""
    report = config.output.path / REPORT
    try:
        return (json.loads(report.read_text()).get("pacer") or {}).get("router")
    except (OSError, ValueError):
        return None


def draw(report: dict, path: Path) -> str | None:
    """The PNG figure; returns its path, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    blocks = report["blocks"]
    layers = [b["layer"] for b in blocks]
    values = [b.get("mlp", {}).get("interference", 0.0) for b in blocks]
    if report["metric"] == "base_interference":
        values = [b.get("mlp", {}).get("base_interference") or 0.0 for b in blocks]
    selected = set(report["decision"]["blocks"])
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(11, 4), dpi=100,
                                     gridspec_kw={"width_ratios": [2, 1]})
    bars.bar(layers, values, color=[SELECTED if layer in selected else OTHER for layer in layers],
             antialiased=False)
    attn = [b.get("attn", {}).get("interference") for b in blocks]
    if any(a is not None for a in attn):
        bars.plot(layers, [a or 0.0 for a in attn], "k.", label="attention")
        bars.legend(loc="upper left")
    if report["decision"]["mode"] == "threshold":
        bars.axhline(report["threshold"], color="0.5", linestyle="--", linewidth=1)
    bars.set_xlabel("block")
    bars.set_ylabel(report["metric"].replace("_", " ") + " (MLP)")
    bars.set_title("interference per block (red: upcycled)")
    similarity = report["model_similarity"]
    image = heat.imshow(similarity, cmap="Greys", vmin=min(min(r) for r in similarity), vmax=1)
    names = [Path(m.rstrip("/")).name or m for m in report["models"]]
    heat.set_xticks(range(len(names)), names, rotation=45, ha="right")
    heat.set_yticks(range(len(names)), names)
    heat.set_title("model cosine similarity")
    fig.colorbar(image, ax=heat)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
