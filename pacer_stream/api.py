"""The Python API, in PacerKit's shape::

    from pacer_stream import PACERMerger

    merger = PACERMerger(["./ft1", "./ft2", "./ft3"])
    summary = merger.merge(interference_threshold=0.35, top_k_experts=2,
                           output_path="./merged_model")
    summary["exported_as"], summary["upcycled_blocks"]   # "qwen2_moe", [2]

It builds the same plan a YAML file would and runs the same streamed, resumable
merge, so ``merge`` writes exactly the files ``pacer-stream run`` writes for the
equivalent plan.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Callable

from .config import parse_plan
from .errors import PacerError
from .executor import RunOptions
from .run import run_merge
from .sizes import parse_size


class PACERMerger:
    """Merge ``models`` (local folders or hub ids) with PACER.

    ``base_model`` switches the dense merge and the interference metric to
    task vectors; ``max_memory`` is a size such as ``"16GB"``.
    """

    def __init__(self, models: list[str], base_model: str | None = None, *,
                 project_name: str = "pacer-merge", seed: int = 0, max_memory: str | None = None,
                 device: str = "cpu", quiet: bool = True) -> None:
        self.models = [str(m) for m in models]
        self.base_model = base_model
        self.project_name = project_name
        self.seed = seed
        self.options = RunOptions(budget=parse_size(max_memory, "max_memory") if max_memory
                                  else None, device=device, quiet=quiet)
        # for the model card; max_memory and quiet do not change the output
        self._init_call = call_form("PACERMerger", self.__init__, [self.models], {
            "base_model": base_model, "project_name": project_name, "seed": seed,
            "device": device})

    def merge(self, output_path: str | Path = "./merged_model", *,
              interference_threshold: float = 0.35, top_k_experts: int = 2,
              dropout_rate: float | None = None, anchor_strategy: str = "first",
              enable_moe_upcycle: bool = True, shard_size: str = "5GB",
              target: str = "transformers", restart: bool = False, force: bool = False,
              **pacer_options: Any) -> dict:
        """Run the merge; returns a summary (output, export format, upcycled blocks, sizes).

        Further ``pacer_options`` are the plan's ``pacer`` keys, e.g.
        ``max_param_growth=1.36`` or ``max_experts=2``. ``dropout_rate`` is PacerKit's
        DARE rate; PACER's dense layers are the models' mean, so a value is refused.
        ``target`` is the plan's ``output.target`` (``"llama.cpp"``: every block a MoE
        block). ``restart`` and ``force`` are ``pacer-stream run``'s ``--restart`` (discard
        this output's earlier, unfinished or changed run) and ``--force`` (overwrite a
        folder that holds something else).
        """
        raw = {
            "project_name": self.project_name, "models": self.models, "method": "pacer",
            "seed": self.seed,
            "output": {"path": str(output_path), "shard_size": shard_size, "target": target},
            "pacer": {"interference_threshold": interference_threshold,
                      "top_k_experts": top_k_experts, "anchor_strategy": anchor_strategy,
                      "enable_moe_upcycle": enable_moe_upcycle, **pacer_options},
        }
        if self.base_model is not None:
            raw["base_model"] = self.base_model
        if dropout_rate is not None:
            raw["pacer"]["dropout_rate"] = dropout_rate
        config = parse_plan(raw, base_dir=Path.cwd(), label="PACERMerger")
        call = call_form("merger.merge", self.merge, [str(output_path)], {
            "interference_threshold": interference_threshold, "top_k_experts": top_k_experts,
            "dropout_rate": dropout_rate, "anchor_strategy": anchor_strategy,
            "enable_moe_upcycle": enable_moe_upcycle, "shard_size": shard_size,
            "target": target, **pacer_options})  # restart and force change no output
        command = ("from pacer_stream import PACERMerger", "",
                   f"merger = {self._init_call}", call)
        try:
            summary = run_merge(config, dataclasses.replace(self.options, command=command,
                                                            restart=restart, force=force))
        except PacerError as exc:
            raise PacerError(api_advice(str(exc))) from None
        return summarize(summary.out_dir)


# the CLI options an error may advise, as the Python API spells them
API_SPELLING = {"--restart": "restart=True", "--force": "force=True",
                "--max-memory": "max_memory"}


def api_advice(message: str) -> str:
    """An engine error whose advice names CLI options, with the API's arguments instead."""
    for option, argument in API_SPELLING.items():
        message = re.sub(re.escape(option) + r"(?![\w-])", argument, message)
    return message


def call_form(name: str, func: Callable, args: list, kwargs: dict[str, Any]) -> str:
    """``name(args..., key=value, ...)`` with the keywords that differ from ``func``'s
    defaults: the call as the model card records it (deterministic, so a resumed merge
    writes the same card)."""
    defaults = inspect.signature(func).parameters
    given = [repr(a) for a in args] + [
        f"{k}={v!r}" for k, v in kwargs.items()
        if k not in defaults or defaults[k].default is inspect.Parameter.empty
        or defaults[k].default != v]
    return f"{name}({', '.join(given)})"


def summarize(out_dir: Path) -> dict:
    """The essentials of a finished run, from its ``pacer_report.json``."""
    import json

    from .executor import REPORT

    report = json.loads((Path(out_dir) / REPORT).read_text())
    pacer = report.get("pacer") or {}
    blocks = [b["layer"] for b in pacer.get("blocks", []) if b["upcycled"]]
    return {
        "output_path": str(out_dir),
        "exported_as": pacer.get("exported_as", "dense"),
        "upcycled_blocks": blocks,
        "num_experts": pacer.get("decision", {}).get("num_experts", 1) if blocks else 1,
        "parameters": pacer.get("parameters"),
        "interference": {b["layer"]: b.get("mlp", {}).get("interference")
                         for b in pacer.get("blocks", [])},
        "report": report,
    }
