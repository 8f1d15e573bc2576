"""Reading and checking record files (JSON Lines or JSON arrays) with errors a user can act on.

Every loader in `jaxunlearn.data` reads through `datasets.load_dataset("json", ...)` (so users
get a `datasets.Dataset` they already know how to map and filter), but the `datasets` error for
a broken file is a pyarrow parse error with no line number, an empty file raises a bare
`StopIteration`, and a row with a missing field silently becomes `None`. So the loaders check
the columns they need, and when anything is wrong they re-read the file here, line by line, to
name the file, the line and the field in the error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Field kinds in a schema: a scalar string, or a list of strings (perturbed answers, choices).
STR = "str"
STR_LIST = "list[str]"

QA_FIELDS: dict[str, str] = {"question": STR, "answer": STR}
TEXT_FIELDS: dict[str, str] = {"text": STR}

PathLike = str | os.PathLike


def _iter_json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yields (where, value) for each record of a JSON Lines file or a JSON array file.

    `where` is "line N" (1-based) for JSON Lines and "item N" (0-based) for a JSON array, so an
    error message can point at the record. Blank lines are skipped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); save the file as UTF-8") from err
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {err.lineno}: unreadable JSON array ({err.msg} at column "
                f"{err.colno}); fix the file or write one JSON object per line"
            ) from err
        except (RecursionError, ValueError) as err:  # nesting too deep, a 4300+ digit number
            raise ValueError(f"{path}: unreadable JSON array ({err}); fix the file") from None
        for index, item in enumerate(items):
            yield f"item {index}", item
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: unreadable JSON line ({err.msg} at column {err.colno}); "
                "each line must be one JSON object"
            ) from err
        except (RecursionError, ValueError) as err:  # nesting too deep, a 4300+ digit number
            raise ValueError(
                f"{path}, line {number}: unreadable JSON line ({str(err)[:200]}); each line must "
                "be one JSON object"
            ) from None
        yield f"line {number}", record


def _check_record(record: Any, schema: Mapping[str, str], where: str) -> None:
    """Raises ValueError naming `where` and the field if `record` does not fit `schema`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field, kind in schema.items():
        value = record.get(field)
        if value is None:
            raise ValueError(
                f"{where}: missing field '{field}' (record has fields {sorted(record)}; "
                f"required: {list(schema)})"
            )
        if kind == STR and not isinstance(value, str):
            raise ValueError(
                f"{where}: field '{field}' must be a string, got {type(value).__name__}"
            )
        if kind == STR_LIST and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"{where}: field '{field}' must be a list of strings")


def scan_records(path: PathLike, schema: Mapping[str, str], label: str | None = None) -> list[dict]:
    """Reads every record of a file and checks it against a schema, naming file and line on error.

    Args:
      path: a JSON Lines file (one object per line) or a file holding one JSON array.
      schema: required field -> kind (`STR` or `STR_LIST`).
      label: what the file is for the user (e.g. "TOFU split 'forget10'"); prefixed to errors.

    Returns:
      The records, as dicts, in file order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is empty, a line is not valid JSON, a record is not an object, or a
        required field is missing or of the wrong type.
    """
    path = Path(path)
    prefix = f"{label} ({path})" if label else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{prefix}: no such file")
    records = []
    for where, record in _iter_json_records(path):
        _check_record(record, schema, f"{prefix}, {where}")
        records.append(record)
    if not records:
        raise ValueError(f"{prefix}: the file is empty (no records); check the path and split")
    return records


def read_jsonl_records(
    path: PathLike, *, required_fields: Sequence[str] | None = None
) -> list[dict]:
    """Reads a user's unlearning file: JSON Lines (or a JSON array) of {question, answer} or {text}.

    The kind is taken from the first record: records with `question` and `answer` are TOFU-style
    QA items, records with `text` are plain-text items (MUSE-style). Every record must then carry
    the same fields as strings; other fields are kept.

    Args:
      path: the file.
      required_fields: fields to require instead of inferring {question, answer} or {text}.

    Returns:
      The records as dicts, in file order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: empty file, unreadable JSON (naming file and line), or a missing field (naming
        file, line and field).
    """
    path = Path(path)
    if required_fields is not None:
        return scan_records(path, dict.fromkeys(required_fields, STR))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    for where, first in _iter_json_records(path):
        if isinstance(first, dict) and {"question", "answer"} <= first.keys():
            schema = QA_FIELDS
        elif isinstance(first, dict) and "text" in first:
            schema = TEXT_FIELDS
        else:
            found = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise ValueError(
                f"{path}, {where}: expected records with fields {{question, answer}} (QA) or "
                f"{{text}} (plain text); found {found}"
            )
        break
    else:
        raise ValueError(f"{path}: the file is empty (no records)")
    return scan_records(path, schema)


def schema_problem(dataset: Any, schema: Mapping[str, str]) -> str | None:
    """Returns a description of the first column of `dataset` that does not fit `schema`, or None.

    Checks presence, Arrow type and nulls (a JSON row missing a field becomes a null).
    """
    import datasets

    for field, kind in schema.items():
        if field not in dataset.column_names:
            return f"missing field '{field}' (columns: {dataset.column_names})"
        feature = dataset.features[field]
        if kind == STR and getattr(feature, "dtype", None) not in ("string", "large_string"):
            return f"field '{field}' must hold strings, found {feature}"
        if kind == STR_LIST and not isinstance(feature, datasets.List | datasets.LargeList):
            return f"field '{field}' must hold lists of strings, found {feature}"
        nulls = dataset.data.column(field).null_count
        if nulls:
            return f"field '{field}' is missing in {nulls} row(s)"
    return None


def load_json_split(path: PathLike, schema: Mapping[str, str], label: str) -> Any:
    """Loads a JSON Lines / JSON array file with `datasets` and checks it against a schema.

    Args:
      path: the file.
      schema: required field -> kind.
      label: what the file is for the user, e.g. "TOFU split 'forget10'".

    Returns:
      A `datasets.Dataset`.

    Raises:
      FileNotFoundError, ValueError: as `scan_records`, naming `label`, file, line and field.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: no such file {path}")
    if not path.read_bytes().strip():
        raise ValueError(f"{label} ({path}): the file is empty (no records)")
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as err:
        # Re-read the file ourselves for a message with a line number; if that finds nothing,
        # fall through to the original error.
        scan_records(path, schema, label)
        raise ValueError(f"{label} ({path}): `datasets` could not read the file: {err}") from err
    if len(dataset) == 0:
        raise ValueError(f"{label} ({path}): the file is empty (no records)")
    problem = schema_problem(dataset, schema)
    if problem:
        scan_records(path, schema, label)  # raises with the line of the first bad record
        raise ValueError(f"{label} ({path}): {problem}")
    return dataset


def load_multiple_choice(path_or_rows: PathLike | Sequence[Mapping] | Any) -> list[dict]:
    """Loads multiple-choice items in WMDP / MMLU form {question, choices, answer}.

    Also accepts TOFU's `real_authors` / `world_facts` form (`option1`..`optionN` and the answer
    as the text of the right option) and answers given as letters ("A".."D"), and returns every
    item as {question, choices: list[str], answer: int index} (other fields are kept).

    Args:
      path_or_rows: a JSON Lines / JSON array file, or a sequence of row dicts (a list or a
        `datasets.Dataset`).

    Returns:
      The items as dicts.

    Raises:
      ValueError: no items, a missing question/choices, or an answer that is not one of the
        choices; the message names the file (or "rows") and the item.
    """
    if isinstance(path_or_rows, str | os.PathLike):
        source = str(path_or_rows)
        if not Path(path_or_rows).is_file():
            raise FileNotFoundError(f"{source}: no such file")
        rows = [r for _, r in _iter_json_records(Path(path_or_rows))]
    else:
        source, rows = "rows", list(path_or_rows)
    if not rows:
        raise ValueError(f"{source}: no multiple-choice items")
    return [_multiple_choice_item(row, f"{source}, item {i}") for i, row in enumerate(rows)]


def _multiple_choice_item(row: Any, where: str) -> dict:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    item = dict(row)
    if not isinstance(item.get("question"), str):
        raise ValueError(f"{where}: missing field 'question' (fields: {sorted(item)})")
    if "choices" in item:
        choices = item["choices"]
    else:
        options = sorted(
            (k for k in item if k.startswith("option") and k[6:].isdigit()),
            key=lambda k: int(k[6:]),
        )
        if not options:
            raise ValueError(f"{where}: missing field 'choices' (or option1..optionN)")
        choices = [item.pop(k) for k in options]
    if not (
        isinstance(choices, list | tuple)
        and len(choices) >= 2
        and all(isinstance(c, str) for c in choices)
    ):
        raise ValueError(f"{where}: field 'choices' must be a list of at least 2 strings")
    answer = item.get("answer")
    if isinstance(answer, str) and answer in choices:
        index = list(choices).index(answer)
    elif isinstance(answer, str) and len(answer) == 1 and "A" <= answer <= "Z":
        index = ord(answer) - ord("A")
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        raise ValueError(
            f"{where}: field 'answer' must be a choice index, a letter or the text of a choice; "
            f"got {answer!r}"
        )
    if not 0 <= index < len(choices):
        raise ValueError(f"{where}: answer {answer!r} is out of range for {len(choices)} choices")
    item.update(choices=list(choices), answer=index)
    return item
