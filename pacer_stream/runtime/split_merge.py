"""Serve many experts from one loaded model: specialize its weights in place, per input.

Split-Merge (the output of ``method: split_merge``) stores expert t as μ + c_t·η:
μ is a normal HF checkpoint, η one sparse direction, c_t one scalar per expert.
With router weights α̂ (see :mod:`.router`) the routed model is::

    θ(x) = μ + c(x)·η,    c(x) = Σ_t α̂_t(x) c_t

so switching experts costs one scatter-add over η's k elements, not a reload.

    sm = SplitMergeModel.load("out/split")
    with sm.specialize(sm.coefficient({"math": 0.8, "code": 0.2})):
        logits = sm.model(ids).logits              # μ + c·η
    # here sm.model is μ again, bit for bit

The task-vector form, when the experts and their base are kept as checkpoints::

    θ(x) = θ_base + Σ_i α̂_i(x) Δ_i,    Δ_i = θ_i − θ_base

is :class:`TaskVectorModel`. Either way the weights are restored on exit by
writing back the saved original values (never by subtracting, which would
leave rounding residue), so the model is bit-identical after every use, even
when the body raises.

The output folder (μ, ``eta.safetensors``, ``split_merge.json``) is read by
:mod:`.split_output`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import PacerError
from .embedder import quiet_loading
from .router import RouterBank
from .split_output import Eta, combine, load_eta, match_experts, read_info

Edit = tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]


# -----------------------------------------------------------------------------
# in-place edits, restored bit-exactly

def load_model(folder: str | Path, model_cls=None, dtype: torch.dtype = torch.float32):
    """A transformers model from a local checkpoint folder, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PacerError(f"{folder}: no config.json; give a checkpoint folder")
    try:
        import transformers
    except ImportError:
        raise PacerError("the runtime needs transformers: pip install transformers") from None
    cls = model_cls or transformers.AutoModelForCausalLM
    try:
        with quiet_loading():
            model = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PacerError(f"{folder}: cannot load it with {cls.__name__} ({first})") from None
    return model.eval()


def unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict name -> detached tensor, one name per storage: tied weights appear once."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t.detach()
    return out


def find_tensor(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> str | None:
    """The state_dict name of checkpoint tensor ``name`` (bare models lack the prefix)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    return next((c for c in candidates if c in state), None)


@contextmanager
def edited(edits: Iterator[Edit]) -> Iterator[None]:
    """Apply ``(tensor, flat indices | None, new_values_fn)`` in place; restore on exit.

    ``new_values_fn(old)`` gets the original values at those positions and returns
    the new ones in the tensor's dtype. The originals are saved before each write,
    so a failure half way (or in the with-body) restores everything touched.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for tensor, idx, fn in edits:
                flat = tensor.view(-1)  # parameters are contiguous: a view, not a copy
                old = flat.clone() if idx is None else flat[idx]  # advanced index: a copy
                saved.append((flat, idx, old))
                if idx is None:
                    flat.copy_(fn(old))
                else:
                    flat[idx] = fn(old)
        yield
    finally:
        with torch.no_grad():
            for flat, idx, old in reversed(saved):
                if idx is None:
                    flat.copy_(old)
                else:
                    flat[idx] = old


class SplitMergeModel:
    """μ loaded once, η and the c_t; :meth:`specialize` turns μ into μ + c·η in place.

    Memory: one model in ``dtype`` plus η (k values and k int64 indices for
    sparse tensors, 4 bytes an element for dense ones); while specialized, a copy
    of the touched original values.

    η names are matched to ``model.state_dict()`` names (a bare ``AutoModel``
    lacks the ``base_model_prefix``: both spellings are tried). Tied weights share
    one storage, so only the first η name (in name order) that reaches a storage is
    applied; the others are listed in ``tied``. η tensors the model class does not
    have (an LM head under ``AutoModel``) are listed in ``skipped``.

    >>> sm = SplitMergeModel.load("out/split")                       # doctest: +SKIP
    >>> with sm.specialize(sm.coefficient({"math": 0.7, "code": 0.3})):  # doctest: +SKIP
    ...     out = sm.model.generate(ids)
    """

    def __init__(self, model: torch.nn.Module, eta: Eta, info: dict, folder: Path) -> None:
        self.model, self.info, self.folder = model, info, folder
        self.labels: list[str] = [str(m) for m in info["models"]]
        self.coefficients: list[float] = [float(c) for c in info["coefficients"]]
        self.targets: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.skipped: list[str] = []  # η names with no tensor here (e.g. a head the class drops)
        self.tied: list[str] = []  # η names whose storage another η name already updates
        self._active = False
        state = model.state_dict(keep_vars=True)
        storages: set[int] = set()
        for name, (idx, values) in eta.items():
            found = find_tensor(model, state, name)
            if found is None:
                self.skipped.append(name)
                continue
            tensor = state[found].detach()
            self._check(name, tensor, idx, values)
            if tensor.data_ptr() in storages:  # tied weights: update the storage once
                self.tied.append(name)
                continue
            storages.add(tensor.data_ptr())
            self.targets.append((found, tensor, idx, values))
        if eta and not self.targets:
            raise PacerError(f"{folder}: none of η's tensors ({', '.join(list(eta)[:3])}...) is "
                             f"in the loaded {type(model).__name__}; load μ with the model "
                             "class it was trained as")

    def _check(self, name: str, tensor: torch.Tensor, idx: torch.Tensor | None,
               values: torch.Tensor) -> None:
        where = f"{self.folder / self.info['eta']}: {name}"
        if not tensor.is_contiguous():
            raise PacerError(f"{where}: the model keeps this tensor non-contiguous; cannot "
                             "specialize it in place")
        if idx is None and tuple(values.shape) != tuple(tensor.shape):
            raise PacerError(f"{where}: dense η has shape {list(values.shape)} but μ's tensor "
                             f"is {list(tensor.shape)}; η and μ are from different merges")
        if idx is not None and idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= tensor.numel()):
            raise PacerError(f"{where}: η indices run past the tensor's {tensor.numel()} "
                             "elements; η and μ are from different merges")

    @classmethod
    def load(cls, folder: str | Path, model_cls=None,
             dtype: torch.dtype = torch.float32) -> "SplitMergeModel":
        """μ with transformers (``model_cls``: default AutoModelForCausalLM), η, the c_t."""
        folder = Path(folder)
        info = read_info(folder)
        eta = load_eta(folder, info)
        return cls(load_model(folder, model_cls, dtype), eta, info, folder)

    def coefficient(self, weights: dict[str | int, float]) -> float:
        """c = Σ_t α̂_t c_t, with experts named by label, basename or index."""
        return combine(self.labels, self.coefficients, weights)

    @contextmanager
    def specialize(self, c: float) -> Iterator[float]:
        """Inside: each η tensor is μ + c·η (fp32 math, cast to μ's dtype); after: μ exactly."""
        c = float(c)
        if not math.isfinite(c):
            raise PacerError(f"coefficient must be a finite number, got {c}")
        if self._active:
            raise PacerError("this model is already specialized; leave that with-block first")

        def edits() -> Iterator[Edit]:
            for _, tensor, idx, values in self.targets:
                flat_values = values.reshape(-1)
                # Same op order as `pacer-stream materialize`: old + (c·η), then cast.
                yield tensor, idx, lambda old, v=flat_values, t=tensor: \
                    (old.float() + c * v).to(t.dtype)

        self._active = True
        try:
            with edited(edits()):
                yield c
        finally:
            self._active = False

    @contextmanager
    def for_text(self, text: str, bank: RouterBank, temperature: float | None = None,
                 top_k: int | None = None) -> Iterator[float]:
        """specialize(Σ_t α̂_t(text) c_t): route ``text`` with ``bank``; yields c.

        ``temperature``: τ of the routing; None (the default) is the bank's own,
        ``bank.temperature`` (0.08 / N unless the router was built with another).
        """
        match_experts(bank.names, self.labels)
        with self.specialize(self.coefficient(bank.weights(text, temperature, top_k))) as c:
            yield c


class TaskVectorModel:
    """θ_base loaded once plus Δ_i = θ_i − θ_base (fp32, in memory) for each expert.

    Memory: the base model plus N × (parameters × 4 bytes) for the deltas (tensors
    where an expert equals the base are not stored), plus, while specialized, a
    copy of the touched tensors.

    >>> tv = TaskVectorModel.load("base", {"math": "ft-math", "code": "ft-code"})  # doctest: +SKIP
    >>> with tv.specialize({"math": 0.25, "code": 0.75}):                         # doctest: +SKIP
    ...     logits = tv.model(ids).logits
    """

    def __init__(self, model: torch.nn.Module, deltas: dict[str, dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.names = list(deltas)
        self.deltas = deltas  # expert -> state_dict name -> fp32 Δ
        self.tensors = unique_tensors(model)
        self._active = False

    @classmethod
    def load(cls, base_folder: str | Path, expert_folders: dict[str, str | Path], model_cls=None,
             dtype: torch.dtype = torch.float32) -> "TaskVectorModel":
        """Load the base once; load each expert in turn, keep only its fp32 delta."""
        if not expert_folders:
            raise PacerError("TaskVectorModel needs at least one expert folder")
        model = load_model(base_folder, model_cls, dtype)
        base = unique_tensors(model)
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        for name, folder in expert_folders.items():
            expert = load_model(folder, model_cls or type(model), dtype)
            theirs = expert.state_dict()
            deltas[name] = {}
            for key, tensor in base.items():
                if key not in theirs or theirs[key].shape != tensor.shape:
                    raise PacerError(f"{folder}: tensor {key} is missing or has another shape "
                                     f"than in the base {base_folder}; experts must share the "
                                     "base's architecture")
                delta = theirs[key].float() - tensor.float()
                if bool(delta.any()):  # identical tensors cost no memory
                    deltas[name][key] = delta
            del expert, theirs
        return cls(model, deltas)

    @contextmanager
    def specialize(self, weights: dict[str, float]) -> Iterator[None]:
        """Inside: θ_base + Σ_i α̂_i Δ_i (fp32, in expert order, cast to the model's dtype)."""
        unknown = [k for k in weights if k not in self.deltas]
        if unknown:
            raise PacerError(f"unknown expert(s) {', '.join(map(str, unknown))}; the experts "
                             f"are {', '.join(self.names)}")
        if not all(math.isfinite(float(w)) for w in weights.values()):
            raise PacerError(f"expert weights must be finite numbers, got {weights}")
        if self._active:
            raise PacerError("this model is already specialized; leave that with-block first")
        terms = [(float(weights[n]), self.deltas[n]) for n in self.names
                 if n in weights and float(weights[n]) != 0.0]

        def edits() -> Iterator[Edit]:
            for key, tensor in self.tensors.items():
                parts = [(w, d[key]) for w, d in terms if key in d]
                if not parts:
                    continue

                def fn(old: torch.Tensor, parts=parts, t=tensor) -> torch.Tensor:
                    acc = old.float()
                    for w, delta in parts:
                        acc = acc + w * delta.reshape(-1)
                    return acc.to(t.dtype)
                yield tensor, None, fn

        self._active = True
        try:
            with edited(edits()):
                yield
        finally:
            self._active = False

    @contextmanager
    def for_text(self, text: str, bank: RouterBank, temperature: float | None = None,
                 top_k: int | None = None) -> Iterator[dict[str, float]]:
        """specialize(α̂(text)) with the bank's experts named as this model's; yields α̂.

        ``temperature``: τ of the routing; None (the default) is the bank's own,
        ``bank.temperature`` (0.08 / N unless the router was built with another).
        """
        if sorted(bank.names) != sorted(self.names):
            raise PacerError(f"router experts [{', '.join(bank.names)}] vs task-vector experts "
                             f"[{', '.join(self.names)}]: they must be the same names")
        weights = bank.weights(text, temperature, top_k)
        with self.specialize(weights):
            yield weights
