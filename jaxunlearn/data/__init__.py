"""Data for unlearning runs: loading benchmarks and user files, prompt formats, label masks, batches.

Everything here is host-side numpy; the training step shards the global batches it is given.

- Loading (`datasets.Dataset` out): `load_tofu` (packaged, offline), `load_idk`, `load_muse`,
  `load_multiple_choice` (WMDP/MMLU form), `read_jsonl_records` (a user's forget/retain file).
- Prompt formats ("chat", "llama2", "qa", "raw") and answer-only labels: `prompt_format`,
  `tokenize_qa`, `tokenize_text`, `tokenize_records`, `encode_prompt`.
- Your own data in one call: `forget_retain(tokenizer, forget, retain, ...)` takes records, a
  JSON Lines path or a `datasets.Dataset` and returns the sampler `jaxunlearn.unlearn` consumes.
- Batches: `pad_to_bucket` (fixed length buckets), `ForgetRetainSampler` /
  `forget_retain_batches` (order a pure function of (seed, step)), `check_overlap`.
"""

from jaxunlearn.data.batching import DEFAULT_BUCKETS, bucket_length, check_overlap, pad_to_bucket
from jaxunlearn.data.benchmarks import (
    MUSE_CONFIGS,
    TOFU_DIR,
    TOFU_SPLITS,
    load_idk,
    load_muse,
    load_tofu,
    tofu_holdout_split,
    tofu_perturbed_split,
    tofu_retain_split,
)
from jaxunlearn.data.formats import (
    IGNORE_INDEX,
    PROMPT_FORMATS,
    PromptFormat,
    chunk_text,
    encode_prompt,
    prompt_format,
    tokenize_qa,
    tokenize_records,
    tokenize_text,
)
from jaxunlearn.data.records import load_multiple_choice, read_jsonl_records
from jaxunlearn.data.sampling import (
    AlternateAnswers,
    BatchIndices,
    ForgetRetainSampler,
    forget_retain_batches,
    idk_alternates,
)
from jaxunlearn.data.unlearning import default_format, forget_retain, power_of_two_buckets

__all__ = [
    "DEFAULT_BUCKETS",
    "IGNORE_INDEX",
    "MUSE_CONFIGS",
    "PROMPT_FORMATS",
    "TOFU_DIR",
    "TOFU_SPLITS",
    "AlternateAnswers",
    "BatchIndices",
    "ForgetRetainSampler",
    "PromptFormat",
    "bucket_length",
    "check_overlap",
    "chunk_text",
    "encode_prompt",
    "default_format",
    "forget_retain",
    "forget_retain_batches",
    "idk_alternates",
    "load_idk",
    "load_multiple_choice",
    "load_muse",
    "load_tofu",
    "pad_to_bucket",
    "power_of_two_buckets",
    "prompt_format",
    "read_jsonl_records",
    "tofu_holdout_split",
    "tofu_perturbed_split",
    "tofu_retain_split",
    "tokenize_qa",
    "tokenize_records",
    "tokenize_text",
]
