"""Router calibration: the gate rows of every upcycled block, from sample tokens run
through the merged model as it was written (PACER's few-shot and data-free routers).

The stage runs after the merge pass has written every output tensor except the routers
of the upcycled blocks, and before any shard is renamed into place. Its inputs are the
written blocks, read back from the shards one tensor at a time, and the activations of
a few sample sequences (small: tokens × hidden size); its output is each upcycled
block's gate rows, written into that block's router slot::

    h_0 = embed(samples)
    for block l = 0 .. the last upcycled block:
        h'      = attention_l(h_l)                     (with its residual add)
        u       = mlp_input_l(h')                      the tokens' MLP (and router) inputs
        if l is upcycled:
            W_l = fit_gate(u of the fitting tokens, the expert of each token's model)
            W_l is written as block l's router (cast to the output dtype)
        h_{l+1} = h' + mlp_l(u)                        routed by the W_l just written

so each block's gate is fitted to the hidden states the exported model really produces
there, earlier routers included. No tool loads the model for this: only one block's
tensors are read at a time (a byte-bounded cache), never the whole model.

Which sequences fit the gate (methods/gate.py has the formula):

* ``few_shot``: the user's sample lines of every model (``pacer.router_samples``), minus
  a held-out share (``pacer.router_holdout``, every 5th line by default) on which the
  routing accuracy per block is measured and reported;
* ``data_free``: the sequences each model generates itself (self_samples.py), minus the
  same held-out share; with sample lines given as well, those only measure the gate.

Resumable: after each block the hidden states and the accuracies so far are saved
(:class:`~pacer_stream.state.PassCheckpoint`); a resumed run continues from the next
block and writes the same bytes. Everything runs on the CPU in fp32 (the gate fit in
fp64) with fixed batch sizes, so the rows do not depend on budget or ``--device``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import failpoints
from .errors import PacerError
from .methods.gate import fit_gate, routing_accuracy
from .runtime.router import read_lines as router_lines
from .state import PassCheckpoint

if TYPE_CHECKING:
    from .runtime.blocks import BlockModel

MAX_LINES = 512  # sample lines per model (the rest are ignored; say so in the report)
MAX_TOKENS = 256  # tokens per sample line
ATTENTION_BATCH = 16  # sequences per attention call: bounds the T × T scores
# fp32 copies of the samples' hidden states alive at once: h, the attention output, the
# MLP input u and the MLP output (the last two over chunks, counted whole to be safe)
ACTIVATION_COPIES = 4
TOKEN_CHUNK = 4096  # tokens per MLP call
Reader = Callable[[str], torch.Tensor]


@dataclass
class SampleSet:
    """The sequences run through the model, and what each is for."""

    inputs: torch.Tensor  # decoder: token ids [B, T] (right-padded); vit: pixel_values [B, C, H, W]
    lengths: torch.Tensor  # real tokens per sequence [B]
    model: torch.Tensor  # the model each sequence describes [B]
    fit: torch.Tensor  # bool [B]: fits the gate
    held_out: torch.Tensor  # bool [B]: measures it
    note: str = ""

    @property
    def width(self) -> int:
        """Positions per sequence: the padded length (decoders) or the tokens of an image."""
        return self.inputs.shape[1] if self.inputs.dim() == 2 else int(self.lengths.max())

    def token_mask(self, tokens: int) -> torch.Tensor:
        """[B, T] True where a position holds a real token."""
        return torch.arange(tokens)[None, :] < self.lengths[:, None]

    def of_model(self, k: int) -> "SampleSet":
        """Model k's sequences alone, decoder batches cut to their longest."""
        rows = self.model == k
        inputs = self.inputs[rows]
        if inputs.dim() == 2:
            inputs = inputs[:, :int(self.lengths[rows].max())]
        return SampleSet(inputs, self.lengths[rows], self.model[rows], self.fit[rows],
                         self.held_out[rows], self.note)


def activation_bytes(sequences: int, width: int, hidden: int) -> int:
    """What the stage holds for ``sequences`` of ``width`` positions: ACTIVATION_COPIES fp32
    [B, T, d] copies of their hidden states."""
    return sequences * width * hidden * 4 * ACTIVATION_COPIES


# -- samples -------------------------------------------------------------------------------

def held_out_lines(count: int, share: float) -> list[bool]:
    """Which of ``count`` lines are held out: evenly spread, e.g. every 5th for 0.2."""
    return [math.floor((i + 1) * share) > math.floor(i * share) for i in range(count)]


def read_lines(path: Path) -> list[str]:
    """A sample file's non-blank lines, as written (runtime.router reads and checks it)."""
    lines = [line for _, line in router_lines(path, "router sample file", strip=False)]
    if not lines:
        raise PacerError(f"router sample file {path} holds no non-empty line")
    return lines


def text_tokenizer(tokenizer_json: str | None, label: str) -> Callable[[str], list[int]]:
    """The model's own tokenizer (tokenizer.json, through the ``tokenizers`` package)."""
    if tokenizer_json is None:
        raise PacerError(f"{label} has no tokenizer.json, which the few-shot router needs to "
                         "tokenize the sample lines")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PacerError("the few-shot router tokenizes sample lines with the `tokenizers` "
                         "package: pip install tokenizers") from None
    tokenizer = Tokenizer.from_str(tokenizer_json)
    return lambda line: tokenizer.encode(line).ids


def text_samples(files: dict[int, Path], tokenize: Callable[[str], list[int]],
                 holdout: float) -> SampleSet:
    """Every model's sample lines, tokenized, as one right-padded batch."""
    rows, models, held, notes = [], [], [], []
    for k, path in sorted(files.items()):
        lines = read_lines(path)
        if len(lines) > MAX_LINES:
            notes.append(f"{path.name}: first {MAX_LINES} of {len(lines)} lines used")
            lines = lines[:MAX_LINES]
        for line, out in zip(lines, held_out_lines(len(lines), holdout)):
            ids = tokenize(line)[:MAX_TOKENS]
            if ids:
                rows.append(ids)
                models.append(k)
                held.append(out)
    width = max(len(r) for r in rows)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        inputs[i, :len(ids)] = torch.tensor(ids)
    held_t = torch.tensor(held)
    return SampleSet(inputs, torch.tensor([len(r) for r in rows]), torch.tensor(models),
                     ~held_t, held_t, "; ".join(notes))


def image_samples(files: dict[int, Path], holdout: float, tokens: int) -> SampleSet:
    """Every model's sample images (.npy of pixel_values [n, C, H, W])."""
    arrays, models, held = [], [], []
    for k, path in sorted(files.items()):
        try:
            images = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PacerError(f"router sample file {path}: not a .npy array of images "
                             f"({exc})") from None
        if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
            raise PacerError(f"router sample file {path}: expected float pixel_values "
                             f"[n, channels, height, width], got {images.dtype} {images.shape}")
        images = images[:MAX_LINES]
        arrays.append(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        models += [k] * len(images)
        held += held_out_lines(len(images), holdout)
    if len({a.shape[1:] for a in arrays}) > 1:
        raise PacerError("router sample images differ in shape between models")
    held_t = torch.tensor(held)
    inputs = torch.cat(arrays)
    return SampleSet(inputs, torch.full((len(inputs),), tokens), torch.tensor(models),
                     ~held_t, held_t)


# -- reading the written blocks ---------------------------------------------------------------

class TensorCache:
    """The last tensors read back, up to ``max_bytes``: a block's attention weights are
    used once per batch of sequences, and are read once."""

    def __init__(self, read: Reader, max_bytes: int) -> None:
        self.read, self.max_bytes = read, max_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.items:
            self.items.move_to_end(name)
            return self.items[name]
        tensor = self.read(name).float()
        size = tensor.numel() * 4
        while self.items and self.bytes + size > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * 4
        if size <= self.max_bytes:
            self.items[name] = tensor
            self.bytes += size
        return tensor


# -- the stage --------------------------------------------------------------------------------

class RouterCalibration:
    """Fits and writes the gate of every upcycled block (module docstring)."""

    def __init__(self, model: "BlockModel", read: Reader, write_router: Callable[[int, torch.Tensor], torch.Tensor],
                 samples: SampleSet, clusters: dict[int, list[int]], num_experts: int,
                 temperature: float, checkpoint: PassCheckpoint, cache_bytes: int) -> None:
        self.model, self.samples, self.clusters = model, samples, clusters
        self.m, self.temperature, self.checkpoint = num_experts, temperature, checkpoint
        self.get = TensorCache(read, cache_bytes)
        self.write_router = write_router  # (layer, rows fp64) -> the rows as written, fp32

    @property
    def last_layer(self) -> int:
        return max(self.clusters)

    def run(self, on_layer: Callable[[], None] = lambda: None) -> dict[str, dict]:
        """Every upcycled block's gate written; returns the accuracy per upcycled layer."""
        saved = self.checkpoint.load()
        if saved is not None:
            arrays, record = saved
            hidden, layer, report = torch.from_numpy(arrays["hidden"]), record["layer"], \
                record["report"]
        else:
            with torch.no_grad():
                hidden = self.model.embed(self.get, self.samples.inputs).float()
            layer, report = 0, {}
        while layer <= self.last_layer:
            with torch.no_grad():
                hidden, entry = self._block(layer, hidden)
            if entry is not None:
                report[str(layer)] = entry
            layer += 1
            self.checkpoint.save({"hidden": hidden.numpy()}, {"layer": layer, "report": report})
            failpoints.hit("calibrated-block")
            on_layer()
        return report

    def _block(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        mid = torch.cat([self.model.attention(self.get, layer, hidden[i:i + ATTENTION_BATCH])
                         for i in range(0, len(hidden), ATTENTION_BATCH)])
        u = self.model.mlp_input(self.get, layer, mid)
        entry, router = None, None
        if layer in self.clusters:
            router, entry = self._fit(layer, u)
        flat = u.reshape(-1, u.shape[-1])
        out = torch.cat([self.model.mlp(self.get, layer, flat[i:i + TOKEN_CHUNK], router=router)
                         for i in range(0, len(flat), TOKEN_CHUNK)])
        return mid + out.reshape(mid.shape), entry

    def _tokens(self, u: torch.Tensor, which: torch.Tensor, labels: list[int]):
        """The MLP inputs of the real tokens of the chosen sequences, and their experts."""
        mask = self.samples.token_mask(u.shape[1]) & which[:, None]
        expert = torch.tensor(labels)[self.samples.model][:, None].expand(mask.shape)
        return u[mask], expert[mask]

    def _fit(self, layer: int, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
        labels = self.clusters[layer]
        fit_u, fit_y = self._tokens(u, self.samples.fit, labels)
        try:
            rows = fit_gate(fit_u, fit_y, self.m) / self.temperature
        except ValueError as exc:
            raise PacerError(f"router calibration at block {layer}: {exc}") from None
        written = self.write_router(layer, rows)
        held_u, held_y = self._tokens(u, self.samples.held_out, labels)
        entry = {"calibration_accuracy": routing_accuracy(written, fit_u, fit_y),
                 "held_out_accuracy": routing_accuracy(written, held_u, held_y)
                 if len(held_y) else None,
                 "calibration_tokens": int(len(fit_y)), "held_out_tokens": int(len(held_y))}
        return written, entry


def routing_line(router: dict | None) -> str | None:
    """One line on the router of a run: its kind and the accuracy per upcycled block."""
    if not router:
        return None
    layers = router.get("layers") or {}
    parts = []
    for layer, entry in sorted(layers.items(), key=lambda item: int(item[0])):
        held = entry.get("held_out_accuracy")
        if held is not None:
            parts.append(f"{layer}: {held:.0%}")
    if not parts:  # the accuracy on the gate's own fitting tokens would flatter it
        return (f"router: {router['kind']}; routing not measured (give pacer.router_samples "
                "to measure it on real sample lines)")
    return (f"router: {router['kind']}; routing accuracy per upcycled block (held-out "
            f"sample tokens) {', '.join(parts)}")
