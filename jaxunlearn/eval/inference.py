"""Batched, jit-compiled scoring and greedy generation of a causal LM over evaluation items.

The benchmark runners (`tofu`, `muse`, `multiple_choice`) turn a model into per-item numbers
through the two functions here:

- `score_items`: teacher-forced per-token log-probs (and, with `stats=True`, the Min-K%++
  entropy moments and argmax matches) of QA items, plain texts or pre-tokenised examples;
- `generate_answers`: greedy continuations of prompts with `jaxunlearn.models.generate`
  (fixed-size KV cache, left padding), decoded and cut at EOS and stop strings.

Items are padded to a few fixed length buckets and a fixed batch size, so each bucket
compiles once (`jax.jit` over `nnx.split` state, the graph definition static). With a `mesh`
the batches are split over its ``("data", "fsdp")`` axes by `parallel.shard_batch`. Scores
come from `jaxunlearn.scores.token_scores` on the model's `Head`: the log-softmax runs in
float32 in vocabulary chunks, so bf16 weights never give bf16 log-probs and no [B, T, V]
array is held.

Results are gathered with `jax.device_get`, so a mesh must span the devices of this one host
(several hosts would need a process all-gather of the outputs first).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.data import (
    IGNORE_INDEX,
    PromptFormat,
    bucket_length,
    encode_prompt,
    pad_to_bucket,
    prompt_format,
    tokenize_qa,
    tokenize_text,
)
from jaxunlearn.eval import report
from jaxunlearn.eval.metrics import truncate_at_stops
from jaxunlearn.models.generate import generate
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE, TokenScores, token_scores

# Finer than the training buckets: evaluation runs each item once, so padding waste costs
# more than the one extra compile per bucket.
EVAL_BUCKETS: tuple[int, ...] = (
    32,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
    768,
    1024,
    1536,
    2048,
    3072,
    4096,
)


class TokenArrays(NamedTuple):
    """Per-token scores of N items, padded to a common width L (mask 0 beyond each item).

    Row i holds item i in input order; position t scores the token `targets[i, t]` given the
    tokens before it (Hugging Face labels shifted by one, as `scores.TokenScores`).

    Attributes:
      logprob: [N, L] float32 log p(target); 0 where not scored.
      mask: [N, L] float32, 1 where the target is scored.
      targets: [N, L] int32 target token ids, -100 where not scored.
      entropy_mean: [N, L] mu_t for Min-K%++ (None unless scored with `stats=True`).
      entropy_std: [N, L] sigma_t for Min-K%++ (None unless `stats=True`).
      argmax_match: [N, L] 1 where the teacher-forced argmax is the target (None unless
        `stats=True`).
    """

    logprob: np.ndarray
    mask: np.ndarray
    targets: np.ndarray
    entropy_mean: np.ndarray | None = None
    entropy_std: np.ndarray | None = None
    argmax_match: np.ndarray | None = None

    def take(self, rows: Sequence[int] | slice | np.ndarray) -> TokenArrays:
        """The rows `rows` of every field (e.g. one split out of a joint scoring call)."""
        return TokenArrays(*(None if x is None else x[rows] for x in self))

    def stack(self, groups: int) -> TokenArrays:
        """Reshapes [N * K, L] rows (item-major: item i's K answers adjacent) to [N, K, L]."""
        n = self.logprob.shape[0]
        if n % groups:
            raise ValueError(f"cannot split {n} rows into groups of {groups}")
        return TokenArrays(
            *(None if x is None else x.reshape(n // groups, groups, x.shape[-1]) for x in self)
        )


class EvalResult(NamedTuple):
    """What a benchmark runner returns.

    Attributes:
      logs: open-unlearning-shaped logs, `{metric: {"agg_value", "value_by_index", ...}}`.
      summary: `{metric: agg_value}` for the run's top-level metrics with a value.
      metadata: provenance (benchmark, split, prompt format, item counts, ...), written under
        `report.METADATA_KEY` in the EVAL file.
    """

    logs: dict[str, Any]
    summary: dict[str, Any]
    metadata: dict[str, Any]

    def write(self, out_dir: str | Path, name: str) -> dict[str, Path]:
        """Writes `{name}_EVAL.json`, `{name}_SUMMARY.json` and `{name}_SUMMARY.md`."""
        return report.write_eval_logs(
            self.logs, out_dir, name, metadata=self.metadata, summary_metrics=list(self.summary)
        )


def make_result(
    logs: Mapping[str, Any], top_level: Sequence[str], metadata: Mapping[str, Any]
) -> EvalResult:
    """Packs logs into an `EvalResult`, summarising the top-level metrics (open-unlearning's
    SUMMARY lists only the metrics the suite asked for, not their pre-computed inputs)."""
    logs = dict(logs)
    summary = report.summarize(logs, [m for m in top_level if m in logs])
    return EvalResult(logs, summary, dict(metadata))


# ----------------------------------------------------------------------------- tokenising


def pad_token_id(tokenizer: Any) -> int:
    """The id written into padding: the tokenizer's pad token, else its EOS, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def eos_token_ids(tokenizer: Any, model_dir: str | Path | None = None) -> list[int]:
    """The token ids that end a generation: the tokenizer's EOS plus the model's own.

    Chat models often stop on more than one token (Llama-3 Instruct: `<|eot_id|>` and
    `<|end_of_text|>`); `transformers`' `generate` reads them from `generation_config.json`,
    so we do too when `model_dir` has one.

    Args:
      tokenizer: a Hugging Face tokenizer.
      model_dir: a model directory that may hold `generation_config.json`.

    Returns:
      The ids, tokenizer EOS first, without repeats.

    Raises:
      ValueError: neither the tokenizer nor the generation config names an EOS token.
    """
    import json

    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
        config = json.loads((Path(model_dir) / "generation_config.json").read_text("utf-8"))
        extra = config.get("eos_token_id")
        for value in [] if extra is None else np.atleast_1d(extra).tolist():
            if int(value) not in ids:
                ids.append(int(value))
    if not ids:
        raise ValueError(
            "no EOS token: the tokenizer has no eos_token and there is no generation_config.json "
            "eos_token_id; generation could not stop. Set tokenizer.eos_token."
        )
    return ids


def tokenize_items(
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    fmt: str | PromptFormat = "raw",
    *,
    max_length: int,
) -> list[dict[str, np.ndarray]]:
    """Tokenises evaluation items into {"input_ids", "labels"} examples, keeping their order.

    Args:
      tokenizer: a Hugging Face tokenizer.
      items: each one of
        - {"question", "answer"}: the prompt format's prompt, then the answer and EOS scored
          (`data.tokenize_qa`; optional "few_shot": [(q, a), ...] put before the question);
        - {"text"}: every token after the first scored, no EOS (`data.tokenize_text`;
          open-unlearning's completion items and MUSE PrivLeak texts);
        - {"input_ids", "labels"}: already tokenised (labels -100 where not scored).
      fmt: the prompt format for QA items.
      max_length: the most tokens per item (longer items are cut as the data layer does).

    Returns:
      One example per item. Items with nothing to score are kept (their scores are NaN), so
      positions stay aligned with item ids.

    Raises:
      ValueError: an item has none of the field sets above (names its position).
    """
    fmt = prompt_format(fmt)
    out = []
    for index, item in enumerate(items):
        if "input_ids" in item:
            ids = np.asarray(item["input_ids"], dtype=np.int32)
            labels = item.get("labels")
            labels = ids.copy() if labels is None else np.asarray(labels, dtype=np.int32)
            out.append({"input_ids": ids, "labels": labels})
        elif "question" in item and "answer" in item:
            few_shot = tuple(tuple(pair) for pair in item.get("few_shot", ()))
            out.append(
                tokenize_qa(
                    tokenizer, item["question"], item["answer"], fmt, max_length, few_shot=few_shot
                )
            )
        elif "text" in item:
            out.append(tokenize_text(tokenizer, item["text"], max_length))
        else:
            raise ValueError(
                f"item {index}: expected fields (question, answer), (text) or (input_ids, "
                f"labels); found {sorted(item)}"
            )
    return out


def target_texts(tokenizer: Any, arrays: TokenArrays) -> list[str]:
    """Decodes each item's scored target tokens (special tokens skipped).

    open-unlearning's ZLib attack compresses exactly this text
    (`extract_target_texts_from_processed_data`).
    """
    return [
        tokenizer.decode(row[row != IGNORE_INDEX].tolist(), skip_special_tokens=True)
        for row in arrays.targets
    ]


# ----------------------------------------------------------------------------- batching


def _groups(
    lengths: Sequence[int], buckets: Sequence[int], batch_size: int, ways: int
) -> list[tuple[int, int, list[int]]]:
    """Splits item indices into (bucket length, batch rows, indices) batches.

    Every batch of a bucket has the same number of rows, so each bucket compiles once. A
    bucket with fewer items than `batch_size` uses the next power of two instead (one shape
    either way), rounded up to a multiple of the mesh's batch ways.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_bucket: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_bucket.setdefault(bucket_length(length, buckets), []).append(index)
    out = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rows = min(batch_size, 1 << (len(indices) - 1).bit_length())
        rows = -(-rows // ways) * ways
        for start in range(0, len(indices), rows):
            out.append((bucket, rows, indices[start : start + rows]))
    return out


def _fill(indices: list[int], rows: int) -> list[int]:
    # Filler rows repeat the last item: their outputs are dropped, and a real prompt keeps
    # the left-padding invariant (last column attended) that `generate` checks.
    return indices + [indices[-1]] * (rows - len(indices))


def _ways(mesh: jax.sharding.Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


# ----------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("graphdef", "stats", "chunk_size"))
def _score_batch(state, input_ids, attention_mask, labels, *, graphdef, stats, chunk_size):
    model = nnx.merge(graphdef, state)
    out = model(input_ids, attention_mask, return_logits=False)
    return token_scores(out.head, labels, stats=stats, chunk_size=chunk_size)


def score_examples(
    model: nnx.Module,
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    buckets: Sequence[int] = EVAL_BUCKETS,
    mesh: jax.sharding.Mesh | None = None,
    stats: bool = False,
    pad_id: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ou_eos_masking: bool = False,
) -> TokenArrays:
    """Teacher-forced per-token scores of tokenised examples (see `score_items`).

    Args:
      model: a jaxunlearn causal LM.
      examples: {"input_ids": [L], "labels": [L]} with labels -100 where not scored.
      batch_size: rows per forward pass.
      buckets: allowed padded lengths; one compile per bucket used.
      mesh: split each batch over the mesh's batch axes (`parallel.shard_batch`).
      stats: also return entropy moments and argmax matches.
      pad_id: token id written into padding (masked out of attention).
      chunk_size: vocabulary columns per chunk of the float32 log-softmax.
      ou_eos_masking: open-unlearning's collator mask, attention = (input_ids != pad_id): with
        pad = EOS it also hides every EOS-valued token inside an item (Llama-3's
        ``<|eot_id|>`` turn ends). Off by default (only padding is masked); on to reproduce
        open-unlearning's numbers for such tokenizers.

    Returns:
      `TokenArrays` with one row per example, in order.
    """
    if not examples:
        raise ValueError("score_examples got no examples to score")
    graphdef, state = nnx.split(model)
    lengths = [len(e["input_ids"]) for e in examples]
    pending = []
    for bucket, rows, indices in _groups(lengths, buckets, batch_size, _ways(mesh)):
        batch = pad_to_bucket(
            [examples[i] for i in _fill(indices, rows)],
            (bucket,),
            pad_id=pad_id,
            ou_eos_masking=ou_eos_masking,
        )
        batch = parallel.place_batch(batch, mesh)
        out = _score_batch(
            state,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            graphdef=graphdef,
            stats=stats,
            chunk_size=chunk_size,
        )
        pending.append((indices, bucket, out))
    width = max(lengths) - 1
    n = len(examples)
    fields = {"logprob": np.zeros((n, width), np.float32), "mask": np.zeros((n, width), np.float32)}
    if stats:
        for name in ("entropy_mean", "entropy_std", "argmax_match"):
            fields[name] = np.zeros((n, width), np.float32)
    targets = np.full((n, width), IGNORE_INDEX, np.int32)
    # Results are fetched only after every batch is dispatched, so the host pads the next
    # batch while the device computes.
    for indices, bucket, out in pending:
        host = jax.device_get(out)
        cols = min(bucket - 1, width)
        for name, array in fields.items():
            array[indices, :cols] = np.asarray(getattr(host, name))[: len(indices), :cols]
    for i, example in enumerate(examples):
        labels = np.asarray(example["labels"], np.int32)[1:]
        targets[i, : len(labels)] = labels
    return TokenArrays(targets=targets, **fields)


def score_items(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    fmt: str | PromptFormat = "raw",
    *,
    batch_size: int = 32,
    buckets: Sequence[int] = EVAL_BUCKETS,
    mesh: jax.sharding.Mesh | None = None,
    stats: bool = False,
    max_length: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ou_eos_masking: bool = False,
) -> TokenArrays:
    """Per-token log-probs of QA answers (with EOS) or texts under `model`, batched and jitted.

    Args:
      model: a jaxunlearn causal LM (`checkpoints.load_pretrained`).
      tokenizer: its Hugging Face tokenizer.
      items: QA items {"question", "answer"}, text items {"text"} or tokenised examples
        (see `tokenize_items`); may be mixed.
      fmt: prompt format for QA items ("chat", "llama2", "qa", "raw" or a `PromptFormat`).
      batch_size: rows per forward pass.
      buckets: allowed padded lengths (one compile per bucket used).
      mesh: shard batches over this mesh (batch rows rounded up to its data*fsdp size).
      stats: also compute `entropy_mean`, `entropy_std` and `argmax_match` (Min-K%++,
        extraction strength, exact memorisation).
      max_length: most tokens per item (default: the largest bucket).
      chunk_size: vocabulary columns per chunk of the float32 log-softmax.
      ou_eos_masking: see `score_examples`.

    Returns:
      `TokenArrays`, row i = item i. Feed `logprob` / `mask` to `eval.metrics` and `eval.mia`.
    """
    if not items:
        raise ValueError("score_items got no items to score")
    max_length = int(max_length or max(buckets))
    examples = tokenize_items(tokenizer, items, fmt, max_length=max_length)
    return score_examples(
        model,
        examples,
        batch_size=batch_size,
        buckets=buckets,
        mesh=mesh,
        stats=stats,
        pad_id=pad_token_id(tokenizer),
        chunk_size=chunk_size,
        ou_eos_masking=ou_eos_masking,
    )


def as_token_scores(arrays: TokenArrays) -> TokenScores:
    """The same arrays as a `scores.TokenScores` (for the sequence reductions there)."""
    return TokenScores(
        jnp.asarray(arrays.logprob),
        jnp.asarray(arrays.mask),
        None if arrays.entropy_mean is None else jnp.asarray(arrays.entropy_mean),
        None if arrays.entropy_std is None else jnp.asarray(arrays.entropy_std),
        None if arrays.argmax_match is None else jnp.asarray(arrays.argmax_match),
    )


# ----------------------------------------------------------------------------- generation


def generate_tokens(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    batch_size: int = 32,
    buckets: Sequence[int] = EVAL_BUCKETS,
    mesh: jax.sharding.Mesh | None = None,
    ou_eos_masking: bool = False,
) -> list[np.ndarray]:
    """Greedy new tokens for each tokenised prompt, cut before the first EOS.

    Prompts are left-padded to their length bucket and decoded by
    `jaxunlearn.models.generate` (one compile per bucket and batch shape).

    Args:
      model: a jaxunlearn causal LM.
      prompts: token ids of each prompt (with BOS / chat header as the model expects).
      max_new_tokens: the most tokens generated per prompt.
      eos_token_id: id(s) that end a generation.
      pad_token_id: id used for left padding.
      batch_size: prompts per call.
      buckets: allowed padded prompt lengths.
      mesh: shard the prompts over this mesh.
      ou_eos_masking: see `score_examples` (here: EOS-valued prompt tokens are masked).

    Returns:
      One int32 array per prompt: the generated tokens before the first EOS.

    Raises:
      ValueError: an empty prompt, or one longer than the largest bucket (names its index).
    """
    lengths = [len(p) for p in prompts]
    for index, length in enumerate(lengths):
        if length == 0 or length > max(buckets):
            raise ValueError(
                f"prompt {index} has {length} tokens; prompts need 1..{max(buckets)} tokens "
                "(add a larger bucket, or shorten the prompt)"
            )
    eos = [int(e) for e in np.atleast_1d(eos_token_id)]
    examples = [{"input_ids": np.asarray(p, np.int32)} for p in prompts]
    pending = []
    for bucket, rows, indices in _groups(lengths, buckets, batch_size, _ways(mesh)):
        batch = pad_to_bucket(
            [examples[i] for i in _fill(indices, rows)],
            (bucket,),
            pad_id=pad_token_id,
            side="left",
            ou_eos_masking=ou_eos_masking,
        )
        batch = parallel.place_batch({k: batch[k] for k in ("input_ids", "attention_mask")}, mesh)
        tokens = generate(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_token_id,
        )
        pending.append((indices, tokens))
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
    for indices, tokens in pending:
        host = np.asarray(jax.device_get(tokens))
        for row, index in enumerate(indices):
            stop = np.flatnonzero(np.isin(host[row], eos))
            out[index] = host[row, : stop[0] if stop.size else host.shape[1]]
    return out


def decode_generation(
    tokenizer: Any, tokens: Sequence[int], stop_strings: Sequence[str] = (), *, strip: bool = True
) -> str:
    """Decodes generated tokens (special tokens skipped) and cuts at the first stop string.

    As open-unlearning's `eval_text_similarity` and muse_bench: decode with
    `skip_special_tokens=True`, then keep the text before each stop string in turn, then
    (open-unlearning) strip. Both also pass `clean_up_tokenization_spaces=True`, which
    `transformers` 5 ignores for BPE tokenizers; we keep the tokenizer's own setting. The
    clean-up only moves spaces next to punctuation, which ROUGE's tokeniser drops anyway.
    """
    text = tokenizer.decode(list(map(int, tokens)), skip_special_tokens=True)
    text = truncate_at_stops(text, stop_strings)
    return text.strip() if strip else text


def generate_answers(
    model: nnx.Module,
    tokenizer: Any,
    questions: Sequence[str],
    fmt: str | PromptFormat = "raw",
    *,
    max_new_tokens: int = 200,
    stop_strings: Sequence[str] = (),
    batch_size: int = 32,
    buckets: Sequence[int] = EVAL_BUCKETS,
    mesh: jax.sharding.Mesh | None = None,
    few_shot: Sequence[tuple[str, str]] = (),
    eos_token_id: int | Sequence[int] | None = None,
    strip: bool = True,
    ou_eos_masking: bool = False,
) -> list[str]:
    """Greedy answers to questions, as open-unlearning's ROUGE metrics generate them.

    Each question is rendered as the prompt format's prompt (`data.encode_prompt`: BOS, chat
    template with the generation header, ...), generated greedily with left padding and a
    fixed-size KV cache, decoded with `skip_special_tokens` and cut at EOS and at each stop
    string (open-unlearning `configs/generation/default.yaml`, `utils.py::eval_text_similarity`).

    Args:
      model: a jaxunlearn causal LM.
      tokenizer: its Hugging Face tokenizer.
      questions: the questions (with fmt="raw", the full prompt texts).
      fmt: prompt format.
      max_new_tokens: generation budget (open-unlearning TOFU: 200; MUSE: 32 / 128).
      stop_strings: cut the decoded text before the first of these (MUSE KnowMem:
        `metrics.MUSE_KNOWMEM_STOPS`).
      batch_size: prompts per call.
      buckets: allowed padded prompt lengths.
      mesh: shard prompts over this mesh.
      few_shot: in-context (question, answer) pairs rendered before each question.
      eos_token_id: id(s) that stop a generation (default: the tokenizer's EOS; see
        `eos_token_ids` for a model's extra stop tokens).
      strip: strip surrounding whitespace (open-unlearning does).
      ou_eos_masking: see `score_examples`.

    Returns:
      One decoded answer per question, in order.
    """
    if not questions:
        raise ValueError("generate_answers got no questions")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = eos_token_ids(tokenizer) if eos_token_id is None else eos_token_id
    prompts = [encode_prompt(tokenizer, q, fmt, few_shot=few_shot) for q in questions]
    tokens = generate_tokens(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad_token_id(tokenizer),
        batch_size=batch_size,
        buckets=buckets,
        mesh=mesh,
        ou_eos_masking=ou_eos_masking,
    )
    return [decode_generation(tokenizer, t, stop_strings, strip=strip) for t in tokens]


__all__ = [
    "EVAL_BUCKETS",
    "EvalResult",
    "TokenArrays",
    "as_token_scores",
    "decode_generation",
    "eos_token_ids",
    "generate_answers",
    "generate_tokens",
    "make_result",
    "pad_token_id",
    "score_examples",
    "score_items",
    "target_texts",
    "tokenize_items",
]
