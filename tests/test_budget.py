"""--max-memory: one accounting decides "fits" for `plan` and `run`, and a run that the
plan says fits stays under the budget (peak RSS measured as VmHWM)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from runs import min_budget, random_llamas, run_cli
from pacer_stream import accounting as acct
from pacer_stream.cli import main
from pacer_stream.config import load_plan
from pacer_stream.errors import PacerError
from pacer_stream.inputs import ModelSet
from pacer_stream.planner import make_plan, require_fit
from pacer_stream.sizes import format_size

MB = 10**6
METHODS = ["linear", "ties", "split_merge", "pacer"]
NEGATIVE = re.compile(r"(?<![\w.])-\d")  # a minus sign right before a number


def write_plan(tmp: Path, models: list[Path], method: str, out: str = "out",
               extra: str = "") -> Path:
    params = {"ties": "parameters: {density: 0.5}\n",
              "split_merge": "parameters: {density: 1.0}\n"}.get(method, "")  # its worst case
    plan = tmp / f"{method}-{out}.yaml"
    plan.write_text(f"models: [{', '.join(map(str, models))}]\nmethod: {method}\n"
                    f"output: {{path: {tmp / out}}}\n{params}{extra}")
    return plan


@pytest.fixture
def tiny(fixtures_dir) -> list[Path]:
    return [fixtures_dir / "conflict" / m for m in ("m1", "m2", "m3")]


# -- sizes and the plan command ----------------------------------------------------------

def test_format_size_never_prints_a_negative_size():
    assert format_size(-299.1e6) == "0 B" and format_size(-0.0) == "0 B"
    assert format_size(1.6e10) == "16.0 GB"


@pytest.mark.parametrize("as_json", [False, True])
def test_plan_of_an_impossible_budget_exits_3_and_prints_no_negative_size(tiny, tmp_path,
                                                                          as_json):
    plan = write_plan(tmp_path, tiny, "pacer")
    result = CliRunner().invoke(main, ["plan", str(plan), "--max-memory", "1MB",
                                       *(["--json"] if as_json else [])])
    assert result.exit_code == 3, result.output
    assert not NEGATIVE.search(result.output), result.output
    assert "needs at least" in result.stderr and "--max-memory" in result.stderr
    if as_json:
        report = json.loads(result.stdout)
        assert report["fits"] is False and report["min_budget_bytes"] > 1 * MB
    else:
        assert "fits: NO" in result.stdout and "does not cover the process itself" in result.stdout


def test_plan_of_a_budget_that_fits_exits_0(tiny, tmp_path):
    result = CliRunner().invoke(main, ["plan", str(write_plan(tmp_path, tiny, "pacer")),
                                       "--max-memory", "4GB"])
    assert result.exit_code == 0 and "fits: yes" in result.output


@pytest.mark.parametrize("method", METHODS + ["dare_ties"])
def test_min_budget_is_where_the_plan_starts_to_fit(tiny, tmp_path, method):
    plan = write_plan(tmp_path, tiny, method)
    config = load_plan(plan)
    models = ModelSet.from_plan(config)
    least = make_plan(config, models, 10**12).min_budget_bytes
    require_fit(make_plan(config, models, least))  # fits: returns
    assert make_plan(config, models, least).fits
    for below in (least - 1, least - MB):
        short = make_plan(config, models, below)
        assert not short.fits
        with pytest.raises(PacerError, match=r"needs at least .*, e\.g\. --max-memory \d+MB"):
            require_fit(short)
    assert make_plan(config, models, least + 1).min_budget_bytes == least  # a property of the plan


def test_alignment_stage_refuses_exactly_where_the_plan_does(tiny, tmp_path):
    """align.stage's own check and the planner's alignment figure are one function."""
    from pacer_stream.align.stage import peers_per_pass

    config = load_plan(write_plan(tmp_path, tiny, "pacer", extra="pacer: {enable_moe_upcycle: "
                                                                   "false}\n"))
    models = ModelSet.from_plan(config)
    graph = models.graph
    need = max(acct.align_unit_need(graph, u) for u in graph.units if u.tensors)
    d = graph.groups["residual"].size
    plan = make_plan(config, models, 10**12)
    assert plan.min_budget_bytes >= acct.budget_for(acct.align_bytes(need, d, 1))
    least = acct.budget_for(acct.align_bytes(need, d, 1))
    assert peers_per_pass(d, need, least, 2) >= 1
    with pytest.raises(PacerError, match="needs at least"):
        peers_per_pass(d, need, least - 1, 2)


# -- run refuses what plan refuses, before touching the disk ------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_run_refuses_an_impossible_budget_naming_the_minimum(tiny, tmp_path, method):
    plan = write_plan(tmp_path, tiny, method)
    result = CliRunner().invoke(main, ["run", str(plan), "--quiet", "--max-memory", "1MB"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacer-stream: error: "), result.stderr
    least = -(-min_budget(plan) // MB)
    assert f"--max-memory {least}MB" in lines[0]
    assert not NEGATIVE.search(lines[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_and_plan_agree_around_the_min_budget(tiny, tmp_path):
    plan = write_plan(tmp_path, tiny, "linear")
    least = min_budget(plan)
    proc = run_cli(plan, "--max-memory", str(least - MB))
    assert proc.returncode == 2 and "needs at least" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_cli(plan, "--max-memory", str(least))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    assert report["this_run"]["peak_rss_bytes"] <= least


# -- measured: peak RSS under budgets that the working sets fill ---------------------------

@pytest.fixture(scope="module")
def random_models(tmp_path_factory) -> list[Path]:
    """Three random bf16 Llama models (76 MB each) that disagree everywhere: PACER
    upcycles every block. The [32000, 512] embedding and head are the large tensors."""
    return random_llamas(tmp_path_factory.mktemp("random-llamas"), 3, hidden_size=512,
                         intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, vocab_size=32000)


def whole_embedding_budget(method: str, n: int = 3) -> int:
    """The smallest budget that merges the [32000, 512] bf16 embedding in one piece:
    its working set then fills the budget's share for tensors."""
    numel = 32000 * 512
    from pacer_stream.accounting import split_copies

    work = acct.copies_work(split_copies(n), n, 2, 2) if method == "split_merge" else \
        acct.merge_work(method, n, 2, 2)
    return acct.budget_for(work.bytes(numel, numel))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "split_merge", "pacer",
                                    "align-only"])
def test_peak_rss_stays_under_a_budget_the_working_set_fills(random_models, tmp_path, method):
    extra = "align: only\npacer: {max_sweeps: 1}\n" if method == "align-only" else ""
    plan = write_plan(tmp_path, random_models, "linear" if method == "align-only" else method,
                      extra=extra)
    least = min_budget(plan)
    # pacer and align-only: the alignment of the embedding sets the minimum, and the
    # merge's slices fill what it leaves; the others: the embedding just fits whole
    budget = least if method in ("pacer", "align-only") else whole_embedding_budget(method)
    assert budget >= least
    proc = run_cli(plan, "--max-memory", str(budget))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "pacer_report.json").read_text())
    peak = report["this_run"]["peak_rss_bytes"]
    assert peak <= budget, f"peak RSS {peak / MB:.0f} MB over the {budget / MB:.0f} MB budget"
    if method == "pacer":
        assert report["pacer"]["decision"]["blocks"] == [0, 1]  # experts were written
