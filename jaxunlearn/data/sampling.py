"""Forget/retain pairing: which items form the unlearning batch at each step.

The forget set is the anchor, as in open-unlearning's `ForgetRetainDataset`: each epoch walks a
permutation of the forget set, and each forget item is paired with a retain item drawn uniformly
with replacement. Unlike open-unlearning (whose retain draws come from a global `torch.randint`
and so depend on the process, issue #139), every random choice here comes from a numpy
generator keyed by the seed and the step (the forget order by (seed, epoch)):

- forget order: permutation of range(N_forget) from (seed, epoch), epoch = step // steps_per_epoch;
- retain items: from (seed, step) only;
- alternate answers (IdkDPO refusals, AltPO generations): from (seed, step, forget item).

So `batch_at(step)` is a pure function of (seed, step): the same on 1 or 8 devices, on any
number of hosts, in any call order, and a run resumes at a step with no other data state (the
data cursor is the step). The global batch is built on the host; sharding happens in the step.

References:
  open-unlearning, `src/data/unlearn.py` (ForgetRetainDataset), `src/data/qa.py`
  (QAwithIdkDataset), `configs/experiment/unlearn/tofu/idk.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxunlearn.data.batching import DEFAULT_BUCKETS, pad_to_bucket
from jaxunlearn.data.formats import PromptFormat, tokenize_qa

# Independent random streams; a fixed tag per stream keeps, e.g., the retain draws of step s
# apart from the forget permutation of epoch s.
_FORGET_STREAM, _RETAIN_STREAM, _ALTERNATE_STREAM = 0, 1, 2

Example = Mapping[str, Any]


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *keys]))


class BatchIndices(NamedTuple):
    """The items that make up the unlearning batch at one step.

    Attributes:
      step: the step.
      epoch: the pass over the forget set this step belongs to.
      forget: int64 [B] indices into the forget set.
      retain: int64 [B] indices into the retain set (None without a retain set).
      alternate: int64 [B] candidate index of the alternate answer of each forget item (None
        without alternates).
    """

    step: int
    epoch: int
    forget: np.ndarray
    retain: np.ndarray | None
    alternate: np.ndarray | None


class AlternateAnswers:
    """Candidate alternate answers per forget item, tokenised on first use.

    IdkDPO pairs each forget question with a refusal drawn from one shared list; AltPO with one
    of several answers generated for that question. Tokenising every (question, candidate) pair
    up front would cost N_forget x N_candidates tokenisations, so examples are built lazily and
    cached.

    Args:
      questions: the forget questions, index-aligned with the forget examples.
      answers: one list of candidates shared by all items (strings), or one list per item.
      encode: (question, answer) -> tokenised example, e.g. a `tokenize_qa` partial.
    """

    def __init__(
        self,
        questions: Sequence[str],
        answers: Sequence[str] | Sequence[Sequence[str]],
        encode: Callable[[str, str], Example],
    ):
        self._questions = list(questions)
        self._shared = bool(answers) and all(isinstance(a, str) for a in answers)
        self._answers = list(answers) if self._shared else [list(a) for a in answers]
        if not self._answers:
            raise ValueError("AlternateAnswers needs at least one candidate answer")
        if not self._shared and len(self._answers) != len(self._questions):
            raise ValueError(
                f"per-item alternate answers: {len(self._answers)} lists for "
                f"{len(self._questions)} questions"
            )
        empty = [] if self._shared else [i for i, a in enumerate(self._answers) if not a]
        if empty:
            raise ValueError(f"forget items {empty[:10]} have no alternate answer")
        self._encode = encode
        self._cache: dict[tuple[int, int], Example] = {}

    def __len__(self) -> int:
        return len(self._questions)

    def num_candidates(self, item: int) -> int:
        """Returns how many alternate answers forget item `item` has."""
        return len(self._answers) if self._shared else len(self._answers[item])

    def example(self, item: int, candidate: int) -> Example:
        """Returns the tokenised (question of `item`, candidate answer) example."""
        key = (item, candidate)
        if key not in self._cache:
            answers = self._answers if self._shared else self._answers[item]
            self._cache[key] = self._encode(self._questions[item], answers[candidate])
        return self._cache[key]


class _PerItemExamples:
    """Adapts pre-tokenised candidates, one list per forget item, to the AlternateAnswers API."""

    def __init__(self, examples: Sequence[Sequence[Example]]):
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def num_candidates(self, item: int) -> int:
        return len(self._examples[item])

    def example(self, item: int, candidate: int) -> Example:
        return self._examples[item][candidate]


def idk_alternates(
    tokenizer: Any,
    forget_questions: Sequence[str],
    fmt: str | PromptFormat,
    max_length: int,
    *,
    refusals: Sequence[str] | None = None,
) -> AlternateAnswers:
    """Builds IdkDPO alternates: each forget question answered with an "I don't know" line.

    Args:
      tokenizer: a Hugging Face tokenizer.
      forget_questions: the forget questions, index-aligned with the forget examples.
      fmt: the prompt format, the same as for the forget examples.
      max_length: the most tokens per example.
      refusals: the refusal lines; default `load_idk()` (TOFU's idontknow.jsonl).

    Returns:
      An `AlternateAnswers` for `ForgetRetainSampler(alternates=...)`.

    References:
      Maini et al., 2024, arXiv:2401.06121 (IdkPO); open-unlearning `QAwithIdkDataset`.
    """
    if refusals is None:
        from jaxunlearn.data.benchmarks import load_idk

        refusals = load_idk()
    return AlternateAnswers(
        forget_questions,
        list(refusals),
        lambda q, a: tokenize_qa(tokenizer, q, a, fmt, max_length),
    )


class ForgetRetainSampler:
    """Deterministic unlearning batches: `batch_at(step)` depends only on (seed, step).

    Args:
      forget: tokenised forget examples ({"input_ids", "labels"} dicts); the anchor.
      retain: tokenised retain examples, or None for forget-only methods (GA).
      batch_size: forget items per step (retain and alternate batches have the same rows).
      seed: a non-negative integer.
      alternates: for DPO-style methods, an `AlternateAnswers` (e.g. `idk_alternates`) or one
        sequence of tokenised candidate examples per forget item.
      pad_id: padding token id (results do not depend on it unless `ou_eos_masking`).
      buckets: allowed sequence lengths.
      side: padding side.
      ou_eos_masking: open-unlearning's attention mask, see `pad_to_bucket`.
      drop_last: False (open-unlearning's default): the last step of an epoch takes the
        remaining N_forget mod batch_size items (one more batch shape); True: every batch is
        full and the few items left over in an epoch's permutation wait for the next epoch's.
      prompt_format: the prompt format the examples were tokenised with (recorded for
        provenance; `data.forget_retain` sets it).

    Raises:
      ValueError: empty forget or retain set, bad batch size or seed, or alternates of another
        length than the forget set.
    """

    def __init__(
        self,
        forget: Sequence[Example],
        retain: Sequence[Example] | None = None,
        *,
        batch_size: int,
        seed: int,
        alternates: AlternateAnswers | Sequence[Sequence[Example]] | None = None,
        pad_id: int = 0,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        side: str = "right",
        ou_eos_masking: bool = False,
        drop_last: bool = False,
        prompt_format: str | None = None,
    ):
        if len(forget) == 0:
            raise ValueError(
                "the forget set is empty: nothing to unlearn; check the forget file/split"
            )
        if retain is not None and len(retain) == 0:
            raise ValueError("the retain set is empty; pass retain=None for forget-only methods")
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if drop_last and batch_size > len(forget):
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(forget)} forget items with drop_last=True"
            )
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if alternates is not None and not isinstance(alternates, AlternateAnswers):
            alternates = _PerItemExamples(alternates)
        if alternates is not None and len(alternates) != len(forget):
            raise ValueError(
                f"alternates cover {len(alternates)} items but the forget set has {len(forget)}"
            )
        self.forget, self.retain, self.alternates = forget, retain, alternates
        self.batch_size, self.seed, self.drop_last = int(batch_size), int(seed), drop_last
        self.prompt_format = prompt_format
        self._pad = {
            "buckets": tuple(buckets),
            "pad_id": pad_id,
            "side": side,
            "ou_eos_masking": ou_eos_masking,
        }
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one pass over the forget set."""
        n = len(self.forget)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _forget_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            order = _rng(self.seed, _FORGET_STREAM, epoch).permutation(len(self.forget))
            self._perm_cache[epoch] = order
        return self._perm_cache[epoch]

    def indices_at(self, step: int) -> BatchIndices:
        """Returns which forget / retain / alternate items form the batch at `step`."""
        if not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        epoch, position = divmod(int(step), self.steps_per_epoch)
        start = position * self.batch_size
        forget = self._forget_order(epoch)[start : start + self.batch_size]
        retain = None
        if self.retain is not None:
            retain = _rng(self.seed, _RETAIN_STREAM, step).integers(
                0, len(self.retain), size=len(forget)
            )
        alternate = None
        if self.alternates is not None:
            alternate = np.asarray(
                [
                    _rng(self.seed, _ALTERNATE_STREAM, step, item).integers(
                        self.alternates.num_candidates(item)
                    )
                    for item in forget.tolist()
                ],
                dtype=np.int64,
            )
        return BatchIndices(int(step), epoch, forget, retain, alternate)

    def examples_at(self, step: int) -> dict[str, list[Example]]:
        """Returns the unpadded examples of the batch at `step`, keyed forget/alternate/retain."""
        idx = self.indices_at(step)
        examples = {"forget": [self.forget[i] for i in idx.forget.tolist()]}
        if idx.alternate is not None:
            examples["alternate"] = [
                self.alternates.example(i, j)
                for i, j in zip(idx.forget.tolist(), idx.alternate.tolist())
            ]
        if idx.retain is not None:
            examples["retain"] = [self.retain[i] for i in idx.retain.tolist()]
        return examples

    def batch_at(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """Returns the unlearning batch at `step`: {"forget", ["alternate"], ["retain"]} sequence batches."""
        return {
            name: pad_to_bucket(examples, **self._pad)
            for name, examples in self.examples_at(step).items()
        }

    def batches(
        self, start_step: int = 0, num_steps: int | None = None
    ) -> Iterator[dict[str, dict[str, np.ndarray]]]:
        """Yields `batch_at(step)` for step = start_step, start_step + 1, ... (forever if num_steps is None)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, dict[str, np.ndarray]]]:
        return self.batches()

    def fingerprint(self) -> str:
        """A digest of everything `batch_at` depends on: the items' token ids and labels, the
        alternates, batch size, seed and padding (16 hex digits). A checkpoint records it, so a
        run is never resumed on other data."""
        h = hashlib.sha256()
        settings = {"batch_size": self.batch_size, "seed": self.seed, "drop_last": self.drop_last}
        h.update(json.dumps({**settings, **self._pad}, sort_keys=True, default=str).encode())
        for part in (self.forget, self.retain or ()):
            h.update(b"#")
            for example in part:
                h.update(np.asarray(example["input_ids"], np.int64).tobytes() + b"|")
                h.update(np.asarray(example["labels"], np.int64).tobytes() + b"|")
        alternates = self.alternates
        if isinstance(alternates, AlternateAnswers):
            record = [alternates._questions, alternates._answers]
            h.update(json.dumps(record, default=str).encode())
        elif alternates is not None:
            for item in range(len(alternates)):
                for k in range(alternates.num_candidates(item)):
                    h.update(np.asarray(alternates.example(item, k)["input_ids"]).tobytes())
        return h.hexdigest()[:16]

    def sequential_batches(self, part: str) -> list[dict[str, np.ndarray]]:
        """Consecutive batches of `batch_size` items of one part, in order, all of one size.

        For passes over a whole set (SSD's Fisher diagonals, whose batch-mean convention
        depends on the batch size): the last partial batch is dropped unless it is the only
        one.

        Args:
          part: "forget", "retain", or "full" (retain then forget: the training data).
        """
        sets = {"forget": self.forget, "retain": self.retain or []}
        examples = [*sets["retain"], *sets["forget"]] if part == "full" else sets.get(part)
        if examples is None:
            raise ValueError(f"part must be 'forget', 'retain' or 'full', got {part!r}")
        if not examples:
            raise ValueError(f"no {part} examples: the sampler has no retain set")
        size = min(self.batch_size, len(examples))
        return [
            pad_to_bucket(examples[i : i + size], **self._pad)
            for i in range(0, len(examples) - size + 1, size)
        ]


def forget_retain_batches(
    forget_examples: Sequence[Example],
    retain_examples: Sequence[Example] | None,
    *,
    batch_size: int,
    seed: int,
    alternates: AlternateAnswers | Sequence[Sequence[Example]] | None = None,
    start_step: int = 0,
    num_steps: int | None = None,
    **sampler_kwargs: Any,
) -> Iterator[dict[str, dict[str, np.ndarray]]]:
    """Yields unlearning batches from `start_step` on (see `ForgetRetainSampler`).

    Args:
      forget_examples: tokenised forget examples (the anchor).
      retain_examples: tokenised retain examples, or None.
      batch_size: forget items per step.
      seed: a non-negative integer.
      alternates: DPO alternates (see `ForgetRetainSampler`).
      start_step: the first step to yield; resuming a run passes its saved step.
      num_steps: how many batches to yield (None: forever).
      **sampler_kwargs: `pad_id`, `buckets`, `side`, `ou_eos_masking`, `drop_last`.

    Returns:
      An iterator of {"forget": ..., ["alternate": ...], ["retain": ...]} sequence batches.

    Raises:
      ValueError: empty forget set (raised at the call, not at the first `next`).
    """
    sampler = ForgetRetainSampler(
        forget_examples,
        retain_examples,
        batch_size=batch_size,
        seed=seed,
        alternates=alternates,
        **sampler_kwargs,
    )
    return sampler.batches(start_step, num_steps)
