"""Your own forget/retain data in one call: records, a JSON Lines file or a `datasets.Dataset`
in, the deterministic sampler that `jaxunlearn.unlearn` consumes out.

    >>> import jaxunlearn as ju
    >>> sampler = ju.data.forget_retain(tokenizer, "forget.jsonl", "retain.jsonl",
    ...                                 batch_size=2, seed=0)
    >>> sorted(sampler.batch_at(0))
    ['forget', 'retain']
    >>> sampler.batch_at(0)["forget"]["input_ids"].shape[0]
    2

The command line, the TOFU pipeline and the notebooks build their samplers through
`forget_retain`, so a run started from any of them sees the same batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from jaxunlearn.data.batching import check_overlap
from jaxunlearn.data.benchmarks import load_idk
from jaxunlearn.data.formats import encode_prompt, tokenize_records
from jaxunlearn.data.records import read_jsonl_records
from jaxunlearn.data.sampling import ForgetRetainSampler, idk_alternates

Records = str | os.PathLike | Sequence[Mapping[str, Any]] | Any


def _records(source: Records, name: str) -> list[dict]:
    """A list of record dicts from a path, a sequence of mappings or a `datasets.Dataset`."""
    if isinstance(source, str | os.PathLike):
        return read_jsonl_records(source)
    if hasattr(source, "column_names") and hasattr(source, "to_list"):  # datasets.Dataset
        records = source.to_list()
    elif isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
        records = [dict(r) for r in source]
    else:
        raise TypeError(
            f"{name}: expected a JSON Lines path, a list of dicts or a datasets.Dataset; got "
            f"{type(source).__name__}"
        )
    if not records:
        raise ValueError(f"{name}: no records (the {name} set is empty)")
    return records


def default_format(tokenizer: Any) -> str:
    """ "chat" when the tokenizer has a chat template, else "qa" (what ``fmt="auto"`` picks)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "qa"


def power_of_two_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded lengths 16, 32, 64, ... below `max_length`, then `max_length` itself."""
    buckets, size = [], smallest
    while size < max_length:
        buckets.append(size)
        size *= 2
    return (*buckets, max_length)


def _round_up(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def _tokenize(tokenizer, records, fmt, max_length, name) -> tuple[list, list[int]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, kept = tokenize_records(tokenizer, records, fmt, max_length, with_indices=True)
    for w in caught:  # say which set the warning is about
        warnings.warn(f"{name}: {w.message}", stacklevel=3)
    if not examples:
        raise ValueError(
            f"{name}: no item has an answer token to score at max_length={max_length}; the "
            f"{name} set is empty. Raise max_length or check the data."
        )
    return examples, kept


def _refusal_lines(refusals: Any) -> list[str]:
    if refusals is True:
        return load_idk()  # TOFU's packaged idontknow lines
    if isinstance(refusals, str | os.PathLike):
        return load_idk(refusals)
    lines = [str(r).strip() for r in refusals if str(r).strip()]
    if not lines:
        raise ValueError("refusals: no refusal line given")
    return lines


def _longest_refusal_item(tokenizer, questions, refusals, fmt, max_length) -> int:
    # Bound on a refusal item's length: the longest prompt plus the longest refusal + EOS
    # (BPE merges across the border only shorten it).
    prompt = max(len(encode_prompt(tokenizer, q, fmt)) for q in questions)
    refusal = max(len(tokenizer(" " + r, add_special_tokens=False)["input_ids"]) for r in refusals)
    return min(prompt + refusal + 1, max_length)


def forget_retain(
    tokenizer: Any,
    forget: Records,
    retain: Records | None = None,
    *,
    fmt: str = "auto",
    max_length: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    refusals: bool | str | os.PathLike | Sequence[str] | None = None,
    buckets: Sequence[int] | str | None = None,
    drop_last: bool = False,
    ou_eos_masking: bool = False,
) -> ForgetRetainSampler:
    """The unlearning sampler for a forget set (and a retain set) given as data.

    Each of `forget` / `retain` is a JSON Lines (or JSON array) path, a list of dicts, or a
    `datasets.Dataset`, of TOFU-style ``{"question", "answer"}`` or plain ``{"text"}``
    records. Items with no answer token left at `max_length` are skipped with a warning; an
    item in both sets is reported with a warning (the forget loss pushes it down while the
    retain loss pushes it up).

    Args:
      tokenizer: a Hugging Face tokenizer.
      forget: the data to forget.
      retain: the data to keep (None for forget-only methods such as GradAscent).
      fmt: prompt format of QA records: "chat", "llama2", "qa", "raw", or "auto" (the
        tokenizer's chat template if it has one, else "qa").
      max_length: the most tokens per item.
      batch_size: forget items per step.
      seed: the data order's seed (batch s is a pure function of (seed, s)).
      refusals: pair each forget question with refusal answers (IdkDPO's alternates): True
        for TOFU's packaged "I don't know" lines, a file with one per line, or the lines.
      buckets: padded lengths; None: 16, 32, 64, ... up to `max_length`; "longest": one
        bucket, the longest item rounded up to 16 (one compilation per run).
      drop_last: every batch full (see `ForgetRetainSampler`); needed on a mesh whose batch
        axes must divide every batch.
      ou_eos_masking: open-unlearning's attention mask (see `pad_to_bucket`).

    Returns:
      A `ForgetRetainSampler`; its ``prompt_format`` records the format used.

    Raises:
      ValueError: an empty set, a record without the fields, refusals for text records.
      FileNotFoundError: a path that does not exist.
    """
    fmt = default_format(tokenizer) if fmt == "auto" else fmt
    forget_records = _records(forget, "forget")
    retain_records = None if retain is None else _records(retain, "retain")
    if retain_records is not None:
        overlap = check_overlap(forget_records, retain_records)
        if overlap:
            warnings.warn(
                f"{overlap} of {len(forget_records)} forget items also appear in the retain set; "
                "each is pushed down by the forget loss and up by the retain loss.",
                stacklevel=2,
            )
    forget_ex, kept = _tokenize(tokenizer, forget_records, fmt, max_length, "forget")
    retain_ex = None
    if retain_records is not None:
        retain_ex, _ = _tokenize(tokenizer, retain_records, fmt, max_length, "retain")
    longest = max(len(e["input_ids"]) for e in [*forget_ex, *(retain_ex or [])])

    alternates = None
    if refusals is not None and refusals is not False:
        if not all("question" in forget_records[i] for i in kept):
            raise ValueError(
                "refusals pair each forget question with a refusal answer: the forget set must "
                "hold question/answer records, not text."
            )
        lines = _refusal_lines(refusals)
        questions = [forget_records[i]["question"] for i in kept]
        alternates = idk_alternates(tokenizer, questions, fmt, max_length, refusals=lines)
        longest = max(longest, _longest_refusal_item(tokenizer, questions, lines, fmt, max_length))

    if buckets is None:
        buckets = power_of_two_buckets(max_length)
    elif buckets == "longest":
        buckets = (_round_up(longest),)
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    return ForgetRetainSampler(
        forget_ex,
        retain_ex,
        batch_size=batch_size,
        seed=seed,
        alternates=alternates,
        pad_id=0 if pad_id is None else int(pad_id),
        buckets=tuple(buckets),
        drop_last=drop_last,
        ou_eos_masking=ou_eos_masking,
        prompt_format=fmt,
    )


__all__ = ["default_format", "forget_retain", "power_of_two_buckets"]
