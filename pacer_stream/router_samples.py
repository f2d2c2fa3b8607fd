"""The plan's sample lines, read before the run touches the disk, and what they decide
up front: the vocabulary row weights, and whether RegMean and the router calibration
fit the budget. A bad sample file or a budget too small is refused with nothing written.
"""

from __future__ import annotations


from . import accounting as acct
from .calibration import activation_bytes, image_samples, text_samples, text_tokenizer
from .errors import PacerError
from .job import CALIBRATED_ROUTERS, MergeContext
from .methods.vocabulary import VOCABULARY_ROLES, row_weights, token_usage, usage_summary
from .regmean_pass import block_bytes
from .self_samples import LENGTH as GENERATED_LENGTH, SEQUENCES as GENERATED_SEQUENCES
from .sizes import format_size
from .stages.regmean import regmean_targets


def load_router_samples(ctx: MergeContext) -> None:
    """Read and tokenize the plan's sample lines into ``ctx``, and check what they feed."""
    pacer = ctx.config.pacer
    reads = ctx.upcycling or pacer.get("vocabulary") == "usage" \
        or pacer.get("dense") == "regmean"
    files, real = pacer["router_samples"] if reads else None, None
    if files:
        if ctx.models.spec.family == "vit":
            dims = ctx.anchor.config
            tokens = (dims["image_size"] // dims["patch_size"]) ** 2 + 1
            real = image_samples(files, pacer["router_holdout"], tokens)
        else:
            has = ctx.anchor.files.has("tokenizer.json")
            tokenize = text_tokenizer(ctx.anchor.files.read_text("tokenizer.json")
                                      if has else None, ctx.anchor.label)
            real = text_samples(files, tokenize, pacer["router_holdout"])
    ctx.real_samples = real
    ctx.samples = None if ctx.generates() else real  # generated in the run, else
    check_calibration_fits(ctx)
    check_regmean_fits(ctx)
    set_vocabulary_rows(ctx)


def set_vocabulary_rows(ctx: MergeContext) -> None:
    """pacer.vocabulary usage: the row weights r_k(t) of methods/vocabulary.py for every
    token-row tensor (the embedding table, an untied LM head), from the sample tokens."""
    ctx.vocab_rows, ctx.vocab_report = {}, None
    if ctx.config.method != "pacer" or ctx.config.pacer.get("vocabulary") != "usage" \
            or ctx.samples is None or ctx.models.spec.family == "vit":
        return
    names = [n for n, node in ctx.models.graph.nodes.items()
             if node.role in VOCABULARY_ROLES and n in ctx.anchor.tensors]
    if not names:
        return
    vocab = ctx.anchor.tensors[names[0]].shape[0]
    real = ctx.samples
    counts = token_usage(real.inputs, real.lengths, real.model, len(ctx.models.models), vocab)
    try:
        weights = row_weights(counts, ctx.params.weights)
    except ValueError:
        raise PacerError("pacer.vocabulary usage: a model's sample file has no token; give "
                         "every model sample lines, or use vocabulary: mean") from None
    if not ctx.params.normalize:
        weights = weights * sum(ctx.params.weights)
    ctx.vocab_rows = {n: weights.float() for n in names
                      if ctx.anchor.tensors[n].shape[:1] == (vocab,)}
    ctx.vocab_report = {"rule": "usage", "tensors": sorted(ctx.vocab_rows),
                        **usage_summary(counts)}


def check_regmean_fits(ctx: MergeContext) -> None:
    """The RegMean pass holds every model's sample activations and one block's Gram
    matrices (regmean_pass.block_bytes): refuse up front a budget that cannot."""
    if not ctx.uses_regmean():
        return
    if ctx.samples is not None:
        sequences, width = len(ctx.samples.inputs), ctx.samples.width
    else:  # data-free, before generation
        sequences = len(ctx.models.models) * GENERATED_SEQUENCES
        width = 1 + GENERATED_LENGTH
    shapes = {n: tuple(info.shape) for n, info in ctx.anchor.tensors.items()}
    widest = max((block_bytes(t, shapes) for t in regmean_targets(ctx).values()), default=0)
    need = activation_bytes(sequences, width, ctx.models.graph.dims["residual"]) + widest
    if need > acct.usable(ctx.budget):
        raise PacerError(f"the RegMean pass needs {format_size(need)} for the samples' "
                         f"hidden states and one block's Gram matrices, more than "
                         f"--max-memory {format_size(ctx.budget)} leaves for tensors; use "
                         "fewer or shorter sample lines, pacer.dense: mean, or a budget "
                         f"of at least {format_size(acct.budget_for(need))}")


def check_calibration_fits(ctx: MergeContext) -> None:
    """The calibration stage keeps the samples' hidden states in memory (beside one
    block's tensors): refuse up front a budget that cannot hold them."""
    if not ctx.upcycling or not ctx.can_route() \
            or ctx.chosen_router() not in CALIBRATED_ROUTERS:
        return
    real = ctx.real_samples
    sequences, width = (len(real.inputs), real.width) if real else (0, 0)
    if ctx.chosen_router() == "data_free":  # generated samples join the lines
        sequences += len(ctx.models.models) * GENERATED_SEQUENCES
        width = max(width, 1 + GENERATED_LENGTH)
    need = activation_bytes(sequences, width, ctx.models.graph.dims["residual"])
    if need > acct.usable(ctx.budget) // 2:
        raise PacerError(f"the router samples' hidden states take {format_size(need)}, more "
                         f"than half of what --max-memory {format_size(ctx.budget)} leaves "
                         "for tensors; use fewer or shorter sample lines, or raise the "
                         f"budget to at least {format_size(acct.budget_for(2 * need))}")
