"""Data-free samples: each model writes its own.

A fine-tuned model's samples are the best description of its data that needs no data:
sampled at temperature 1 from the start token, an expert on German man pages writes German
man-page text, an expert on Python writes Python. ``router: data_free`` without sample
files takes these sequences wherever the few-shot path takes the user's lines: the gate
fit (calibration.py), RegMean (regmean_pass.py) and the token rows (methods/vocabulary.py).
Measured on benchmarks/quality set A: with generated samples, pacer's dense path kept
+0.14 mean retention and the 1.36x budget +0.18, as with 32 real lines per domain
(+0.15, +0.18); the first data-free router here (i.i.d. tokens from the embedding
deviations) routed below chance.

Generation, for model k::

    tokens = [start] * SEQUENCES
    repeat LENGTH times:  p = softmax(forward_k(tokens)[:, -1]);  tokens += sample(p)

with a generator seeded by (plan seed, k), on the CPU in fp32 (the softmax in fp64): the
same tokens on every run and device. Each step runs one new position through every block
with the keys and values of the earlier ones cached (runtime/decoder_blocks.py ``step``), reading
the tensors through a byte-bounded cache (calibration.TensorCache): a model that fits it
is read once, a larger one once per step, LENGTH times. A sequence ends at the model's
end-of-sequence token (its length stops there; later tokens are padding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .calibration import SampleSet, held_out_lines
from .errors import PacerError
from .seeding import generator

if TYPE_CHECKING:
    from .runtime.blocks import BlockModel

SEQUENCES = 32  # per model
LENGTH = 64  # generated tokens per sequence, after the start token
Reader = Callable[[str], torch.Tensor]


def writes_samples(config: dict) -> bool:
    """Whether a model of this config.json can write samples: the decoders runtime/blocks.py
    runs (not a ViT, not an encoder)."""
    from .runtime.block_families import DECODERS

    return config.get("model_type") in DECODERS


def start_token(config: dict, tokenize: Callable[[str], list[int]] | None) -> int:
    """What generation starts from: the tokenizer's BOS (what it adds to an empty text),
    else config.json's bos_token_id, else its eos_token_id (Qwen-style models start a
    document after <|endoftext|>)."""
    if tokenize is not None:
        ids = tokenize("")
        if ids:
            return int(ids[0])
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise PacerError("data-free samples: the model has no start token (no BOS in its "
                     "tokenizer, no bos_token_id or eos_token_id in config.json); give "
                     "pacer.router_samples instead")


def end_tokens(config: dict) -> set[int]:
    value = config.get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}


def generate(model: "BlockModel", get: Reader, start: int, ends: set[int], seed: int, k: int,
             sequences: int = SEQUENCES, length: int = LENGTH,
             on_step: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [sequences, 1 + length], lengths [sequences]) that model k writes."""
    gen = generator(seed, "self-samples", k)
    tokens = torch.full((sequences, 1), start, dtype=torch.long)
    lengths = torch.full((sequences,), 1 + length, dtype=torch.long)
    cache: dict = {}
    with torch.no_grad():
        for step in range(length):
            logits = model.step(get, tokens[:, -1:], cache).double()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            tokens = torch.cat([tokens, nxt], dim=1)
            ended = torch.isin(nxt[:, 0], torch.tensor(sorted(ends), dtype=torch.long))
            lengths = torch.where(ended & (lengths > step + 2), torch.tensor(step + 2), lengths)
            on_step()
    return tokens, lengths


def sample_set(generated: list[tuple[torch.Tensor, torch.Tensor]], holdout: float) -> SampleSet:
    """Every model's generated sequences; a held-out share of each measures the gate."""
    held = torch.cat([torch.tensor(held_out_lines(len(t), holdout)) for t, _ in generated])
    return SampleSet(torch.cat([t for t, _ in generated]), torch.cat([n for _, n in generated]),
                     torch.cat([torch.full((len(t),), k) for k, (t, _) in enumerate(generated)]),
                     ~held, held, "samples each model generated")


def measured_on(fit: SampleSet, real: SampleSet) -> SampleSet:
    """The generated sequences all fit the gate; the user's lines only measure it."""
    width = max(fit.inputs.shape[1], real.inputs.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    return SampleSet(torch.cat([pad(fit.inputs), pad(real.inputs)]),
                     torch.cat([fit.lengths, real.lengths]), torch.cat([fit.model, real.model]),
                     torch.cat([torch.ones_like(fit.fit), torch.zeros_like(real.fit)]),
                     torch.cat([torch.zeros_like(fit.fit), torch.ones_like(real.fit)]),
                     fit.note + "; the sample lines measure the gate")
