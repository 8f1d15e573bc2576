"""TOFU and MUSE benchmark data: which splits exist, which fields they carry, and loaders.

TOFU ships inside the package (`jaxunlearn/data/tofu/`, MIT licence, see its README.md), so
the TOFU benchmark runs offline. MUSE is read from a folder laid out like the hub dataset
`muse-bench/MUSE-News` (`<config>/<split>.json`), or from the hub when asked.

References:
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024, arXiv:2401.06121.
  Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024,
  arXiv:2407.06460.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jaxunlearn.data.records import (
    QA_FIELDS,
    STR,
    STR_LIST,
    TEXT_FIELDS,
    PathLike,
    load_json_split,
    schema_problem,
)

TOFU_DIR = Path(__file__).parent / "tofu"
TOFU_HUB = "locuslab/TOFU"

_PERTURBED = {
    **QA_FIELDS,
    "paraphrased_answer": STR,
    "perturbed_answer": STR_LIST,
    "paraphrased_question": STR,
}
_OPTIONS_PERTURBED = {**QA_FIELDS, "perturbed_answer": STR_LIST}
_MULTIPLE_CHOICE = {"question": STR, **{f"option{i}": STR for i in range(1, 5)}, "answer": STR}

# Split name -> required fields, as the hub configurations of locuslab/TOFU.
TOFU_SPLITS: dict[str, dict[str, str]] = {
    "full": QA_FIELDS,
    **{f"forget{p}": QA_FIELDS for p in ("01", "05", "10")},
    **{f"retain{p}": QA_FIELDS for p in ("99", "95", "90")},
    **{f"holdout{p}": QA_FIELDS for p in ("01", "05", "10")},
    **{f"forget{p}_perturbed": _PERTURBED for p in ("01", "05", "10")},
    "retain_perturbed": _PERTURBED,
    "real_authors_perturbed": _OPTIONS_PERTURBED,
    "world_facts_perturbed": _OPTIONS_PERTURBED,
    "real_authors": _MULTIPLE_CHOICE,
    "world_facts": _MULTIPLE_CHOICE,
}

MUSE_HUB = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
# Config -> fields of every split in it (muse-bench/MUSE-News dataset card).
MUSE_CONFIGS: dict[str, dict[str, str]] = {
    "knowmem": QA_FIELDS,
    "verbmem": {"prompt": STR, "gt": STR},
    "privleak": TEXT_FIELDS,
    "raw": TEXT_FIELDS,
    "scal": TEXT_FIELDS,
    "sust": TEXT_FIELDS,
    "train": TEXT_FIELDS,
}

_FORGET = re.compile(r"forget(\d\d)(_perturbed)?")


def _forget_percent(forget_split: str) -> int:
    match = _FORGET.fullmatch(forget_split)
    if not match:
        raise ValueError(
            f"'{forget_split}' is not a TOFU forget split; expected forget01, forget05 or "
            "forget10 (optionally with _perturbed)"
        )
    return int(match.group(1))


def tofu_retain_split(forget_split: str) -> str:
    """Returns the retain split that pairs with a forget split: forget10 -> retain90.

    The retain model (the oracle for forget quality) is fine-tuned on exactly this split.
    """
    return f"retain{100 - _forget_percent(forget_split):02d}"


def tofu_holdout_split(forget_split: str) -> str:
    """Returns the holdout (MIA non-member) split of the same size: forget10 -> holdout10."""
    return f"holdout{_forget_percent(forget_split):02d}"


def tofu_perturbed_split(forget_split: str) -> str:
    """Returns the evaluation split with paraphrased/perturbed answers: forget10 -> forget10_perturbed."""
    return f"forget{_forget_percent(forget_split):02d}_perturbed"


def _find_split_file(folder: Path, split: str) -> Path:
    for suffix in (".json", ".jsonl"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    found = sorted(p.stem for p in folder.glob("*.json*")) if folder.is_dir() else []
    raise FileNotFoundError(
        f"no file {split}.json or {split}.jsonl in {folder}; splits there: {found or 'none'}"
    )


def load_tofu(split: str, *, data_dir: PathLike | None = None, hub: bool = False) -> Any:
    """Loads one TOFU split as a `datasets.Dataset`, checking its fields.

    Args:
      split: a TOFU configuration name: full, forget01/05/10, retain99/95/90, holdout01/05/10,
        forget01/05/10_perturbed, retain_perturbed, real_authors(_perturbed),
        world_facts(_perturbed). With `data_dir`, any `<split>.json` there with
        {question, answer} is accepted too.
      data_dir: a folder of `<split>.json` JSON Lines files; default: the packaged copy.
      hub: read the configuration `split` of `locuslab/TOFU` from the Hugging Face hub instead.

    Returns:
      A `datasets.Dataset` with the split's fields (see `TOFU_SPLITS`).

    Raises:
      ValueError: unknown split, empty file, unreadable JSON line (naming file and line) or a
        missing field (naming split and field).

    References:
      Maini et al., 2024, arXiv:2401.06121; hub dataset `locuslab/TOFU`.
    """
    schema = TOFU_SPLITS.get(split)
    if schema is None and (hub or data_dir is None):
        raise ValueError(f"unknown TOFU split '{split}'; known splits: {sorted(TOFU_SPLITS)}")
    label = f"TOFU split '{split}'"
    if hub:
        import datasets

        dataset = datasets.load_dataset(TOFU_HUB, split, split="train")
        problem = schema_problem(dataset, schema)
        if problem:
            raise ValueError(f"{label} (hub {TOFU_HUB}): {problem}")
        return dataset
    folder = Path(data_dir) if data_dir is not None else TOFU_DIR
    return load_json_split(_find_split_file(folder, split), schema or QA_FIELDS, label)


def load_idk(path: PathLike | None = None) -> list[str]:
    """Loads the "I don't know" refusal answers used by IdkDPO / IdkNLL (one plain line each).

    Args:
      path: a text file with one refusal per line; default: TOFU's `idontknow.jsonl` (100
        lines, copied from locuslab/tofu).

    Returns:
      The refusal strings, stripped, blank lines dropped.

    Raises:
      ValueError: the file holds no refusal.
    """
    path = Path(path) if path is not None else TOFU_DIR / "idontknow.jsonl"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    refusals = [line for line in lines if line]
    if not refusals:
        raise ValueError(f"{path}: no refusal lines (the file is empty)")
    return refusals


def load_muse(
    data_dir: PathLike | None,
    config: str,
    split: str,
    *,
    hub: bool = False,
    corpus: str = "news",
) -> Any:
    """Loads one MUSE split as a `datasets.Dataset`, checking its fields.

    Args:
      data_dir: a folder laid out like the hub dataset: `knowmem/{forget_qa,retain_qa,
        forget_qa_icl,retain_qa_icl}.json` (question, answer), `verbmem/forget.json` (prompt,
        gt), `privleak/{forget,retain,holdout}.json` and `raw/*.json` (text). Unused with `hub`.
      config: knowmem, verbmem, privleak, raw, scal, sust or train.
      split: the split inside the config, e.g. forget_qa, forget, retain1, holdout.
      hub: read `muse-bench/MUSE-{News,Books}` from the Hugging Face hub instead.
      corpus: "news" or "books" (hub only).

    Returns:
      A `datasets.Dataset` with the config's fields (see `MUSE_CONFIGS`).

    Raises:
      ValueError: unknown config, empty file, unreadable JSON (file and line), missing field.

    References:
      Shi et al., 2024, arXiv:2407.06460; hub datasets `muse-bench/MUSE-News`, `MUSE-Books`.
    """
    schema = MUSE_CONFIGS.get(config)
    if schema is None:
        raise ValueError(f"unknown MUSE config '{config}'; known configs: {sorted(MUSE_CONFIGS)}")
    label = f"MUSE {config} split '{split}'"
    if hub:
        import datasets

        if corpus.lower() not in MUSE_HUB:
            raise ValueError(f"unknown MUSE corpus '{corpus}'; use 'news' or 'books'")
        name = MUSE_HUB[corpus.lower()]
        dataset = datasets.load_dataset(name, config, split=split)
        problem = schema_problem(dataset, schema)
        if problem:
            raise ValueError(f"{label} (hub {name}): {problem}")
        return dataset
    if data_dir is None:
        raise ValueError("load_muse needs data_dir (a folder laid out like the hub) or hub=True")
    return load_json_split(_find_split_file(Path(data_dir) / config, split), schema, label)
