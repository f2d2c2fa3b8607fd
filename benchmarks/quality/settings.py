"""Every number the benchmark uses, in two profiles: `full` (the reported run, ~20 minutes on
2 cores) and `tiny` (the CI test, seconds). The cache key of the trained models is a hash of
these settings plus the training data, so changing any value here retrains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TextSettings:
    # model: a byte-level Llama (vocab 257 = 256 bytes + BOS)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    context: int = 128  # BOS + at most 127 bytes: chunks are cut to context - 1 bytes
    # data
    n_eval: int = 256  # held-out chunks per domain
    n_router: int = 32  # router sample chunks per domain
    train_bytes: int = 1_500_000  # training text per domain (at most)
    # training: the base on all domains, then each expert from the base on its domain
    batch: int = 32
    base_steps: int = 400
    base_lr: float = 3e-3
    expert_steps: int = 250
    expert_lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class ImageSettings:
    # model: a 1-channel ViT on 8x8 images, patches of 2x2 (16 tokens + CLS)
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 128
    patch: int = 2
    # data: digit classes in disjoint groups, one expert per group
    groups: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5), (6, 7), (8, 9))
    eval_fraction: float = 0.3
    router_per_class: int = 8
    # training: a short base on every class (so experts have something to add), then experts
    batch: int = 64
    base_steps: int = 60
    base_lr: float = 1e-3
    expert_steps: int = 150
    expert_lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class MergeSettings:
    ties_density: float = 0.5  # ties and dare_ties keep half of each task vector
    split_density: float = 0.3  # Split-Merge's α
    budget_growth: float = 1.36  # pacer budget mode: max_param_growth
    # TR-Merging router of the routed Split-Merge row: τ None = the bank's default (0.08 / N),
    # keep the 2 largest weights
    route_temperature: float | None = None
    route_top_k: int = 2


@dataclass(frozen=True)
class Profile:
    name: str
    text: TextSettings = field(default_factory=TextSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    merge: MergeSettings = field(default_factory=MergeSettings)

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "full": Profile("full"),
    # CI: a model of ~30k parameters trained for a few seconds; the ranking still shows.
    "tiny": Profile(
        "tiny",
        TextSettings(hidden=32, layers=2, heads=2, intermediate=64, context=64, n_eval=32,
                     n_router=8, train_bytes=60_000, batch=16, base_steps=80, base_lr=3e-3,
                     expert_steps=60, expert_lr=2e-3),
        ImageSettings(hidden=32, layers=2, heads=2, intermediate=64, router_per_class=4,
                      batch=64, base_steps=60, expert_steps=60),
    ),
}
