"""The RegMean pass: each model runs its own sample lines, block by block; every linear layer
that is merged dense gets the RegMean solution of methods/regmean.py.

It runs before the merge pass (after alignment and the upcycling decision). For block L:

1. every model k carries the hidden states of its own samples to block L's input, through
   its own (aligned) weights, read one tensor at a time (runtime/blocks.py);
2. while block L runs, the inputs of its linear layers are observed: G_k per input (q, k
   and v share one; gate and up share one), averaged over model k's real tokens, shrunk;
3. G_k and model k's copies of the tensors reading that input go into a RegMeanSum; after
   the last model, each tensor's solution is stored (``store``) in the output dtype;
4. the hidden states are checkpointed with the position, so a killed run resumes at the
   block it was in, like the calibration stage.

The merge pass then writes the stored solution instead of the mean. Upcycled blocks keep
their MLPs as experts, so only their attention is solved here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from . import failpoints
from .errors import PacerError
from .calibration import ATTENTION_BATCH, TOKEN_CHUNK, SampleSet
from .methods.regmean import RegMeanSum, gram, shrink
from .state import PassCheckpoint

if TYPE_CHECKING:
    from .runtime.blocks import BlockModel

Reader = Callable[[str], torch.Tensor]
# The linear layers RegMean solves, by arch role, and which input they read.
INPUT_OF_ROLE = {"attn.q": "attn.in", "attn.k": "attn.in", "attn.v": "attn.in",
                 "attn.o": "attn.out", "mlp.gate": "mlp.in", "mlp.up": "mlp.in",
                 "mlp.down": "mlp.mid"}


def block_bytes(targets: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> int:
    """What one block of the pass holds beside the activations: per input, a model's Gram and
    the running sum (float64), per tensor its running right-hand side (float64) and one fp32
    copy of a model's tensor as read."""
    inputs = {site: shapes[n][1] for n, site in targets.items()}
    return sum(16 * d * d for d in inputs.values()) + \
        sum(12 * shapes[n][0] * shapes[n][1] for n in targets)


class RegMeanPass:
    """Solves and stores every target tensor (module docstring)."""

    def __init__(self, model: "BlockModel", readers: list[Reader], samples: list[SampleSet],
                 weights: tuple[float, ...], targets: dict[int, dict[str, str]], alpha: float,
                 store: Callable[[str, torch.Tensor], None], checkpoint: PassCheckpoint) -> None:
        self.model, self.readers, self.samples, self.weights = model, readers, samples, weights
        self.targets = targets  # layer -> {tensor name: its input}
        self.alpha, self.store, self.checkpoint = alpha, store, checkpoint

    @property
    def last_layer(self) -> int:
        return max(self.targets) if self.targets else -1

    def run(self, on_layer: Callable[[], None] = lambda: None) -> None:
        saved = self.checkpoint.load()
        if saved is not None:
            arrays, record = saved
            hidden = [torch.from_numpy(arrays[f"hidden{k}"]) for k in range(len(self.readers))]
            layer = record["layer"]
        else:
            with torch.no_grad():
                hidden = [self.model.embed(read, s.inputs).float()
                          for read, s in zip(self.readers, self.samples)]
            layer = 0
        while layer <= self.last_layer:
            with torch.no_grad():
                hidden = self._block(layer, hidden)
            layer += 1
            self.checkpoint.save({f"hidden{k}": h.numpy() for k, h in enumerate(hidden)},
                                 {"layer": layer})
            failpoints.hit("regmean-block")
            on_layer()

    def _block(self, layer: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        targets = self.targets.get(layer, {})
        sums: dict[str, RegMeanSum] = {}
        out = []
        for k, (read, own) in enumerate(zip(self.readers, self.samples)):
            grams: dict[str, torch.Tensor] = {}
            mask = own.token_mask(hidden[k].shape[1])
            self.model.observer = self._observer(targets, grams)
            try:
                out.append(self._forward(read, layer, hidden[k], mask))
            finally:
                self.model.observer = None
            tokens = max(int(mask.sum()), 1)
            for site, g in grams.items():
                names = {n: read(n) for n, s in targets.items() if s == site}
                sums.setdefault(site, RegMeanSum()).add(shrink(g / tokens, self.alpha),
                                                        self.weights[k], names)
            del grams
        for site, total in sums.items():
            try:
                solved = total.solve()
            except ValueError as exc:
                raise PacerError(f"RegMean at block {layer} ({site}): {exc}; use pacer.dense: "
                                 "mean") from None
            for name, w in solved.items():
                self.store(name, w)
        return out

    def _observer(self, targets: dict[str, str], grams: dict[str, torch.Tensor]):
        """Adds the real tokens' x^T x to the Gram of the input each observed module reads;
        modules sharing one input (q, k and v get the same tensor) add it once."""
        last: dict[str, torch.Tensor] = {}  # held, so a new input is never the same object

        def observe(module: str, x: torch.Tensor) -> None:
            site = targets.get(module + ".weight")
            if site is None or last.get(site) is x:
                return
            last[site] = x
            g = gram(x[self._real])
            grams[site] = g if site not in grams else grams[site].add_(g)

        return observe

    def _forward(self, read: Reader, layer: int, hidden: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """One block, in the calibration stage's batches; ``_real`` tells the observer which
        positions of each call are real tokens (attention: [b, T]; MLP: flattened)."""
        mids = []
        for i in range(0, len(hidden), ATTENTION_BATCH):
            self._real = mask[i:i + ATTENTION_BATCH]
            mids.append(self.model.attention(read, layer, hidden[i:i + ATTENTION_BATCH]))
        mid = torch.cat(mids)
        u = self.model.mlp_input(read, layer, mid)
        flat, real = u.reshape(-1, u.shape[-1]), mask.reshape(-1)
        outs = []
        for i in range(0, len(flat), TOKEN_CHUNK):
            self._real = real[i:i + TOKEN_CHUNK]
            outs.append(self.model.mlp(read, layer, flat[i:i + TOKEN_CHUNK]))
        return mid + torch.cat(outs).reshape(mid.shape)
