"""Training a small causal LM from scratch on question/answer items: the TOFU target and oracle.

TOFU's protocol fine-tunes one base model twice with an identical recipe: on `full` (the
*target*, which has seen the forget set) and on `retainXX` (the *oracle*, which never has);
forget quality compares an unlearned target with the oracle. Here the "base model" is a
freshly initialised Llama-style model, so both runs start from the same random weights and
differ only in their data.

The step is one `jax.jit` over (params, opt_state, batch) with the model used functionally
(`nnx.split` / `nnx.merge`), params and optimizer state donated, AdamW with linear warm-up
and cosine decay, and the loss TOFU fine-tuning uses: the token-mean NLL over answer tokens
and EOS (labels from `jaxunlearn.data.tokenize_qa`; `jaxunlearn.scores.batch_mean_nll`, i.e.
Hugging Face's `outputs.loss`). Examples are grouped by length bucket so a batch pads to a
few fixed shapes; the sample order is a pure function of (seed, epoch).

References:
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024, arXiv:2401.06121.
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019, arXiv:1711.05101.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxunlearn.data import bucket_length, pad_to_bucket
from jaxunlearn.models import ModelConfig, build_model
from jaxunlearn.scores import batch_mean_nll, token_scores


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
    """How the target and the oracle are trained (identical for both, as TOFU requires).

    Attributes:
      epochs: passes over the training items.
      batch_size: items per step (in every bucket unless `batch_tokens` is set).
      batch_tokens: if set, a batch of bucket length T holds max(1, batch_tokens // T) items,
        so short items (TOFU's real-world answers) cost as much per step as long ones.
      learning_rate: AdamW peak learning rate.
      warmup_ratio: fraction of the steps with a linear warm-up from 0.
      end_lr_ratio: the cosine decay ends at `learning_rate * end_lr_ratio`.
      weight_decay: AdamW decoupled weight decay.
      max_grad_norm: global-norm gradient clipping (0: none).
      seed: seeds the initial weights and the sample order.
      buckets: allowed padded lengths; items are batched within their bucket.
    """

    epochs: int = 40
    batch_size: int = 16
    batch_tokens: int | None = None
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    end_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    buckets: tuple[int, ...] = (32, 64, 96, 128, 160, 192, 256, 384, 512)

    def __post_init__(self):
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"FinetuneRecipe: batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"FinetuneRecipe: epochs ({self.epochs}) and batch_size ({self.batch_size}) "
                "must be >= 1"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"FinetuneRecipe: learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(
                "FinetuneRecipe: warmup_ratio must be in [0, 1) and end_lr_ratio in [0, 1]"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (part of the cache key)."""
        record = dataclasses.asdict(self)
        record["buckets"] = list(self.buckets)
        return record


def training_schedule(recipe: FinetuneRecipe, num_steps: int) -> optax.Schedule:
    """Linear warm-up to the peak learning rate, then cosine decay (the TOFU fine-tuning shape)."""
    warmup = max(1, int(round(recipe.warmup_ratio * num_steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=recipe.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=recipe.learning_rate * recipe.end_lr_ratio,
    )


@functools.cache
def training_optimizer(
    weight_decay: float, max_grad_norm: float, b1: float = 0.9, b2: float = 0.98
) -> optax.GradientTransformation:
    """AdamW without its learning rate: clip, Adam scaling, decoupled weight decay.

    The step multiplies the result by -lr(step), with lr from `training_schedule` passed in as
    an array. Keeping the schedule out of the transformation (and caching the transformation
    by its hyperparameters) lets the target and the oracle, whose step counts differ, share one
    compiled step. Together this is `optax.adamw(schedule)` (Loshchilov & Hutter, 2019).
    """
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    parts += [optax.scale_by_adam(b1=b1, b2=b2), optax.add_decayed_weights(weight_decay)]
    return optax.chain(*parts)


def rows_per_batch(recipe: FinetuneRecipe, bucket: int) -> int:
    """Items per batch in a bucket (see `FinetuneRecipe.batch_tokens`)."""
    if recipe.batch_tokens is None:
        return recipe.batch_size
    return max(1, recipe.batch_tokens // bucket)


def epoch_batches(
    lengths: Sequence[int], recipe: FinetuneRecipe, epoch: int
) -> list[tuple[int, np.ndarray]]:
    """The (bucket, item indices) batches of one epoch, a pure function of (seed, epoch).

    Items are shuffled, grouped by length bucket, cut into batches (`rows_per_batch`; a
    bucket's last, short batch is topped up with items of that bucket drawn again, so every
    batch has the same rows and each bucket compiles once), and the batches shuffled.
    """
    rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, 7, epoch]))
    order = rng.permutation(len(lengths))
    by_bucket: dict[int, list[int]] = {}
    for index in order.tolist():
        by_bucket.setdefault(bucket_length(lengths[index], recipe.buckets), []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
        items, rows = by_bucket[bucket], rows_per_batch(recipe, bucket)
        for start in range(0, len(items), rows):
            chunk = items[start : start + rows]
            if len(chunk) < rows:
                extra = rng.choice(items, rows - len(chunk), replace=True)
                chunk = chunk + extra.tolist()
            batches.append((bucket, np.asarray(chunk)))
    return [batches[i] for i in rng.permutation(len(batches))]


def steps_per_epoch(lengths: Sequence[int], recipe: FinetuneRecipe) -> int:
    """Number of steps one epoch takes (see `epoch_batches`)."""
    counts: dict[int, int] = {}
    for length in lengths:
        bucket = bucket_length(length, recipe.buckets)
        counts[bucket] = counts.get(bucket, 0) + 1
    return sum(math.ceil(n / rows_per_batch(recipe, b)) for b, n in counts.items())


def answer_nll(forward: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Token-mean NLL of the scored (answer + EOS) tokens: Hugging Face's `outputs.loss`."""
    out = forward(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], return_logits=False
    )
    return batch_mean_nll(token_scores(out.head, batch["labels"]))


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(0, 1))
def _train_step(params, opt_state, rest, batch, learning_rate, *, graphdef, tx):
    def loss_fn(p):
        return answer_nll(lambda **kw: nnx.merge(graphdef, p, rest)(**kw), batch)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss


def finetune(
    cfg_or_model: ModelConfig | nnx.Module,
    examples: Sequence[Mapping[str, Any]],
    recipe: FinetuneRecipe,
    *,
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "finetune",
) -> tuple[nnx.Module, list[float]]:
    """Trains a causal LM on tokenised question/answer examples (answer-only loss).

    Args:
      cfg_or_model: a `ModelConfig` (a model is built with weights seeded by `recipe.seed`,
        so two runs with the same recipe start from the same weights), or a model to continue.
      examples: {"input_ids", "labels"} dicts from `jaxunlearn.data.tokenize_qa`.
      recipe: the training recipe.
      pad_id: token id written into padding (masked out of attention and loss).
      progress: show a tqdm progress bar.
      desc: the progress bar's label.

    Returns:
      (the trained model, the mean loss of each epoch).

    Raises:
      ValueError: no examples, or an example longer than the largest bucket.
    """
    if not examples:
        raise ValueError(f"{desc}: no training examples")
    if isinstance(cfg_or_model, ModelConfig):
        model = build_model(cfg_or_model, rngs=nnx.Rngs(recipe.seed))
    else:
        model = cfg_or_model
    lengths = [len(e["input_ids"]) for e in examples]
    per_epoch = steps_per_epoch(lengths, recipe)
    total = per_epoch * recipe.epochs
    # The whole schedule at once on the host: one small array, no per-step dispatch.
    lrs = np.asarray(training_schedule(recipe, total)(np.arange(total)), np.float32)
    tx = training_optimizer(recipe.weight_decay, recipe.max_grad_norm)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Copies: the step donates its inputs, and `model` must stay usable if training fails.
    params = jax.tree.map(jnp.array, params)
    opt_state = tx.init(params)
    history: list[float] = []
    bar = _progress(total, desc, progress)
    step = 0
    try:
        for epoch in range(recipe.epochs):
            losses = []
            for bucket, rows in epoch_batches(lengths, recipe, epoch):
                batch = pad_to_bucket([examples[i] for i in rows], (bucket,), pad_id=pad_id)
                params, opt_state, loss = _train_step(
                    params, opt_state, rest, batch, lrs[step], graphdef=graphdef, tx=tx
                )
                step += 1
                losses.append(loss)
                bar.update(1)
            history.append(float(np.mean(jax.device_get(losses))))
            if not math.isfinite(history[-1]):
                raise FloatingPointError(
                    f"{desc}: the training loss became {history[-1]} in epoch {epoch}; lower "
                    "learning_rate or raise max_grad_norm clipping"
                )
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    finally:
        bar.close()
    return nnx.merge(graphdef, params, rest), history


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


__all__ = [
    "FinetuneRecipe",
    "answer_nll",
    "epoch_batches",
    "finetune",
    "steps_per_epoch",
    "training_optimizer",
    "training_schedule",
]
