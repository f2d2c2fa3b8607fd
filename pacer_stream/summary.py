"""What a run did: the summary it returns and the lines the CLI prints from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .sizes import format_size


def align_lines(align: dict | None, unconverged_only: bool = False) -> list[str]:
    """One line per aligned peer of a report's "align" section: converged or stopped by the
    cap, what moved per group kind, certificate hits. ``unconverged_only``: just the peers
    whose record says the cap stopped them (``converged`` false)."""
    lines = []
    for label, peer in (align or {}).get("peers", {}).items():
        # Stopped by the safety cap rather than converged: say it plainly, with the fix.
        converged = peer.get("converged", True)
        if unconverged_only and converged:
            continue
        kinds = ", ".join(f"{kind} {k['moved'] / k['slots']:.0%}" if k["slots"] else kind
                          for kind, k in sorted(peer["kinds"].items()))
        problems = sum(k["problems"] for k in peer["kinds"].values())
        certified = sum(k["certified"] for k in peer["kinds"].values())
        cap = peer.get("max_sweeps", peer["sweeps"])
        status = (f"converged after {peer['sweeps']} sweep(s)" if converged else
                  f"NOT converged after {peer['sweeps']} sweeps (cap max_sweeps = {cap})")
        advice = "" if converged else ("; raise pacer.max_sweeps in the plan and run it "
                                       "again with --restart")
        lines.append(f"aligned {label}: {status}, moved {kinds}; "
                     f"{certified}/{problems} assignments certified identity; objective "
                     f"{peer['objective_before']:.4g} -> {peer['objective_after']:.4g}"
                     + advice)
    return lines


@dataclass
class RunSummary:
    out_dir: Path
    seconds: float = 0.0
    read_bytes: int = 0
    write_bytes: int = 0
    peak_rss: int = 0
    budget: int = 0
    units_done: list[str] = field(default_factory=list)
    units_skipped: list[str] = field(default_factory=list)
    already_complete: bool = False
    align: dict | None = None  # the report's "align" section, when the run aligned
    pacer: dict | None = None  # the report's "pacer" section, when the run upcycled or could have
    dense: dict | None = None  # the report's "dense" section (pacer runs)
    vocabulary: dict | None = None  # and its "vocabulary" section

    def align_lines(self) -> list[str]:
        """One line per aligned peer (see :func:`align_lines`)."""
        return align_lines(self.align)

    def pacer_line(self) -> str | None:
        """What PACER's phase 3 did: which blocks became experts, and the size it cost."""
        if not self.pacer:
            return None
        d, growth = self.pacer["decision"], self.pacer["parameters"]["growth"]
        worst = max(self.pacer["blocks"], key=lambda b: b.get("mlp", {}).get("interference", 0),
                    default=None)
        peak = (f"; highest MLP interference {worst['mlp']['interference']:.3f} at block "
                f"{worst['layer']}" if worst and "mlp" in worst else "")
        if self.pacer["exported_as"] == "dense":
            return f"no MLP block upcycled ({d['note'] or d['mode']}){peak}"
        target = self.pacer.get("target") or {}
        cost = (f" (target llama.cpp: every block a MoE block; the default layout would be "
                f"x{target['default_parameters'] / self.pacer['parameters']['source']:.3f})"
                if "default_parameters" in target else "")
        return (f"upcycled MLP blocks {d['blocks']} to {d['num_experts']} experts (top-{d['top_k']}"
                f" router) -> {self.pacer['exported_as']}, parameters x{growth:.3f}{cost}{peak}")

    def dense_line(self) -> str | None:
        """PACER's dense rule, when samples changed it from the plain mean."""
        dense, vocabulary = self.dense or {}, self.vocabulary
        regmean = dense.get("rule") == "regmean"
        if not regmean and not vocabulary:
            return None
        parts = []
        if regmean:
            parts.append(f"{dense['tensors']} linear layers by RegMean (alpha {dense['alpha']})")
        if vocabulary:
            parts.append(f"token rows by usage ({vocabulary['rows_used']} of "
                         f"{vocabulary['rows']} rows seen)")
        return f"dense layers: {'; '.join(parts)}, from {dense.get('samples', 'the samples')}"

    def line(self) -> str:
        if self.already_complete:
            return f"{self.out_dir}: already complete, nothing to do"
        rate = self.read_bytes / self.seconds if self.seconds > 0 else 0.0
        skipped = f", {len(self.units_skipped)} resumed" if self.units_skipped else ""
        return (f"merged {len(self.units_done)} units{skipped} in {self.seconds:.1f} s: read "
                f"{format_size(self.read_bytes)} ({format_size(rate)}/s), wrote "
                f"{format_size(self.write_bytes)}, peak RSS {format_size(self.peak_rss)} "
                f"(budget {format_size(self.budget)}) -> {self.out_dir}")
