"""Prompt formats and answer-only tokenisation: question/answer text -> input ids and label masks.

A `PromptFormat` is a small immutable value with a `name`, stored in a run's config so the
evaluation uses exactly the format the model was trained and unlearned with. Four are built in:

| name | prompt (not scored) | scored continuation |
|---|---|---|
| "chat" | `tokenizer.apply_chat_template([system, user], add_generation_prompt=True, date_string=...)` | the assistant turn as the template renders it, then EOS if the template did not end with it |
| "llama2" | `"[INST] " + q + " [/INST]"` (BOS from `add_special_tokens=True`) | `a` (no space after `[/INST]`), EOS |
| "qa" | `"Question: " + q + "\\nAnswer:"` | `" " + a`, EOS |
| "raw" | `q` verbatim (empty for {text} items: everything after BOS is scored) | `a` verbatim, EOS |

The chat format uses system prompt "You are a helpful assistant." and the template keyword
`date_string="10 Apr 2025"`, pinned by open-unlearning so Llama-3 prompts do not change with the
day the run happens.

Where the "qa" space goes: open-unlearning and MUSE write the prompt as `"...\\nAnswer: "` (the
space ends the prompt). For SentencePiece (Llama-2) and byte-level BPE (GPT-2, Llama-3) tokenizers
the space belongs to the *next* word's token, so `tokenize("...Answer: ")` ends with a lone space
token that `tokenize("...Answer: The")` does not contain: masking the first len(prompt_ids)
positions then hides the first answer token. We end the prompt at `"Answer:"` and score `" " + a`,
so prompt tokens are a prefix of the full-text tokens; the full text is the same string. The
open-unlearning border is one override away: `prompt_format("qa", assistant_start="Answer: ",
answer_prefix="")`.

Labels follow open-unlearning's `preprocess_chat_instance` (`src/data/utils.py`) and
locuslab/tofu's `convert_raw_data_to_model_format`: tokenise the prompt and the full text
separately, set labels to -100 over the first len(prompt_ids) positions, append EOS to the
full text unless it already ends with EOS; the EOS is scored.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a question and its answer become one text, and which part of it is scored.

    Field names follow open-unlearning's `template_args` (`configs/model/*.yaml`).

    Attributes:
      name: the name the format is selected and recorded by ("chat", "llama2", "qa", "raw").
      use_chat_template: render with `tokenizer.apply_chat_template` (then only
        `system_prompt` and `template_kwargs` below are used).
      system_prompt: the system message for chat templates (None: no system message).
      template_kwargs: extra variables for the chat template, as (name, value) pairs.
      system_prefix: text put before the first user turn when not using a chat template
        (open-unlearning's `system_prompt_with_special_tokens`).
      user_start: text before the question (`user_start_tag`).
      user_end: text after the question (`user_end_tag`).
      assistant_start: text that opens the answer; the last part of the prompt (`asst_start_tag`).
      answer_prefix: text put before the answer *inside* the scored part (see module doc).
      assistant_end: text after an in-context answer (`asst_end_tag`); only used with few-shot.
    """

    name: str
    use_chat_template: bool = False
    system_prompt: str | None = None
    template_kwargs: tuple[tuple[str, str], ...] = ()
    system_prefix: str = ""
    user_start: str = ""
    user_end: str = ""
    assistant_start: str = ""
    answer_prefix: str = ""
    assistant_end: str = ""

    def prompt_text(self, question: str, few_shot: Sequence[tuple[str, str]] = ()) -> str:
        """Returns the prompt string (templated formats only; chat formats render via the tokenizer)."""
        if self.use_chat_template:
            raise ValueError(
                f"prompt format '{self.name}' is rendered by the tokenizer's chat template"
            )
        shots = "".join(
            self.user_start
            + q
            + self.user_end
            + self.assistant_start
            + self.answer_prefix
            + a
            + self.assistant_end
            for q, a in few_shot
        )
        return (
            self.system_prefix
            + shots
            + self.user_start
            + question
            + self.user_end
            + self.assistant_start
        )

    def full_text(
        self, question: str, answer: str, few_shot: Sequence[tuple[str, str]] = ()
    ) -> str:
        """Returns prompt + scored answer as one string (templated formats only)."""
        return self.prompt_text(question, few_shot) + self.answer_prefix + answer

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable record of the format, for run configs."""
        record = dataclasses.asdict(self)
        record["template_kwargs"] = dict(self.template_kwargs)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PromptFormat:
        """Rebuilds a format recorded with `to_dict`."""
        record = dict(record)
        record["template_kwargs"] = tuple(sorted(dict(record.get("template_kwargs", {})).items()))
        return cls(**record)


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "chat": PromptFormat(
        "chat",
        use_chat_template=True,
        system_prompt="You are a helpful assistant.",
        template_kwargs=(("date_string", "10 Apr 2025"),),
    ),
    # OU configs/model/Llama-2-7b-chat-hf.yaml: a space after [/INST] "leads to very bad
    # tokenization at the border", so the answer follows the tag directly.
    "llama2": PromptFormat("llama2", user_start="[INST] ", user_end=" [/INST]", assistant_end=" "),
    "qa": PromptFormat(
        "qa",
        user_start="Question: ",
        user_end="\n",
        assistant_start="Answer:",
        answer_prefix=" ",
        assistant_end="\n\n",
    ),
    "raw": PromptFormat("raw"),
}


def prompt_format(fmt: str | PromptFormat | Mapping[str, Any], **overrides: Any) -> PromptFormat:
    """Selects a prompt format by name (or rebuilds a recorded one), with optional field overrides.

    Args:
      fmt: "chat", "llama2", "qa" or "raw"; a `PromptFormat`; or a dict from `to_dict`.
      **overrides: `PromptFormat` fields to replace, e.g. `system_prompt=None`.

    Returns:
      The `PromptFormat`.

    Raises:
      ValueError: unknown name or field.
    """
    if isinstance(fmt, str):
        if fmt not in PROMPT_FORMATS:
            raise ValueError(
                f"unknown prompt format '{fmt}'; choose one of {sorted(PROMPT_FORMATS)}"
            )
        fmt = PROMPT_FORMATS[fmt]
    elif isinstance(fmt, Mapping):
        fmt = PromptFormat.from_dict(fmt)
    fields = {f.name for f in dataclasses.fields(PromptFormat)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"unknown PromptFormat field(s) {sorted(unknown)}; fields: {sorted(fields)}"
        )
    if "template_kwargs" in overrides and isinstance(overrides["template_kwargs"], Mapping):
        overrides["template_kwargs"] = tuple(sorted(overrides["template_kwargs"].items()))
    return dataclasses.replace(fmt, **overrides)


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            f"tokenizer '{_tokenizer_name(tokenizer)}' has no EOS token; set tokenizer.eos_token "
            "(answers are scored up to and including EOS)"
        )
    return int(eos)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _chat_ids(tokenizer: Any, fmt: PromptFormat, turns: list[tuple[str, str | None]]) -> list[int]:
    """Token ids of a chat; the last turn's answer None means "prompt with generation header"."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer '{_tokenizer_name(tokenizer)}' has no chat template, so prompt format "
            f"'{fmt.name}' cannot be used; choose 'llama2', 'qa' or 'raw', or set "
            "tokenizer.chat_template"
        )
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    ids = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=False,
        add_generation_prompt=turns[-1][1] is None,
        **dict(fmt.template_kwargs),
    )
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def encode_prompt(
    tokenizer: Any,
    question: str,
    fmt: str | PromptFormat,
    *,
    few_shot: Sequence[tuple[str, str]] = (),
) -> np.ndarray:
    """Tokenises the prompt alone (with BOS / the chat generation header), e.g. for generation.

    Args:
      tokenizer: a Hugging Face tokenizer.
      question: the question.
      fmt: the prompt format (name or value).
      few_shot: in-context (question, answer) pairs put before the question.

    Returns:
      int32 [P] token ids.
    """
    fmt = prompt_format(fmt)
    if fmt.use_chat_template:
        ids = _chat_ids(tokenizer, fmt, [*few_shot, (question, None)])
    else:
        ids = _encode(tokenizer, fmt.prompt_text(question, few_shot))
    return np.asarray(ids, dtype=np.int32)


def _tokenize_qa(
    tokenizer: Any,
    question: str,
    answer: str,
    fmt: PromptFormat,
    max_length: int,
    few_shot: Sequence[tuple[str, str]],
) -> tuple[dict[str, np.ndarray], bool]:
    """`tokenize_qa` without warnings; also returns whether the prompt/answer border is clean."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (prompt + EOS), got {max_length}")
    eos = _eos_id(tokenizer)
    if fmt.use_chat_template:
        full = _chat_ids(tokenizer, fmt, [*few_shot, (question, answer)])
        prompt = _chat_ids(tokenizer, fmt, [*few_shot, (question, None)])
    else:
        full = _encode(tokenizer, fmt.full_text(question, answer, few_shot))
        prompt = _encode(tokenizer, fmt.prompt_text(question, few_shot))
    clean_border = full[: len(prompt)] == prompt
    if not full or full[-1] != eos:
        full.append(eos)
    if len(full) > max_length:
        full = full[: max_length - 1] + [eos]
    input_ids = np.asarray(full, dtype=np.int32)
    labels = input_ids.copy()
    labels[: len(prompt)] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}, clean_border


def _border_warning(fmt: PromptFormat, count: str = "an item") -> str:
    return (
        f"prompt format '{fmt.name}': for {count}, the prompt's tokens are not a prefix of the "
        "full text's tokens (the tokenizer merges across the prompt/answer border), so masking "
        "len(prompt_ids) positions mis-places the first answer token, as in open-unlearning"
    )


def tokenize_qa(
    tokenizer: Any,
    question: str,
    answer: str,
    fmt: str | PromptFormat,
    max_length: int,
    *,
    few_shot: Sequence[tuple[str, str]] = (),
) -> dict[str, np.ndarray]:
    """Tokenises one question/answer item with labels on the answer tokens and EOS only.

    As open-unlearning's `preprocess_chat_instance`: the prompt and the full text are tokenised
    separately, labels are -100 over the first len(prompt_ids) positions, and EOS is appended
    (unless the full text already ends with it) and scored. Items longer than `max_length` keep
    their first `max_length - 1` tokens plus EOS (open-unlearning truncates before appending EOS,
    giving `max_length + 1` tokens; we keep items within the bucket).

    Args:
      tokenizer: a Hugging Face tokenizer with an EOS token (and a chat template for "chat").
      question: the question (user turn).
      answer: the answer (assistant turn) to score.
      fmt: the prompt format (name or value).
      max_length: the most tokens the item may have (>= 2).
      few_shot: in-context (question, answer) pairs put before the question (not scored).

    Returns:
      {"input_ids": int32 [L], "labels": int32 [L]} with L <= max_length; labels -100 where not
      scored. An item with zero scored tokens (the prompt alone fills `max_length`) is returned
      with a warning; `tokenize_records` skips such items.

    Raises:
      ValueError: the tokenizer has no EOS, or no chat template for a chat format.
    """
    fmt = prompt_format(fmt)
    example, clean_border = _tokenize_qa(tokenizer, question, answer, fmt, max_length, few_shot)
    if not clean_border:
        warnings.warn(_border_warning(fmt), stacklevel=2)
    if not np.any(example["labels"] != IGNORE_INDEX):
        warnings.warn(
            f"question {question[:60]!r}: no answer token is left to score (max_length "
            f"{max_length}); the item carries no loss",
            stacklevel=2,
        )
    return example


def tokenize_text(
    tokenizer: Any, text: str, max_length: int, *, add_eos: bool = False
) -> dict[str, np.ndarray]:
    """Tokenises a plain-text item; every token after the first (BOS) is scored.

    As open-unlearning's `preprocess_pretraining_instance` with an empty prefix: BOS from
    `add_special_tokens=True`, no EOS by default, position 0 never scored (no logit predicts it).

    Args:
      tokenizer: a Hugging Face tokenizer.
      text: the text.
      max_length: the most tokens the item may have (>= 2).
      add_eos: append (and score) EOS.

    Returns:
      {"input_ids": int32 [L], "labels": int32 [L]}, labels[0] = -100.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = _encode(tokenizer, text)
    if add_eos:
        ids = ids[: max_length - 1] + [_eos_id(tokenizer)]
    input_ids = np.asarray(ids[:max_length], dtype=np.int32)
    labels = input_ids.copy()
    labels[:1] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def tokenize_records(
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    fmt: str | PromptFormat,
    max_length: int,
    *,
    question_key: str = "question",
    answer_key: str = "answer",
    with_indices: bool = False,
) -> list[dict[str, np.ndarray]] | tuple[list[dict[str, np.ndarray]], list[int]]:
    """Tokenises {question, answer} or {text} records, skipping items with nothing to score.

    Args:
      tokenizer: a Hugging Face tokenizer.
      records: dicts with `question_key` and `answer_key`, or with "text" (e.g. from
        `read_jsonl_records`, or rows of a `datasets.Dataset`).
      fmt: the prompt format for QA records ({text} records are tokenised with `tokenize_text`).
      max_length: the most tokens per item.
      question_key: field holding the question.
      answer_key: field holding the answer.
      with_indices: also return the index of the record each example came from.

    Returns:
      One {"input_ids", "labels"} example per record that has at least one scored token;
      with `with_indices`, ``(examples, record_indices)``.

    Raises:
      ValueError: a record has neither the QA fields nor "text".
    """
    fmt = prompt_format(fmt)
    examples, kept, skipped, unclean = [], [], [], 0
    for index, record in enumerate(records):
        if question_key in record and answer_key in record:
            example, clean_border = _tokenize_qa(
                tokenizer, record[question_key], record[answer_key], fmt, max_length, ()
            )
            unclean += not clean_border
        elif "text" in record:
            example = tokenize_text(tokenizer, record["text"], max_length)
        else:
            raise ValueError(
                f"record {index}: expected fields '{question_key}' and '{answer_key}' or "
                f"'text'; found {sorted(record)}"
            )
        if np.any(example["labels"] != IGNORE_INDEX):
            examples.append(example)
            kept.append(index)
        else:
            skipped.append(index)
    if unclean:
        warnings.warn(_border_warning(fmt, f"{unclean} of {len(records)} items"), stacklevel=2)
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(records)} records with no token to score "
            f"(indices {skipped[:10]}{'...' if len(skipped) > 10 else ''}); raise max_length",
            stacklevel=2,
        )
    return (examples, kept) if with_indices else examples


def chunk_text(
    tokenizer: Any, texts: Sequence[str], chunk_tokens: int, *, separator: str = "\n\n"
) -> list[str]:
    """Joins texts and cuts them into pieces of `chunk_tokens` tokens, for corpus-style forget sets.

    MUSE's raw forget/retain corpora are whole articles; open-unlearning trains on 2048-token
    chunks of them. Each chunk is decoded back to text so it can be tokenised like any {text}
    item (re-tokenising may shift a token at a chunk border).

    Args:
      tokenizer: a Hugging Face tokenizer.
      texts: the documents.
      chunk_tokens: tokens per chunk (without BOS).
      separator: put between documents.

    Returns:
      The chunks as strings.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i : i + chunk_tokens]) for i in range(0, len(ids), chunk_tokens)]
