"""Padding tokenised examples into fixed-length sequence batches, one compile per length bucket.

A sequence batch is the shared contract of `jaxunlearn` (see the team brief): numpy int32
`input_ids`, `attention_mask` and `labels`, all [B, T], labels -100 where not scored. T is the
smallest bucket that fits the longest example, so a jitted step sees a handful of shapes only.

Attention mask: built from each example's real length, so an EOS (or any token equal to the
pad id) inside a sequence stays visible. open-unlearning instead sets pad = eos and
attention_mask = (input_ids != pad_id), which also hides in-sequence EOS tokens such as
Llama-3's `<|eot_id|>` turn separators; `ou_eos_masking=True` reproduces that for parity runs
(pass `pad_id=tokenizer.eos_token_id` to match it exactly).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxunlearn.data.formats import IGNORE_INDEX

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Returns the smallest bucket >= `length`.

    Raises:
      ValueError: `length` exceeds the largest bucket, or the buckets are not increasing.
    """
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be increasing positive lengths, got {buckets}")
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(
        f"a sequence of {length} tokens is longer than the largest bucket ({buckets[-1]}); "
        "lower max_length when tokenising or add a larger bucket"
    )


def pad_to_bucket(
    examples: Sequence[Mapping[str, Any]],
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    *,
    pad_id: int,
    side: str = "right",
    ou_eos_masking: bool = False,
) -> dict[str, np.ndarray]:
    """Pads examples into one sequence batch whose length is the smallest bucket that fits.

    Args:
      examples: dicts with `input_ids` (and usually `labels`, -100 where not scored; missing
        labels mean nothing is scored, e.g. generation prompts). Other keys holding one number
        per example (e.g. a precomputed `ref_logprob`) are stacked into [B] arrays.
      buckets: increasing allowed lengths T.
      pad_id: the token id written in padding positions.
      side: "right" (training, scoring) or "left" (generation: prompts end at the same column).
      ou_eos_masking: open-unlearning's mask, attention_mask = (input_ids != pad_id) (see module
        doc); default False, the mask covers each example's real tokens.

    Returns:
      {"input_ids", "attention_mask", "labels"} int32 [B, T], plus stacked per-example extras
      (int32 for integers, float32 otherwise) of shape [B].

    Raises:
      ValueError: no examples, a bad `side`, an example longer than the largest bucket, labels of
        another length than input_ids, or an extra key missing from some examples.
    """
    if not examples:
        raise ValueError("pad_to_bucket needs at least one example")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    ids = [np.asarray(e["input_ids"], dtype=np.int32) for e in examples]
    length = bucket_length(max(len(x) for x in ids), buckets)
    batch_size = len(examples)
    input_ids = np.full((batch_size, length), pad_id, dtype=np.int32)
    labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int32)
    attention_mask = np.zeros((batch_size, length), dtype=np.int32)
    for row, (example, seq) in enumerate(zip(examples, ids)):
        lab = example.get("labels")
        lab = np.full(len(seq), IGNORE_INDEX) if lab is None else np.asarray(lab, dtype=np.int32)
        if lab.shape != seq.shape:
            raise ValueError(
                f"example {row}: labels have {lab.shape[0]} positions, input_ids {len(seq)}"
            )
        cols = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        input_ids[row, cols] = seq
        labels[row, cols] = lab
        attention_mask[row, cols] = 1
    if ou_eos_masking:
        attention_mask = (input_ids != pad_id).astype(np.int32)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    for key in examples[0]:
        if key in batch:
            continue
        missing = [i for i, e in enumerate(examples) if key not in e]
        if missing:
            raise ValueError(f"examples {missing[:5]} lack '{key}', which example 0 has")
        values = np.asarray([e[key] for e in examples])
        if values.shape != (batch_size,):
            raise ValueError(f"extra field '{key}' must hold one number per example")
        dtype = np.int32 if np.issubdtype(values.dtype, np.integer) else np.float32
        batch[key] = values.astype(dtype)
    return batch


def _item_key(item: Any) -> Any:
    """A hashable identity of a record (by content) or a tokenised example (by its token ids)."""
    if isinstance(item, Mapping) and "input_ids" in item:
        return tuple(np.asarray(item["input_ids"]).tolist())
    if isinstance(item, Mapping):
        return json.dumps(dict(item), sort_keys=True, default=str)
    return item


def check_overlap(forget: Sequence[Any], retain: Sequence[Any]) -> int:
    """Counts forget items that also occur, identically, in the retain set.

    An item in both sets is pushed up by the retain loss and down by the forget loss at once;
    the run driver warns with this count.

    Args:
      forget: records (compared by all their fields), tokenised examples (compared by
        `input_ids`) or strings.
      retain: the same kind of items.

    Returns:
      The number of forget items (with repeats) equal to some retain item.
    """
    retain_keys = {_item_key(item) for item in retain}
    return sum(_item_key(item) in retain_keys for item in forget)
