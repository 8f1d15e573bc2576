"""A small byte-level BPE tokenizer trained on TOFU text, saved in Hugging Face format.

The TOFU pipeline trains its models from scratch, so it trains its own tokenizer too: a
GPT-2-style byte-level BPE (`tokenizers`) on the questions and answers of the splits in use,
the real-world sets and the refusal lines. Byte-level means every string is encodable (no
unknown token), so evaluation texts the tokenizer never saw (paraphrased and perturbed
answers) still tokenise. A few thousand merges cover TOFU's vocabulary well, so a TOFU
answer is about one token per word and the models stay small and fast.

Special tokens: `<pad>` (id 0), `<s>` (BOS, id 1, added in front of every encoding by the
post-processor, as `add_special_tokens=True` does for Llama) and `</s>` (EOS, id 2, appended
by `jaxunlearn.data.tokenize_qa`). The pipeline uses the "qa" prompt format
(`"Question: {q}\\nAnswer:"` + `" {a}"` + EOS): byte-level BPE attaches a word's leading
space to the word, so the prompt's tokens are a prefix of the full text's tokens and the
answer-only label mask is exact (see `jaxunlearn.data.formats`).

The tokenizer is shared by the target and the oracle (as a pretrained tokenizer would be);
it sees the forget authors' names as text, which lets names become single tokens but carries
no model parameters, so the oracle still never trains on the forget set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Any:
    """Trains a byte-level BPE tokenizer and wraps it as a `transformers` fast tokenizer.

    Args:
      texts: the training text (each question and answer one string).
      vocab_size: the vocabulary size including the 256 byte tokens and the 3 special tokens.

    Returns:
      A `transformers.PreTrainedTokenizerFast` with `bos_token` `<s>`, `eos_token` `</s>`,
      `pad_token` `<pad>`; `tokenizer(text)` starts with BOS.

    Raises:
      ValueError: `vocab_size` smaller than the byte alphabet plus the special tokens, or no
        text.

    References:
      Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units", 2016,
      arXiv:1508.07909 (BPE); Radford et al., 2019 (GPT-2's byte-level BPE).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(alphabet)} byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {len(alphabet) + 3}"
        )
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_bpe_tokenizer got no text to train on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # BOS in front, as Llama tokenizers do with add_special_tokens=True; EOS is appended by
    # the data layer where an answer is scored, so a prompt for generation has no EOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def tofu_tokenizer_texts(records: Iterable[dict[str, Any]], refusals: Iterable[str]) -> list[str]:
    """The strings a TOFU tokenizer is trained on: every question and answer, and refusals.

    Args:
      records: TOFU rows; "question", "answer" and, where present, "paraphrased_answer",
        "paraphrased_question" and the "perturbed_answer" list are used.
      refusals: "I don't know" lines (IdkDPO alternates).

    Returns:
      The texts, in a deterministic order (so the trained tokenizer is reproducible).
    """
    texts: list[str] = []
    for row in records:
        for key in ("question", "answer", "paraphrased_question", "paraphrased_answer"):
            if isinstance(row.get(key), str):
                texts.append(row[key])
        perturbed = row.get("perturbed_answer")
        if isinstance(perturbed, list):
            texts.extend(p for p in perturbed if isinstance(p, str))
    texts.extend(refusals)
    return texts


def save_tokenizer(tokenizer: Any, path: str | os.PathLike) -> Path:
    """Saves the tokenizer (`tokenizer.json` + config) so `AutoTokenizer` loads it back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(os.fspath(path))
    return path


__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "save_tokenizer",
    "tofu_tokenizer_texts",
    "train_bpe_tokenizer",
]
