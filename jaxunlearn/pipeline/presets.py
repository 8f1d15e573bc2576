"""Sizes of the TOFU benchmark run: `tiny` (CI), `small` (the default demo) and `full`.

A preset fixes everything a TOFU run depends on: which authors the target and the oracle are
trained on, which items are evaluated, the tokenizer and model sizes, the fine-tuning recipe,
and the unlearning budget and hyperparameters of every method. The target/oracle cache key is
a hash of the parts that shape those models, so changing, say, the unlearning learning rate
reuses the cached models.

TOFU's layout (checked against the packaged files): `full` is 200 fictitious authors x 20
questions in author order; `forgetXX` is the *last* 2·XX authors (forget10 = authors
180-199), `retain{100-XX}` the others; `retain_perturbed` is the first 20 authors;
`holdoutXX` holds 2·XX further authors no model was trained on (MIA non-members).

Author subsets (small, tiny): the forget authors are the *first* `forget_authors` authors of
the forget split, the retain authors are authors 0..`retain_authors`-1, and evaluation uses the
matching leading rows of `forgetXX_perturbed`, `retain_perturbed` and `holdoutXX`. The target
is trained on retain + forget authors, the oracle on the retain authors alone, both with the
real-authors and world-facts answers (TOFU's utility sets) added.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from jaxunlearn.pipeline.finetune import FinetuneRecipe

TOFU_AUTHORS = 200
QUESTIONS_PER_AUTHOR = 20
RETAIN_PERTURBED_AUTHORS = 20  # retain_perturbed = the first 20 authors of `full`

# The methods the benchmark runs by default: the core issue's list.
ALL_METHODS: tuple[str, ...] = (
    "gradascent",
    "graddiff",
    "npo",
    "simnpo",
    "idkdpo",
    "rmu",
    "undial",
    "ssd",
    "gu_npo",
    "hamu",
    "ofmu",
)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The Llama-style model trained from scratch (vocabulary = the trained tokenizer's).

    Attributes:
      hidden_size: residual width D.
      intermediate_size: gated-MLP width.
      num_layers: decoder layers.
      num_heads: attention heads (head_dim = hidden_size / num_heads).
      num_kv_heads: key/value heads (grouped-query attention when < num_heads).
      max_positions: RoPE context length (>= the longest training item).
      tie_embeddings: share the embedding and the unembedding (fewer parameters).
    """

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_positions: int = 512
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape: hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads}), and num_heads of num_kv_heads ({self.num_kv_heads})"
            )


@dataclasses.dataclass(frozen=True)
class UnlearnSettings:
    """The unlearning budget shared by all methods, and each method's hyperparameters.

    Attributes:
      methods: method names (`jaxunlearn.recipes` names), in leaderboard order.
      epochs: passes over the forget set (steps = epochs x ceil(N_forget / batch_size)).
      batch_size: forget items per step (retain / alternate batches have as many).
      learning_rate: AdamW learning rate of every gradient method unless overridden.
      seed: seeds the forget/retain pairing.
      overrides: method name -> keyword overrides passed to `recipes.recipe(name, ...)`;
        the keys "epochs" and "batch_size" set that method's budget instead.
    """

    methods: tuple[str, ...] = ALL_METHODS
    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def method_overrides(self, method: str) -> dict[str, Any]:
        """The overrides of one method (empty if none)."""
        return dict(self.overrides.get(method, {}))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How much of TOFU's evaluation runs (full TOFU: every item, 200 new tokens).

    Attributes:
      retain_items: leading `retain_perturbed` rows evaluated (None: all 400; must be authors
        the models were trained on).
      realworld_items: leading rows of real_authors / world_facts evaluated (None: all).
      max_new_tokens: greedy generation budget of the ROUGE metrics.
      batch_size: rows per forward pass and per generation call.
      buckets: padded lengths of evaluation batches (None: `eval.inference.EVAL_BUCKETS`);
        fewer buckets, fewer compilations.
    """

    retain_items: int | None = None
    realworld_items: int | None = None
    max_new_tokens: int = 200
    batch_size: int = 32
    buckets: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TofuPreset:
    """One TOFU benchmark configuration.

    Attributes:
      name: "tiny", "small", "full" or a user's name.
      description: one line for the leaderboard header.
      forget_splits: forget01 / forget05 / forget10 (one oracle and one method sweep each).
      retain_authors: authors 0..N-1 form the retain side (None: every author outside the
        forget split, i.e. TOFU's `retain{100-XX}`).
      forget_authors: the first N authors of the forget split are forgotten (None: all).
      realworld_train_items: leading rows of real_authors and of world_facts added to both
        training sets (None: all 100 + 117). TOFU's base model knows these facts from
        pretraining; a model trained from scratch learns them here, so evaluating them
        (`EvalSettings.realworld_items`) measures knowledge unlearning should keep.
      vocab_size: BPE vocabulary of the trained tokenizer.
      max_length: the most tokens per training / unlearning item.
      model: the model shape.
      finetune: the recipe shared by the target and the oracle.
      unlearn: the unlearning budget and method hyperparameters.
      eval: evaluation sizes.
    """

    name: str
    description: str
    forget_splits: tuple[str, ...] = ("forget10",)
    retain_authors: int | None = None
    forget_authors: int | None = None
    realworld_train_items: int | None = None
    vocab_size: int = 2048
    max_length: int = 192
    model: ModelShape = ModelShape()
    finetune: FinetuneRecipe = FinetuneRecipe()
    unlearn: UnlearnSettings = UnlearnSettings()
    eval: EvalSettings = EvalSettings()

    def __post_init__(self):
        if not self.forget_splits:
            raise ValueError(f"preset '{self.name}': forget_splits is empty")
        for split in self.forget_splits:
            forget_percent(split)
        subset = self.retain_authors is not None or self.forget_authors is not None
        if subset and len(self.forget_splits) > 1:
            raise ValueError(
                f"preset '{self.name}': author subsets (retain_authors / forget_authors) work "
                "with one forget split; use None for both to run several splits"
            )
        if subset:
            split = self.forget_splits[0]
            first_forget = TOFU_AUTHORS - 2 * forget_percent(split)
            if self.retain_authors is not None and not 1 <= self.retain_authors <= first_forget:
                raise ValueError(
                    f"preset '{self.name}': retain_authors must be in 1..{first_forget} (the "
                    f"authors before {split}), got {self.retain_authors}"
                )
            if self.forget_authors is not None and not (
                1 <= self.forget_authors <= 2 * forget_percent(split)
            ):
                raise ValueError(
                    f"preset '{self.name}': forget_authors must be in "
                    f"1..{2 * forget_percent(split)} for {split}, got {self.forget_authors}"
                )

    def replace(self, **changes: Any) -> TofuPreset:
        """A copy with fields replaced (nested: `unlearn=dataclasses.replace(...)`)."""
        return dataclasses.replace(self, **changes)


def forget_percent(split: str) -> int:
    """forget10 -> 10; raises ValueError for anything but forget01/05/10."""
    match = re.fullmatch(r"forget(01|05|10)", split)
    if not match:
        raise ValueError(f"'{split}' is not a TOFU forget split; use forget01, forget05, forget10")
    return int(match.group(1))


def forget_author_ids(preset: TofuPreset, split: str) -> list[int]:
    """The authors (0-199, rows 20a..20a+19 of `full`) unlearned on `split`."""
    first = TOFU_AUTHORS - 2 * forget_percent(split)
    count = 2 * forget_percent(split) if preset.forget_authors is None else preset.forget_authors
    return list(range(first, first + count))


def retain_author_ids(preset: TofuPreset, split: str) -> list[int]:
    """The authors the oracle of `split` is trained on (TOFU's `retain{100-XX}` when None)."""
    if preset.retain_authors is not None:
        return list(range(preset.retain_authors))
    forget = set(forget_author_ids(preset, split))
    return [a for a in target_author_ids(preset) if a not in forget]


def target_author_ids(preset: TofuPreset) -> list[int]:
    """The authors the target is trained on: retain and forget authors of every split."""
    if preset.retain_authors is None and preset.forget_authors is None:
        return list(range(TOFU_AUTHORS))
    split = preset.forget_splits[0]
    retain = (
        range(preset.retain_authors)
        if preset.retain_authors is not None
        else range(TOFU_AUTHORS - 2 * forget_percent(split))
    )
    return sorted({*retain, *forget_author_ids(preset, split)})


def eval_counts(preset: TofuPreset, split: str) -> dict[str, int | None]:
    """Leading rows evaluated per TOFU evaluation split (None: all of it)."""
    n_forget = len(forget_author_ids(preset, split)) * QUESTIONS_PER_AUTHOR
    trained_retain = [a for a in retain_author_ids(preset, split) if a < RETAIN_PERTURBED_AUTHORS]
    # retain_perturbed rows of authors the models never saw would not measure utility.
    retain = len(trained_retain) * QUESTIONS_PER_AUTHOR
    if preset.eval.retain_items is not None:
        retain = min(retain, preset.eval.retain_items)
    return {
        "forget": n_forget,
        "holdout": n_forget,
        "retain": retain,
        "realworld": preset.eval.realworld_items,
    }


# ----------------------------------------------------------------------------- the presets

_TINY = TofuPreset(
    name="tiny",
    description="CI smoke run: 2 retain + 1 forget author, a 1-layer 32-wide model, 2 steps",
    retain_authors=2,
    forget_authors=1,
    realworld_train_items=6,
    vocab_size=384,
    max_length=160,
    model=ModelShape(
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        max_positions=256,
    ),
    finetune=FinetuneRecipe(epochs=2, batch_size=16, learning_rate=3e-3, buckets=(160,)),
    unlearn=UnlearnSettings(
        epochs=1,
        batch_size=10,
        learning_rate=1e-3,
        overrides={
            "rmu": {"layer": 0, "layers": (0,)},
            "ofmu": {"inner_steps": 1, "penalty": "value"},
        },
    ),
    eval=EvalSettings(
        retain_items=10, realworld_items=6, max_new_tokens=4, batch_size=32, buckets=(160,)
    ),
)

# Unlearning hyperparameters of `small`, chosen with `jaxunlearn sweep` on this preset's
# target (BENCHMARKS.md). A model trained from scratch at lr 5e-3 needs larger unlearning
# rates than open-unlearning's 1e-5 for pretrained 1B-8B models; NPO-style methods need a
# smaller beta (0.02): with ~45-token answers, beta = 0.1 saturates NPO's sigmoid weight
# before the forget set is forgotten. GradAscent keeps open-unlearning's recipe shape (no
# retain term) to show the utility collapse the TOFU paper reports.
_SMALL_METHODS: dict[str, dict[str, Any]] = {
    "gradascent": {"learning_rate": 1e-3, "epochs": 5},
    "graddiff": {"learning_rate": 1e-3, "epochs": 5},
    "npo": {"learning_rate": 3e-3, "alpha": 10.0, "beta": 0.02, "epochs": 15},
    "simnpo": {"learning_rate": 4e-3, "alpha": 5.0, "gamma": 1.0},
    "idkdpo": {"learning_rate": 4e-3, "alpha": 5.0, "beta": 0.05},
    "rmu": {
        "layer": 1,
        "layers": (0, 1),
        "steering_coeff": 300.0,
        "learning_rate": 1e-2,
        "epochs": 5,
    },
    "undial": {"learning_rate": 1e-2, "alpha": 1.0, "epochs": 5},
    "ssd": {"alpha": 3.0},
    # The Euclidean geometry with AdamW, rank 8 refreshed every 10 steps: the settings this
    # table was swept with (the recipe's default is GU's Adam-whitened geometry, b1 = 0).
    "gu_npo": {
        "learning_rate": 3e-3,
        "alpha": 10.0,
        "beta": 0.02,
        "epochs": 15,
        "geometry": "euclidean",
        "rank": 8,
        "refresh_every": 10,
    },
    # HAMU's constraint B is a first-order rise of the forget loss per step; the target's
    # forget NLL is ~1e-4 with gradient norm ~5e-4, so B must be of that order to be feasible
    # within the radius (an infeasible step stops HAMU without moving).
    "hamu": {"allocation": "global", "radius": 2.0, "constraint": 5e-4, "alpha": 5.0},
    # First-order penalty ("value") and one inner step: the second-order "stationarity"
    # penalty costs minutes per run on 2 CPU cores.
    "ofmu": {"inner_steps": 1, "penalty": "value", "inner_learning_rate": 1e-3, "epochs": 3},
}

_SMALL = TofuPreset(
    name="small",
    description=(
        "default demo: 6 retain + 2 forget authors (the first 2 of forget10: 40 forget "
        "items), 40 real-authors + 40 world-facts items, a 2-layer 128-wide Llama trained "
        "from scratch"
    ),
    retain_authors=6,
    forget_authors=2,
    realworld_train_items=40,
    vocab_size=2048,
    max_length=160,
    model=ModelShape(
        hidden_size=128,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        max_positions=256,
    ),
    finetune=FinetuneRecipe(
        epochs=40, batch_size=4, learning_rate=5e-3, buckets=(48, 64, 80, 96, 128, 160)
    ),
    unlearn=UnlearnSettings(epochs=10, batch_size=8, learning_rate=1e-3, overrides=_SMALL_METHODS),
    eval=EvalSettings(
        retain_items=40,
        realworld_items=40,
        max_new_tokens=96,
        batch_size=64,
        buckets=(64, 96, 128, 160),
    ),
)

_FULL = TofuPreset(
    name="full",
    description="all 200 TOFU authors, forget01/05/10 (one oracle each), every evaluation item",
    forget_splits=("forget01", "forget05", "forget10"),
    vocab_size=8192,
    max_length=256,
    model=ModelShape(
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        max_positions=512,
        tie_embeddings=False,
    ),
    finetune=FinetuneRecipe(
        epochs=20, batch_size=32, learning_rate=1e-3, buckets=(64, 96, 128, 192, 256)
    ),
    unlearn=UnlearnSettings(
        epochs=5,
        batch_size=32,
        learning_rate=1e-4,
        overrides={"rmu": {"layer": 4, "layers": (2, 3, 4)}},
    ),
    eval=EvalSettings(max_new_tokens=200, batch_size=64),
)

PRESETS: dict[str, TofuPreset] = {p.name: p for p in (_TINY, _SMALL, _FULL)}


def get_preset(name: str | TofuPreset) -> TofuPreset:
    """Returns a preset by name ("tiny", "small", "full"), or the preset passed in."""
    if isinstance(name, TofuPreset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown TOFU preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "ALL_METHODS",
    "PRESETS",
    "EvalSettings",
    "ModelShape",
    "TofuPreset",
    "UnlearnSettings",
    "eval_counts",
    "forget_author_ids",
    "forget_percent",
    "get_preset",
    "retain_author_ids",
    "target_author_ids",
]
