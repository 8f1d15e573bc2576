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

`collect_timings` records where an evaluation's wall time goes (tokenising, compiling,
scoring, generating, metrics), per named phase, without changing what is computed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections.abc import Iterator, Mapping, Sequence
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
from jaxunlearn.scores import DEFAULT_CHUNK_SIZE, Head, TokenScores, token_scores

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


# ----------------------------------------------------------------------------- timing


class PhaseTimings:
    """Exclusive wall seconds per named phase of an evaluation, filled by `collect_timings`.

    Phases nest (scoring a split tokenises first): a phase's time excludes the phases opened
    inside it, and JAX compilation (tracing, lowering and XLA compilation, reported by
    `jax.monitoring`) is moved out of the phase that triggered it into "compile", so the
    phases add up to the wall time of the evaluation.

    Attributes:
      seconds: phase name -> exclusive seconds.
      calls: phase name -> how many times it was entered (for "compile": compilations).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # per open phase: [start, child seconds]

    def add(self, name: str, seconds: float) -> None:
        """Adds `seconds` to phase `name` (and counts one call)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def total(self) -> float:
        """The sum over all phases."""
        return sum(self.seconds.values())


_TIMINGS: contextvars.ContextVar[PhaseTimings | None] = contextvars.ContextVar(
    "jaxunlearn_eval_timings", default=None
)
# jax.monitoring event names whose durations are compilation work.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_LISTENING = False


def _on_jax_event(event: str, duration: float, **_: Any) -> None:
    timings = _TIMINGS.get()
    if timings is None or event not in _COMPILE_EVENTS:
        return
    timings.seconds["compile"] = timings.seconds.get("compile", 0.0) + duration
    if event == _COMPILE_EVENTS[-1]:  # one XLA compilation (after its trace and lowering)
        timings.calls["compile"] = timings.calls.get("compile", 0) + 1
    if timings._stack:  # taken out of the phase that triggered the compilation
        timings._stack[-1][1] += duration


@contextlib.contextmanager
def collect_timings(timings: PhaseTimings | None = None) -> Iterator[PhaseTimings]:
    """Records the phases of the evaluation run inside the block into a `PhaseTimings`.

    Example:
      >>> from jaxunlearn.eval.inference import collect_timings, phase
      >>> with collect_timings() as timings:
      ...     with phase("metrics"):
      ...         pass
      >>> sorted(timings.seconds)
      ['metrics']

    Args:
      timings: the collector to add to (default: a new one).

    Yields:
      The collector; read `timings.seconds` after the block.
    """
    global _LISTENING
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
        _LISTENING = True
    timings = PhaseTimings() if timings is None else timings
    token = _TIMINGS.set(timings)
    try:
        yield timings
    finally:
        _TIMINGS.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Times the block as phase `name` when a `collect_timings` block is active (else free)."""
    timings = _TIMINGS.get()
    if timings is None:
        yield
        return
    frame = [time.perf_counter(), 0.0]
    timings._stack.append(frame)
    try:
        yield
    finally:
        timings._stack.pop()
        elapsed = time.perf_counter() - frame[0]
        timings.add(name, elapsed - frame[1])
        if timings._stack:
            timings._stack[-1][1] += elapsed


# ----------------------------------------------------------------------------- compile cache

# Compilations faster than this are not written to the persistent cache (they would cost
# about as much to read back as to redo).
CACHE_MIN_COMPILE_SECS = 0.5


def default_compilation_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxunlearn/jax-compilation-cache`` (``~/.cache`` when unset)."""
    import os

    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "jaxunlearn" / "jax-compilation-cache"


def enable_compilation_cache(
    directory: str | Path | None = None, *, min_compile_secs: float = CACHE_MIN_COMPILE_SECS
) -> Path:
    """Keeps compiled XLA executables on disk, so a later process skips their compilation.

    JAX's persistent compilation cache keys each executable by its program, shapes,
    compiler options, backend and JAX version, so a stale entry is never used. Evaluating
    many checkpoints of one architecture with the same buckets then compiles once, not once
    per process. Call before the first compilation of the process (later calls may be
    ignored by JAX); it sets process-wide JAX options.

    Args:
      directory: where to keep the executables (default `default_compilation_cache_dir`);
        created if missing.
      min_compile_secs: compilations faster than this are not stored.

    Returns:
      The cache directory.
    """
    path = Path(directory) if directory is not None else default_compilation_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path


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
    stats: bool | Sequence[bool] = False,
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
      stats: also return entropy moments and argmax matches (one flag, or one per
        example: any flag computes them for every example).
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
    stats = bool(_stats_wanted(stats, len(examples)).any())
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
    fields = _empty_fields(len(examples), width, stats)
    # Results are fetched only after every batch is dispatched, so the host pads the next
    # batch while the device computes.
    for indices, bucket, out in pending:
        host = jax.device_get(out)
        cols = min(bucket - 1, width)
        for name, array in fields.items():
            array[indices, :cols] = np.asarray(getattr(host, name))[: len(indices), :cols]
    return TokenArrays(targets=_targets(examples, width), **fields)


def _empty_fields(n: int, width: int, stats: bool) -> dict[str, np.ndarray]:
    """Zeroed [n, width] float32 host arrays of the `TokenArrays` score fields."""
    names = ["logprob", "mask"] + (["entropy_mean", "entropy_std", "argmax_match"] if stats else [])
    return {name: np.zeros((n, width), np.float32) for name in names}


def _targets(examples: Sequence[Mapping[str, Any]], width: int) -> np.ndarray:
    """[n, width] int32 next-token labels of each example (-100 beyond it)."""
    targets = np.full((len(examples), width), IGNORE_INDEX, np.int32)
    for i, example in enumerate(examples):
        labels = np.asarray(example["labels"], np.int32)[1:]
        targets[i, : len(labels)] = labels
    return targets


# ----------------------------------------------------------------------------- packed scoring

# Row length of `score_packed` (raised to fit the longest item): a TOFU question's prompt
# and its seven answers fill most of one row.
PACK_LENGTH = 512


def _shared_prompts(examples: Sequence[Mapping[str, Any]]) -> list[tuple[int, list[int]]]:
    """Groups examples whose unscored prompts are the same tokens: [(prefix length, members)].

    An example's prefix is its tokens before the last unscored one ahead of its first scored
    label. Examples with nothing to score are left out; those whose first label is scored
    get an empty prefix and a group of their own.
    """
    groups: dict[bytes, tuple[int, list[int]]] = {}
    alone = []
    for index, example in enumerate(examples):
        scored = np.flatnonzero(np.asarray(example["labels"]) != IGNORE_INDEX)
        if scored.size == 0:
            continue
        prefix = int(scored[0]) - 1
        if prefix < 1:
            alone.append((0, [index]))
            continue
        key = np.asarray(example["input_ids"], np.int32)[:prefix].tobytes()
        groups.setdefault(key, (prefix, []))[1].append(index)
    return list(groups.values()) + alone


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _prefix_tree(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
    """The token trie of `sequences` laid out in depth-first (pre-)order.

    Sorted lexicographically, each sequence adds the nodes beyond its common prefix with the
    one before it, which is the depth-first order of the trie; every node's subtree is then
    the run of columns from the node to its `end`.

    Returns:
      (tokens [N], end [N], columns): `columns[j][c]` is the column of token c of sequence j.
    """
    order = sorted(range(len(sequences)), key=lambda j: sequences[j].tolist())
    tokens: list[np.ndarray] = []
    columns: list = [None] * len(sequences)
    prev, prev_cols, size = None, None, 0
    for j in order:
        seq = sequences[j]
        shared = 0 if prev is None else _common_prefix(prev, seq)
        cols = np.empty(len(seq), np.int64)
        if shared:
            cols[:shared] = prev_cols[:shared]
        cols[shared:] = size + np.arange(len(seq) - shared)
        tokens.append(seq[shared:])
        size += len(seq) - shared
        prev, prev_cols, columns[j] = seq, cols, cols
    end = np.arange(size)
    for cols in columns:
        np.maximum.at(end, cols, cols[-1])
    return np.concatenate(tokens), end, columns


def _pack_rows(
    groups: list[tuple[int, list[int]]],
    examples: Sequence[Mapping[str, Any]],
    row_length: int,
) -> list[list[list[int]]]:
    """Packs each group's prefix tree (its shared prompt and answers) into rows of
    `row_length` tokens.

    A group whose tree is too long for one row is split, members in sorted order so that
    sequences sharing a prefix stay together; pieces are placed first-fit in decreasing
    size. Returns rows as lists of pieces (lists of example indices).
    """
    ids = [np.asarray(e["input_ids"], np.int32) for e in examples]
    pieces = []
    for _, members in groups:
        members = sorted(members, key=lambda i: ids[i].tolist())
        part, size, prev = [], 0, None
        for index in members:
            add = len(ids[index]) - (_common_prefix(prev, ids[index]) if part else 0)
            if part and size + add > row_length:
                pieces.append((size, part))
                part, size, add = [], 0, len(ids[index])
            part.append(index)
            size, prev = size + add, ids[index]
        pieces.append((size, part))
    rows: list[list[list[int]]] = []
    free: list[int] = []
    for size, part in sorted(pieces, key=lambda p: -p[0]):
        row = next((r for r, room in enumerate(free) if room >= size), None)
        if row is None:
            rows.append([])
            free.append(row_length)
            row = len(rows) - 1
        rows[row].append(part)
        free[row] -= size
    return rows


class _Entries(NamedTuple):
    """The scored labels of one packed call: which hidden state predicts which target."""

    at: np.ndarray  # flat position (row * T + column) of the predicting node
    target: np.ndarray  # the label it predicts
    example: np.ndarray  # the example the label belongs to
    column: np.ndarray  # its column in the example's [T - 1] score fields


def _packed_arrays(examples, rows, row_length, pad_id, ou_eos_masking):
    """Host arrays of packed rows and the call's scored labels.

    Each piece of a row is the prefix tree of its examples (`_prefix_tree`): a shared
    prompt and shared answer beginnings are laid out once. `end` is, per column, the last
    column of its subtree: a query sees a key exactly when it lies in the key's subtree.
    The label after token c of an example is predicted by the node of token c.
    """
    n = len(rows)
    arrays = {
        "input_ids": np.full((n, row_length), pad_id, np.int32),
        "positions": np.zeros((n, row_length), np.int32),
        "end": np.full((n, row_length), -1, np.int32),
        "key_ok": np.zeros((n, row_length), np.int32),
    }
    entries: list[list[np.ndarray]] = [[], [], [], []]
    for r, row in enumerate(rows):
        col = 0
        for members in row:
            seqs = [np.asarray(examples[i]["input_ids"], np.int32) for i in members]
            tokens, end, columns = _prefix_tree(seqs)
            span = slice(col, col + len(tokens))
            arrays["input_ids"][r, span] = tokens
            arrays["end"][r, span] = col + end
            for index, seq, cols in zip(members, seqs, columns):
                arrays["positions"][r, col + cols] = np.arange(len(seq))
                labels = np.asarray(examples[index]["labels"], np.int32)
                scored = np.flatnonzero(labels[1:] != IGNORE_INDEX)
                entries[0].append(r * row_length + col + cols[scored])
                entries[1].append(labels[scored + 1])
                entries[2].append(np.full(len(scored), index))
                entries[3].append(scored)
            col += len(tokens)
    real = arrays["end"] >= 0
    if ou_eos_masking:
        real &= arrays["input_ids"] != pad_id
    arrays["key_ok"] = real.astype(np.int32)
    flat = [np.concatenate(e) if e else np.zeros(0, np.int64) for e in entries]
    return arrays, _Entries(*(x.astype(np.int32) for x in flat))


def _stats_wanted(stats: bool | Sequence[bool], n: int) -> np.ndarray:
    """Per example: does it need the Min-K%++ statistics? (`stats` is one flag or n flags)."""
    if isinstance(stats, (bool, np.bool_)):
        return np.full(n, bool(stats))
    wanted = np.asarray(stats, bool)
    if wanted.shape != (n,):
        count = wanted.shape[0] if wanted.ndim else "a scalar"
        raise ValueError(
            f"stats must be one bool or one bool per example; got {count} flags for {n} examples"
        )
    return wanted


def _deal_rows(plan, examples, wanted, per_call: int) -> list[list]:
    """Deals packed rows to calls of `per_call` rows so that every call has about the same
    number of scored labels with statistics and without: each call's index arrays are as
    long as the largest call's, so an unbalanced deal would score padding.

    Rows go in decreasing order of their labels with statistics, then of all their scored
    labels, each to the open call with the fewest statistics labels so far (then the
    fewest scored ones).
    """

    def counts(row):
        n_stats = n_all = 0
        for members in row:
            for index in members:
                n = int((np.asarray(examples[index]["labels"])[1:] != IGNORE_INDEX).sum())
                n_all += n
                n_stats += n if wanted[index] else 0
        return n_stats, n_all

    n_calls = -(-len(plan) // per_call)
    calls: list[list] = [[] for _ in range(n_calls)]
    load = [(0, 0)] * n_calls
    for count, row in sorted(((counts(r), r) for r in plan), key=lambda x: x[0], reverse=True):
        open_calls = [c for c in range(n_calls) if len(calls[c]) < per_call]
        c = min(open_calls, key=lambda c: load[c])
        calls[c].append(row)
        load[c] = (load[c][0] + count[0], load[c][1] + count[1])
    return calls


def _padded(values: np.ndarray, size: int, fill: int) -> np.ndarray:
    """`values` padded to `size` entries with `fill`."""
    out = np.full(size, fill, np.int32)
    out[: len(values)] = values
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _score_packed_batch(
    state,
    input_ids,
    positions,
    end,
    key_ok,
    plain_at,
    plain_target,
    stats_at,
    stats_target,
    *,
    graphdef,
    chunk_size,
):
    r, t = input_ids.shape
    col = jnp.arange(t)
    # Query q may attend to key k when k <= q lies in k's subtree (q <= end[k]): its own
    # prompt and answer prefix, nothing of a sibling answer. Causal, so attention skips the
    # blocks above the diagonal.
    allowed = (
        (col[None, :] <= col[:, None])[None]
        & (col[None, :, None] <= end[:, None, :])
        & (key_ok[:, None, :] == 1)
    )
    model = nnx.merge(graphdef, state)
    hidden, kernel = model(input_ids, allowed, position_ids=positions, return_logits=False).head
    # The vocabulary projection and log-softmax run only at the nodes that predict a scored
    # label (once per label: a node shared by several answers predicts each one's next
    # token), and the Min-K%++ statistics only for the examples that asked for them.
    flat = hidden.reshape(r * t, hidden.shape[-1])

    def scores_at(at, target, stats):
        # The gathered nodes as `r` sequences: in token_scores' convention position i
        # predicts label i + 1, so each sequence's labels are its targets shifted by one.
        # (XLA:CPU reduces [1, N, V] or [N, 1, V] chunks several times slower than a few
        # rows of many positions.)
        h = flat.at[at].get(mode="fill", fill_value=0).reshape(r, -1, flat.shape[-1])
        hidden = jnp.pad(h, ((0, 0), (0, 1), (0, 0)))
        shifted = jnp.pad(target.reshape(r, -1), ((0, 0), (1, 0)), constant_values=IGNORE_INDEX)
        scores = token_scores(Head(hidden, kernel), shifted, stats=stats, chunk_size=chunk_size)
        return {name: getattr(scores, name).reshape(-1) for name in _FIELDS[: 1 + 3 * stats]}

    kinds = ((plain_at, plain_target, False), (stats_at, stats_target, True))
    return tuple(scores_at(*kind) if kind[0].shape[0] else {} for kind in kinds)


_FIELDS = ("logprob", "entropy_mean", "entropy_std", "argmax_match")


def score_packed(
    model: nnx.Module,
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    row_length: int = PACK_LENGTH,
    buckets: Sequence[int] = EVAL_BUCKETS,
    mesh: jax.sharding.Mesh | None = None,
    stats: bool | Sequence[bool] = False,
    pad_id: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ou_eos_masking: bool = False,
) -> TokenArrays:
    """`score_examples` with every shared prefix encoded once and no padding between items.

    Examples whose unscored prompts are the same tokens (a TOFU question's answer, paraphrase
    and perturbed answers) form a group, laid out in a row as the prefix tree (trie) of their
    token sequences: the prompt once, then each answer beginning that several answers share
    once (on TOFU's five splits about a sixth of all answer tokens), then each answer's own
    tokens. An attention mask lets every token see exactly its ancestors in the tree, and
    RoPE positions are tree depths, so every token sees the keys, values and positions it
    has in `score_examples` and the log-probs agree to float rounding. Rows are packed full
    (first-fit decreasing), so every batch has one shape: [rows, row_length]. The vocabulary
    projection and float32 log-softmax run only at the nodes that predict a scored label,
    and the Min-K%++ statistics only for the examples that ask for them.

    Models with sliding-window layers (whose windows count slots, not positions) fall back
    to `score_examples`.

    Args:
      model: a jaxunlearn causal LM.
      examples: {"input_ids", "labels"} (labels -100 where not scored), as `score_examples`.
      batch_size: the token budget per forward pass is `batch_size * 128` tokens (rows of
        `row_length`), the same as `score_examples` over 128-token items.
      row_length: tokens per packed row, raised to the bucket of the longest example.
      buckets: the lengths `row_length` is rounded up to when raised.
      mesh: split each batch over the mesh's batch axes.
      stats: also return entropy moments and argmax matches: one flag for every example,
        or one per example (the statistics are then computed only for the flagged
        examples; the others get zeros in those fields).
      pad_id: token id written into padding.
      chunk_size: vocabulary columns per chunk of the float32 log-softmax.
      ou_eos_masking: see `score_examples`: tokens equal to `pad_id` are hidden as keys.

    Returns:
      `TokenArrays` with one row per example, in order, laid out as `score_examples` does.

    References:
      The prefix-tree mask is the "tree attention" of speculative decoding, e.g. Miao et
      al., "SpecInfer", 2023, arXiv:2305.09781.
    """
    if not examples:
        raise ValueError("score_packed got no examples to score")
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0)
    if config is not None and any(config.is_sliding(i) for i in range(layers)):
        return score_examples(
            model,
            examples,
            batch_size=batch_size,
            buckets=buckets,
            mesh=mesh,
            stats=stats,
            pad_id=pad_id,
            chunk_size=chunk_size,
            ou_eos_masking=ou_eos_masking,
        )
    lengths = [len(e["input_ids"]) for e in examples]
    row_length = max(int(row_length), bucket_length(max(lengths), buckets))
    plan = _pack_rows(_shared_prompts(examples), examples, row_length)
    ways = _ways(mesh)
    per_call = max(1, (batch_size * 128) // row_length)
    per_call = -(-min(per_call, 1 << max(len(plan) - 1, 0).bit_length()) // ways) * ways
    wanted = _stats_wanted(stats, len(examples))
    calls = []
    for rows in _deal_rows(plan, examples, wanted, per_call):
        rows = rows + [[] for _ in range(per_call - len(rows))]
        calls.append(_packed_arrays(examples, rows, row_length, pad_id, ou_eos_masking))
    # One entry count per kind for every call of the stream (one compile), a multiple of
    # 128 and of the call's rows (the gathered nodes are scored as one sequence per row).
    step = int(np.lcm(128, per_call))
    kinds = [[wanted[entries.example] == flag for _, entries in calls] for flag in (False, True)]
    sizes = [-(-max(int(np.sum(k)) for k in kind) // step) * step for kind in kinds]
    past_end = per_call * row_length
    graphdef, state = nnx.split(model)
    pending = []
    for c, (host, entries) in enumerate(calls):
        picks = [kinds[0][c], kinds[1][c]]
        for name, pick, size in zip(("plain", "stats"), picks, sizes):
            host[f"{name}_at"] = _padded(entries.at[pick], size, past_end)
            host[f"{name}_target"] = _padded(entries.target[pick], size, IGNORE_INDEX)
        batch = parallel.place_batch(host, mesh)
        out = _score_packed_batch(state, **batch, graphdef=graphdef, chunk_size=chunk_size)
        pending.append((entries, picks, out))
    return _unpack(examples, lengths, pending, bool(wanted.any()))


def _unpack(examples, lengths, pending, stats: bool) -> TokenArrays:
    """Writes each call's per-label scores to one `score_examples`-layout row per example."""
    width = max(lengths) - 1
    fields = _empty_fields(len(examples), width, stats)
    targets = _targets(examples, width)
    fields["mask"] = (targets != IGNORE_INDEX).astype(np.float32)
    for entries, picks, out in pending:
        for pick, scores in zip(picks, jax.device_get(out)):
            rows, cols = entries.example[pick], entries.column[pick]
            for name, values in scores.items():
                fields[name][rows, cols] = np.asarray(values)[: len(rows)]
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
    stats: bool | Sequence[bool] = False,
    max_length: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ou_eos_masking: bool = False,
    packed: bool = False,
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
        extraction strength, exact memorisation); one flag, or one per item (with
        `packed=True` only the flagged items pay for them; the others get zeros there).
      max_length: most tokens per item (default: the largest bucket).
      chunk_size: vocabulary columns per chunk of the float32 log-softmax.
      ou_eos_masking: see `score_examples`.
      packed: score with `score_packed` (each shared prefix once, rows packed full, one
        shape) instead of `score_examples`; same numbers to float rounding.

    Returns:
      `TokenArrays`, row i = item i. Feed `logprob` / `mask` to `eval.metrics` and `eval.mia`.
    """
    if not items:
        raise ValueError("score_items got no items to score")
    max_length = int(max_length or max(buckets))
    with phase("tokenize"):
        examples = tokenize_items(tokenizer, items, fmt, max_length=max_length)
    return (score_packed if packed else score_examples)(
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
    one_length: bool = False,
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
      one_length: left-pad every prompt to the bucket of the longest one, so the whole call
        compiles once and only its last batch has filler rows (the extra padding is masked
        and moves no position, so the tokens are the same).

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
    if one_length:
        buckets = (bucket_length(max(lengths), buckets),)
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
    one_length: bool = False,
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
      one_length: see `generate_tokens`.

    Returns:
      One decoded answer per question, in order.
    """
    if not questions:
        raise ValueError("generate_answers got no questions")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = eos_token_ids(tokenizer) if eos_token_id is None else eos_token_id
    with phase("tokenize"):
        prompts = [encode_prompt(tokenizer, q, fmt, few_shot=few_shot) for q in questions]
    with phase("generate"):
        return _generate_and_decode(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            eos=eos,
            stop_strings=stop_strings,
            batch_size=batch_size,
            buckets=buckets,
            mesh=mesh,
            strip=strip,
            ou_eos_masking=ou_eos_masking,
            one_length=one_length,
        )


def _generate_and_decode(
    model, tokenizer, prompts, *, max_new_tokens, eos, stop_strings, strip, **kwargs
) -> list[str]:
    tokens = generate_tokens(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad_token_id(tokenizer),
        **kwargs,
    )
    return [decode_generation(tokenizer, t, stop_strings, strip=strip) for t in tokens]


__all__ = [
    "CACHE_MIN_COMPILE_SECS",
    "EVAL_BUCKETS",
    "PACK_LENGTH",
    "EvalResult",
    "PhaseTimings",
    "TokenArrays",
    "as_token_scores",
    "collect_timings",
    "default_compilation_cache_dir",
    "enable_compilation_cache",
    "decode_generation",
    "eos_token_ids",
    "generate_answers",
    "generate_tokens",
    "make_result",
    "pad_token_id",
    "phase",
    "score_examples",
    "score_items",
    "score_packed",
    "target_texts",
    "tokenize_items",
]
