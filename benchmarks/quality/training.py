"""Train the shared base and one expert per domain, or find them in the cache.

Text: the base learns bytes on a mix of every domain (each batch row picks a domain uniformly,
so a small domain is not drowned), then each expert continues from the base on its own domain
only — all parameters, AdamW, warm-up then cosine decay. Images: the same on digit classes.

Every model is saved with `save_pretrained` (safetensors, fp32); text models also get the
byte tokenizer. The cache folder is named by a hash of the settings, the training data and the
library versions, and `DONE.json` is written last, so an interrupted training run is redone
and a finished one is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import bytetok
from imagedata import Digits, group_name
from settings import ImageSettings, TextSettings
from textdata import Domain, digest
from tinymodels import make_llama, make_vit

CACHE_VERSION = 1  # bump when the training code changes what it produces


def cache_key(settings: dict, data_digest: str) -> str:
    blob = json.dumps({"settings": settings, "data": data_digest, "version": CACHE_VERSION,
                       "torch": torch.__version__, "transformers": transformers.__version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10 % of the steps, then cosine decay to 10 % of the peak."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model: torch.nn.Module, batches, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW updates on ``batches()`` -> model inputs with labels; the losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = model(**batches()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# -----------------------------------------------------------------------------
# text

class ByteStream:
    """A domain's training chunks as one byte string, sampled at chunk starts.

    A training row is BOS + the `context - 1` bytes from a chunk's start (running on into
    the next chunks, joined by newlines), so a row starts the way an eval line does.
    """

    def __init__(self, chunks: list[str], context: int) -> None:
        data = "\n".join(chunks).encode("utf-8") + b"\n"
        self.starts = np.cumsum([0] + [len(c.encode("utf-8")) + 1 for c in chunks[:-1]])
        data += data[:context]  # wrap around: the last chunks also get full rows
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.context = context

    def rows(self, starts: np.ndarray) -> torch.Tensor:
        span = torch.arange(self.context - 1)
        body = self.data[torch.as_tensor(starts)[:, None] + span]
        return torch.cat([torch.full((len(starts), 1), bytetok.BOS), body], dim=1)


def text_batches(streams: list[ByteStream], batch: int, seed: int):
    """Batches of rows, each from a uniformly chosen stream and chunk start."""
    rng = np.random.default_rng(seed)

    def draw() -> dict[str, torch.Tensor]:
        which = rng.integers(len(streams), size=batch)
        rows = [streams[w].rows(rng.choice(streams[w].starts, size=1)) for w in which]
        ids = torch.cat(rows)
        return {"input_ids": ids, "labels": ids}

    return draw


def save_text_model(model: torch.nn.Module, folder: Path, log: dict) -> None:
    model.save_pretrained(folder)
    bytetok.write_tokenizer(folder)
    (folder / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


def train_text(domains: list[Domain], s: TextSettings, cache: Path, say=print
               ) -> tuple[Path, dict[str, Path], dict]:
    """(base folder, {domain: expert folder}, info) — trained now or found in the cache."""
    key = cache_key({"text": s.__dict__, "domains": [d.name for d in domains]}, digest(domains))
    folder = cache / f"text-{key}"
    experts = {d.name: folder / f"expert-{d.name}" for d in domains}
    if (folder / "DONE.json").is_file():
        say(f"text models: cached in {folder}")
        for model in (folder / "base", *experts.values()):
            bytetok.write_tokenizer(model)  # the tokenizer is not part of the cache key
        return folder / "base", experts, json.loads((folder / "DONE.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    streams = [ByteStream(d.train, s.context) for d in domains]
    info: dict = {"cache": str(folder)}

    t = time.perf_counter()
    base = make_llama(s)
    losses = fit(base, text_batches(streams, s.batch, s.seed), s.base_steps, s.base_lr)
    info["base"] = {"seconds": time.perf_counter() - t, "final_loss": mean_tail(losses)}
    save_text_model(base, folder / "base", info["base"])
    say(f"text base: {s.base_steps} steps, loss {mean_tail(losses):.3f}, "
        f"{info['base']['seconds']:.0f} s")

    for i, (domain, stream) in enumerate(zip(domains, streams)):
        t = time.perf_counter()
        expert = transformers.AutoModelForCausalLM.from_pretrained(folder / "base")
        losses = fit(expert, text_batches([stream], s.batch, s.seed + 1 + i), s.expert_steps,
                     s.expert_lr)
        info[domain.name] = {"seconds": time.perf_counter() - t, "final_loss": mean_tail(losses)}
        save_text_model(expert, experts[domain.name], info[domain.name])
        say(f"text expert {domain.name}: {s.expert_steps} steps, loss {mean_tail(losses):.3f}, "
            f"{info[domain.name]['seconds']:.0f} s")
    (folder / "DONE.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder / "base", experts, info


def mean_tail(losses: list[float], n: int = 20) -> float:
    tail = losses[-n:]
    return float(sum(tail) / len(tail))


# -----------------------------------------------------------------------------
# images

def image_batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    rng = np.random.default_rng(seed)

    def draw() -> dict[str, torch.Tensor]:
        idx = rng.integers(len(x), size=batch)
        return {"pixel_values": torch.from_numpy(x[idx]), "labels": torch.from_numpy(y[idx])}

    return draw


def train_images(digits: Digits, s: ImageSettings, cache: Path, say=print
                 ) -> tuple[Path, dict[str, Path], dict]:
    """(base folder, {group name: expert folder}, info) — trained now or found in the cache."""
    blob = hashlib.sha256(digits.train.x.tobytes() + digits.train.y.tobytes()).hexdigest()
    folder = cache / f"images-{cache_key({'images': s.__dict__}, blob)}"
    experts = {group_name(g): folder / f"expert-{group_name(g)}" for g in s.groups}
    if (folder / "DONE.json").is_file():
        say(f"image models: cached in {folder}")
        return folder / "base", experts, json.loads((folder / "DONE.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    info: dict = {"cache": str(folder)}

    t = time.perf_counter()
    base = make_vit(s)
    losses = fit(base, image_batches(digits.train.x, digits.train.y, s.batch, s.seed),
                 s.base_steps, s.base_lr)
    info["base"] = {"seconds": time.perf_counter() - t, "final_loss": mean_tail(losses)}
    base.save_pretrained(folder / "base")
    for i, group in enumerate(s.groups):
        t = time.perf_counter()
        part = digits.train.of(group)
        expert = transformers.AutoModelForImageClassification.from_pretrained(folder / "base")
        losses = fit(expert, image_batches(part.x, part.y, s.batch, s.seed + 1 + i),
                     s.expert_steps, s.expert_lr)
        name = group_name(group)
        info[name] = {"seconds": time.perf_counter() - t, "final_loss": mean_tail(losses)}
        expert.save_pretrained(experts[name])
    say(f"image models: base + {len(s.groups)} experts, "
        f"{sum(v['seconds'] for k, v in info.items() if k != 'cache'):.0f} s")
    (folder / "DONE.json").write_text(json.dumps(info, indent=1) + "\n")
    return folder / "base", experts, info
