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
larger τ flattens it towards uniform.

The default temperature, τ = 0.08 / N for N experts. Cosines of a sentence
embedder differ by tenths at most, and α = softmax(s) ≈ (1 + s_i − s̄)/N, so
α_i/τ ≈ const + (s_i − s̄)/(N·τ): N·τ is the temperature on the cosine scale,
and a fixed τ turns soft as experts are added (τ = 1, the formula's neutral
value, gave 0.35 / 0.33 / 0.32 for three clearly separated experts). Measured
with all-MiniLM-L6-v2 on real text (12 sample and 12 held-out lines per expert
of Python code, English prose, shell scripts and German from this machine's
/usr/lib/python3.11, /usr/share/common-licenses, /usr/bin, the vim tutors and
gnupg's help; plus tests/test_router.py's three topics), median top weight by
the gap between the two best scores, with τ = 0.08/N::

    top-2 gap     < 0.03     0.03-0.1    0.1-0.2    >= 0.2
    N = 2          0.53        0.72        0.86       0.98     (uniform 0.50)
    N = 3          0.40        0.53        0.82       0.95     (uniform 0.33)
    N = 4          0.34        0.50        0.77       0.92     (uniform 0.25)
    N = 7          0.25        0.37        0.72       0.91     (uniform 0.14)

decisive where the scores separate, still a mixture where they do not, alike
for every N (N·τ = 0.04 is nearly one-hot from a gap of 0.1; 0.12 leaves
gaps of 0.2 at 0.72-0.92). The bank stores its default in router.json (set at
build time, ``router build --temperature`` to choose another), and a call may
pass its own.

    bank = RouterBank.build({"code": code_texts, "math": math_texts})
    bank.weights("def f(x): return x")                  # τ = bank.temperature (0.04 here)
    bank.weights_many(lines, top_k=1)                   # many texts, embedded in batches
    bank.save("out/router"); RouterBank.load("out/router")

The embedder (:mod:`.embedder`) is loaded once per bank, on first use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import PacerError
from .embedder import Embedder, default_embedder_path

BANK_FORMAT = "pacer-router-bank"
BANK_TENSORS = "router.safetensors"
BANK_INFO = "router.json"
CHUNK = 512  # texts embedded together: sorted by length within it, so batches pad little
COSINE_TEMPERATURE = 0.08  # N·τ of the default τ (see the module docstring)


# -----------------------------------------------------------------------------
# eqs. 6-8 and top-K

def default_temperature(experts: int) -> float:
    """τ = 0.08 / N: decisive where the scores separate, for any number of experts N.

    >>> default_temperature(4)
    0.02
    """
    return COSINE_TEMPERATURE / experts


def check_temperature(temperature: float, where: str = "--temperature") -> float:
    """τ as a float, or a PacerError when it is not a positive finite number."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise PacerError(f"{where} must be a positive number, got {temperature!r}") from None
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


def route_weights(scores: torch.Tensor, temperature: float | None = None,
                  top_k: int | None = None) -> torch.Tensor:
    """α̂ from the scores s [..., N] (eqs. 6-8), then top-K renormalized; fp64, rows sum to 1.

    α = softmax(s); α̂ = softmax(α / τ); keep the K largest α̂ (ties: the first
    expert) and divide them by their sum. τ defaults to 0.08 / N.

    >>> route_weights(torch.tensor([0.9, 0.1]), temperature=1.0).tolist()  # doctest: +ELLIPSIS
    [0.5938..., 0.4061...]
    >>> route_weights(torch.tensor([0.9, 0.1]), temperature=0.1).tolist()  # doctest: +ELLIPSIS
    [0.9781..., 0.0218...]
    >>> route_weights(torch.tensor([0.9, 0.1, 0.5]), top_k=1).tolist()
    [1.0, 0.0, 0.0]
    """
    n = scores.shape[-1]
    tau = check_temperature(default_temperature(n) if temperature is None else temperature)
    k = check_top_k(top_k, n)
    alpha = torch.softmax(scores.double(), -1)       # eq. 6
    hat = torch.softmax(alpha / tau, -1)              # eqs. 7-8
    if k is None or k == n:
        return hat
    keep = torch.argsort(hat, dim=-1, descending=True, stable=True)[..., :k]
    kept = torch.zeros_like(hat).scatter(-1, keep, hat.gather(-1, keep))
    return kept / kept.sum(-1, keepdim=True)


# -----------------------------------------------------------------------------
# text files: sample texts, lines to route

def read_samples(path: str | Path) -> list[str]:
    """The sample texts of a file: one per non-empty line (surrounding spaces dropped)."""
    lines = [text for _, text in read_lines(path, "sample file")]
    if not lines:
        raise PacerError(f"{path}: no sample texts; write one sample text per non-empty line")
    return lines


def read_lines(path: str | Path, what: str = "file",
               strip: bool = True) -> list[tuple[int, str]]:
    """(line number from 1, text) of every non-blank line, surrounding spaces dropped
    unless ``strip`` is false (a tokenizer sees leading spaces)."""
    path = Path(path)
    if path.is_dir():
        raise PacerError(f"{path}: is a folder; give a text file with one text per line")
    if not path.is_file():
        raise PacerError(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PacerError(f"{path} is not UTF-8 text (byte {exc.start}); give one text per "
                         "line in UTF-8") from None
    return [(i, line.strip() if strip else line) for i, line in enumerate(text.splitlines(), 1)
            if line.strip()]


# -----------------------------------------------------------------------------
# the bank of expert sample embeddings

Routing = tuple[dict[str, float], dict[str, float]]  # (scores, weights) of one text


@dataclass
class RouterBank:
    """Per expert, the unit embeddings of its sample texts ([M_i, D] fp32), in expert order.

    Build it from texts with :meth:`build`, or directly from tensors (scoring
    normalizes the rows, so any vectors give true cosines):

    >>> bank = RouterBank({"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0]])})
    >>> bank.score_vector(torch.tensor([1.0, 1.0])).tolist()  # doctest: +ELLIPSIS
    [0.7071..., 0.7071...]
    >>> bank.temperature  # 0.08 / N
    0.04
    """

    samples: dict[str, torch.Tensor]
    embedder_path: str | None = None
    default_embedder: bool = False  # built with default_embedder_path(): found again on load
    embedder: Embedder | None = field(default=None, repr=False)
    temperature: float | None = None  # the default τ of this bank; None: 0.08 / N

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
        # would change the bits on every save/load; scoring normalizes instead.
        self.samples = {n: e.detach().float().contiguous() for n, e in self.samples.items()}
        # mean_j cos(z, z_i^j) = ẑ · mean_j ẑ_i^j: one [N, D] product scores any batch
        self._centroids = torch.stack([F.normalize(e.double(), dim=1).mean(0)
                                       for e in self.samples.values()])
        if self.temperature is None:
            self.temperature = default_temperature(len(self.samples))
        self.temperature = check_temperature(self.temperature, "the router's temperature")

    @property
    def names(self) -> list[str]:
        return list(self.samples)

    @property
    def dim(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    @classmethod
    def build(cls, samples: dict[str, list[str]], embedder: Embedder | str | Path | None = None,
              temperature: float | None = None) -> "RouterBank":
        """Embed every expert's sample texts (in one batched pass) into a bank."""
        if len(samples) < 2:
            raise PacerError(f"a router needs at least 2 experts, got {len(samples)} "
                             f"({', '.join(samples) or 'none'})")
        for name, texts in samples.items():
            if not name or "=" in name:
                raise PacerError(f"expert name {name!r}: must be non-empty and without '='")
            if not [t for t in texts if t.strip()]:
                raise PacerError(f"expert {name!r} has no sample texts")
        if temperature is not None:
            check_temperature(temperature)
        default = embedder is None
        embedder = _as_embedder(embedder)
        texts = {n: [t.strip() for t in ts if t.strip()] for n, ts in samples.items()}
        flat = embedder.embed([t for ts in texts.values() for t in ts])
        parts = flat.split([len(ts) for ts in texts.values()])
        return cls(dict(zip(texts, parts)), str(embedder.path), default, embedder, temperature)

    def save(self, folder: str | Path) -> Path:
        """``router.safetensors`` (one [M_i, D] tensor per expert) + ``router.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {"format": BANK_FORMAT, "experts": self.names, "dim": self.dim,
                "samples": {n: int(e.shape[0]) for n, e in self.samples.items()},
                "embedder": self.embedder_path, "default_embedder": self.default_embedder,
                "temperature": self.temperature}
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
        info = _read_info(folder)
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
        temperature = info.get("temperature")  # banks built before it was stored: None
        if temperature is not None:
            check_temperature(temperature, f"{folder / BANK_INFO}: temperature")
        bank = cls(samples, info.get("embedder"), bool(info.get("default_embedder")),
                   temperature=temperature)
        if embedder is not None:
            bank.embedder = _as_embedder(embedder)
        return bank

    def get_embedder(self) -> Embedder:
        """The embedder, loaded on first use and kept: the recorded folder, else the default."""
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

    # -- scoring -----------------------------------------------------------------------

    def score_matrix(self, z: torch.Tensor) -> torch.Tensor:
        """s (eq. 5) for input embeddings z [B, D]: [B, N] mean cosines, fp64."""
        return F.normalize(z.detach().double(), dim=-1) @ self._centroids.T

    def score_vector(self, z: torch.Tensor) -> torch.Tensor:
        """s (eq. 5) for one input embedding z [D]: the mean cosine to each expert's samples."""
        return self.score_matrix(z.reshape(1, -1))[0]

    def embed(self, text: str) -> torch.Tensor:
        return self.get_embedder().embed([text])[0]

    def scores(self, text: str) -> dict[str, float]:
        """s_i(text) per expert (eq. 5)."""
        return dict(zip(self.names, self.score_vector(self.embed(text)).tolist()))

    # -- routing -----------------------------------------------------------------------

    def weights(self, text: str, temperature: float | None = None,
                top_k: int | None = None) -> dict[str, float]:
        """α̂ per expert (eqs. 6-8 and top-K); sums to 1. τ: the bank's, unless given."""
        return self.route(text, temperature, top_k)[1]

    def route(self, text: str, temperature: float | None = None,
              top_k: int | None = None) -> Routing:
        """(scores, weights) of one text, embedding it once."""
        return self.route_many([text], temperature, top_k)[0]

    def weights_many(self, texts: Sequence[str], temperature: float | None = None,
                     top_k: int | None = None) -> list[dict[str, float]]:
        """α̂ per expert for each text, embedded in batches: the fast path for many texts."""
        return [w for _, w in self.iter_routes(texts, temperature, top_k)]

    def route_many(self, texts: Sequence[str], temperature: float | None = None,
                   top_k: int | None = None) -> list[Routing]:
        """(scores, weights) for each text, embedded in batches."""
        return list(self.iter_routes(texts, temperature, top_k))

    def iter_routes(self, texts: Sequence[str], temperature: float | None = None,
                    top_k: int | None = None) -> Iterator[Routing]:
        """(scores, weights) of each text in order, as its chunk of texts is embedded.

        τ and K are checked here, before the embedder loads or anything is yielded."""
        tau = check_temperature(self.temperature if temperature is None else temperature)
        k = check_top_k(top_k, len(self.samples))
        return self._routes(texts, tau, k)

    def _routes(self, texts: Sequence[str], tau: float, k: int | None) -> Iterator[Routing]:
        embedder = self.get_embedder()
        for start in range(0, len(texts), CHUNK):
            s = self.score_matrix(embedder.embed(texts[start:start + CHUNK]))
            w = route_weights(s, tau, k)
            for row_s, row_w in zip(s.tolist(), w.tolist()):
                yield dict(zip(self.names, row_s)), dict(zip(self.names, row_w))


def _read_info(folder: Path) -> dict:
    """router.json of a bank folder, checked: it exists, is JSON, lists the experts."""
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
    return info


def _as_embedder(embedder: Embedder | str | Path | None) -> Embedder:
    if isinstance(embedder, Embedder):
        return embedder
    return Embedder(default_embedder_path() if embedder is None else embedder)
