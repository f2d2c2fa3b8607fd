"""The generate stage: data-free samples, each model writing its own (self_samples.py).

Kept in the run state per model, so a resumed run generates only the models it had
not finished. The samples then feed RegMean, the vocabulary rows and the gate.
"""

from __future__ import annotations

import torch

from .. import accounting as acct
from .. import failpoints
from ..calibration import TensorCache, text_tokenizer
from ..job import MergeContext
from ..router_samples import check_regmean_fits, set_vocabulary_rows
from ..self_samples import LENGTH, end_tokens, generate, sample_set, start_token


class GenerateStage:
    name = "generate"

    def run(self, ctx: MergeContext, runner) -> None:
        from ..runtime.blocks import BlockModel

        group = runner.state.group.require_group("generated")
        config = ctx.anchor.config
        tokenize = text_tokenizer(ctx.anchor.files.read_text("tokenizer.json"), "") \
            if ctx.anchor.files.has("tokenizer.json") else None
        start, ends = start_token(config, tokenize), end_tokens(config)
        generated = []
        with runner.progress(len(ctx.models.models) * LENGTH, "data-free samples",
                             unit="token") as bar:
            for k, index in enumerate(ctx.models.models):
                if f"tokens{k}" in group.attrs.get("done", []):
                    tokens = torch.from_numpy(group[f"tokens{k}"][...])
                    lengths = torch.from_numpy(group[f"lengths{k}"][...])
                    bar.update(LENGTH)
                else:
                    def read(name: str, index=index) -> torch.Tensor:
                        ctx.summary.read_bytes += index.tensors[name].nbytes
                        return index.read(name, None)

                    model = BlockModel.from_config(index.config, index.tensors.keys())
                    get = TensorCache(read, max(acct.usable(ctx.budget) // 2, 1 << 26))
                    tokens, lengths = generate(model, get, start, ends, ctx.config.seed, k,
                                               on_step=lambda: bar.update(1))
                    for name, values in ((f"tokens{k}", tokens), (f"lengths{k}", lengths)):
                        group.create_array(name, shape=tuple(values.shape), dtype="int64",
                                           overwrite=True)[...] = values.numpy()
                    group.attrs["done"] = [*group.attrs.get("done", []), f"tokens{k}"]
                    failpoints.hit("generated-model")
                generated.append((tokens, lengths))
        ctx.samples = sample_set(generated, ctx.config.pacer["router_holdout"])
        check_regmean_fits(ctx)
        set_vocabulary_rows(ctx)
