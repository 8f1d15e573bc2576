"""The TOFU benchmark end to end: tokenizer, target and oracle, every method, leaderboard.

`run_tofu(preset)` does what the TOFU paper and open-unlearning do, at a size a laptop runs:

1. train a byte-level BPE tokenizer on the TOFU text in use (`pipeline.tokenizer`);
2. train a Llama-style model from scratch on the preset's authors plus the real-authors and
   world-facts answers (the *target*), and with the identical recipe on the retain authors
   plus the same real-world sets (the *oracle*, one per forget split); both are cached on
   disk in Hugging Face format under a hash of everything that shapes them, and reused;
3. evaluate the oracle on TOFU: its per-item forget truth ratios are the reference of forget
   quality, its Min-K% AUC the reference of PrivLeak;
4. unlearn the forget authors from the target with every method (`jaxunlearn.recipes` +
   `jaxunlearn.train.unlearn`), evaluate each result, and write open-unlearning-shaped
   `TOFU_EVAL.json` files, a leaderboard (Markdown + JSON) and the forget-quality vs
   model-utility plot.

Prompt format: "qa" (`Question: {q}\\nAnswer: {a}</s>`), recorded in every evaluation's
metadata. The forget quality of the oracle against itself is 1.0 by construction (the KS test
of a sample against itself).

References:
  Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", 2024, arXiv:2401.06121.
  Dorna et al., "OpenUnlearning", 2025, arXiv:2506.12618.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxunlearn._io import atomic_write_text, jsonable
from jaxunlearn.data import load_idk, load_tofu, tofu_holdout_split, tofu_perturbed_split
from jaxunlearn.eval.report import load_eval_logs, summarize
from jaxunlearn.pipeline import leaderboard as lb
from jaxunlearn.pipeline.finetune import finetune
from jaxunlearn.pipeline.presets import (
    QUESTIONS_PER_AUTHOR,
    TofuPreset,
    eval_counts,
    forget_author_ids,
    get_preset,
    retain_author_ids,
    target_author_ids,
)
from jaxunlearn.pipeline.tokenizer import save_tokenizer, tofu_tokenizer_texts, train_bpe_tokenizer

PROMPT_FORMAT = "qa"
# Bumped when the way models are trained changes, so stale caches are not reused.
CACHE_VERSION = 1
_REALWORLD = ("real_authors", "world_facts")


def default_cache_dir() -> Path:
    """`$JAXUNLEARN_CACHE/tofu`, else `~/.cache/jaxunlearn/tofu`."""
    root = os.environ.get("JAXUNLEARN_CACHE") or Path.home() / ".cache" / "jaxunlearn"
    return Path(root) / "tofu"


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class TofuData:
    """The records one preset trains, unlearns and evaluates on.

    Attributes:
      target_train: {question, answer} rows the target is trained on.
      oracle_train: forget split -> rows the oracle is trained on.
      forget: forget split -> the forget rows (what unlearning removes).
      retain: forget split -> the retain rows unlearning may use: the oracle's training rows
        (retain authors + real-world answers; see `load_tofu_data`).
      eval_rows: forget split -> {TOFU split name: rows} evaluated (author subsets applied).
      tokenizer_texts: the text the tokenizer is trained on.
    """

    target_train: list[dict[str, str]]
    oracle_train: dict[str, list[dict[str, str]]]
    forget: dict[str, list[dict[str, str]]]
    retain: dict[str, list[dict[str, str]]]
    eval_rows: dict[str, dict[str, list[dict[str, Any]]]]
    tokenizer_texts: list[str]


def _qa(row: Mapping[str, Any]) -> dict[str, str]:
    return {"question": row["question"], "answer": row["answer"]}


def _author_rows(full: list[dict], authors: Sequence[int]) -> list[dict[str, str]]:
    n = QUESTIONS_PER_AUTHOR
    return [_qa(r) for a in authors for r in full[a * n : (a + 1) * n]]


def load_tofu_data(preset: TofuPreset) -> TofuData:
    """Selects the preset's training, unlearning and evaluation rows from the packaged TOFU."""
    full = load_tofu("full").to_list()
    n = preset.realworld_train_items
    realworld = [_qa(r) for name in _REALWORLD for r in load_tofu(name).to_list()[:n]]
    target_train = _author_rows(full, target_author_ids(preset)) + realworld
    oracle_train, forget, retain, eval_rows = {}, {}, {}, {}
    for split in preset.forget_splits:
        oracle_train[split] = _author_rows(full, retain_author_ids(preset, split)) + realworld
        forget[split] = _author_rows(full, forget_author_ids(preset, split))
        # The retain set is everything the target was trained on except the forget set, i.e.
        # the oracle's training data. open-unlearning's retainXX holds TOFU authors only
        # because its real-world facts come from pretraining; here they were fine-tuned
        # alongside the authors, so they belong to the data unlearning must keep.
        retain[split] = oracle_train[split]
        eval_rows[split] = _eval_rows(preset, split)
    texts = [t for r in target_train for t in (r["question"], r["answer"])]
    for split_rows in eval_rows.values():
        texts += tofu_tokenizer_texts([r for rows in split_rows.values() for r in rows], [])
    texts += load_idk()
    return TofuData(target_train, oracle_train, forget, retain, eval_rows, texts)


def _eval_rows(preset: TofuPreset, split: str) -> dict[str, list[dict[str, Any]]]:
    counts = eval_counts(preset, split)

    def head(name: str, n: int | None) -> list[dict[str, Any]]:
        rows = load_tofu(name).to_list()
        return rows if n is None else rows[:n]

    rows = {
        tofu_perturbed_split(split): head(tofu_perturbed_split(split), counts["forget"]),
        "retain_perturbed": head("retain_perturbed", counts["retain"]),
        tofu_holdout_split(split): head(tofu_holdout_split(split), counts["holdout"]),
    }
    for name in _REALWORLD:
        rows[f"{name}_perturbed"] = head(f"{name}_perturbed", counts["realworld"])
    empty = [name for name, r in rows.items() if not r]
    if empty:
        raise ValueError(f"preset '{preset.name}': no evaluation rows in {empty}")
    return rows


# ----------------------------------------------------------------------------- cache keys


def _digest(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def model_cache_key(preset: TofuPreset, data: TofuData) -> str:
    """Hash of everything the tokenizer, target and oracles depend on (16 hex digits)."""
    record = {
        "version": CACHE_VERSION,
        "format": PROMPT_FORMAT,
        "vocab_size": preset.vocab_size,
        "max_length": preset.max_length,
        "model": dataclasses.asdict(preset.model),
        "finetune": preset.finetune.to_dict(),
        "splits": list(preset.forget_splits),
        "target_train": _digest(data.target_train),
        "oracle_train": {s: _digest(rows) for s, rows in data.oracle_train.items()},
        "tokenizer_texts": _digest(data.tokenizer_texts),
    }
    return _digest(record)[:16]


def eval_cache_key(preset: TofuPreset, split: str, data: TofuData) -> str:
    """Hash of the evaluation settings and items of one split (12 hex digits)."""
    record = {"eval": dataclasses.asdict(preset.eval), "rows": _digest(data.eval_rows[split])}
    return _digest(record)[:12]


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class TofuModels:
    """The trained (or cached) tokenizer, target and oracles of a preset.

    Attributes:
      cache_dir: the folder holding them (`<cache>/<preset>-<key>`).
      key: the cache key.
      tokenizer: the trained tokenizer.
      target_dir: the target's Hugging Face directory.
      oracle_dirs: forget split -> the oracle's Hugging Face directory.
      trained: names of the models trained in this call (empty when all came from the cache).
      seconds: stage -> wall seconds of this call (training, or loading the cache).
    """

    cache_dir: Path
    key: str
    tokenizer: Any
    target_dir: Path
    oracle_dirs: dict[str, Path]
    trained: list[str]
    seconds: dict[str, float]

    def train_log(self, name: str) -> dict[str, Any]:
        """The training record of "target" or "oracle-<split>" (loss history, seconds)."""
        folder = self.target_dir if name == "target" else self.oracle_dirs[name.split("-", 1)[1]]
        return json.loads((folder / "train_log.json").read_text(encoding="utf-8"))


def model_config(preset: TofuPreset, tokenizer: Any) -> Any:
    """The `ModelConfig` of the preset's Llama-style model for this tokenizer."""
    from jaxunlearn.models import ModelConfig

    shape = preset.model
    return ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tokenize_rows(tokenizer: Any, rows: Sequence[Mapping[str, str]], max_length: int) -> list:
    """{question, answer} rows -> {"input_ids", "labels"} examples in the "qa" format."""
    from jaxunlearn.data import tokenize_qa

    return [
        tokenize_qa(tokenizer, r["question"], r["answer"], PROMPT_FORMAT, max_length) for r in rows
    ]


def _is_complete(folder: Path) -> bool:
    return all(
        (folder / f).is_file() for f in ("config.json", "model.safetensors", "train_log.json")
    )


def _train_and_save(
    name: str, preset: TofuPreset, tokenizer: Any, rows: list, folder: Path, progress: bool
) -> float:
    from jaxunlearn.checkpoints import save_pretrained

    start = time.perf_counter()
    examples = tokenize_rows(tokenizer, rows, preset.max_length)
    model, history = finetune(
        model_config(preset, tokenizer),
        examples,
        preset.finetune,
        pad_id=tokenizer.pad_token_id,
        progress=progress,
        desc=f"train {name}",
    )
    seconds = time.perf_counter() - start
    save_pretrained(model, folder, tokenizer=tokenizer, overwrite=True)
    log = {"name": name, "items": len(rows), "loss_by_epoch": history, "seconds": seconds}
    # Written last: a folder without it is an interrupted run and is trained again.
    atomic_write_text(folder / "train_log.json", json.dumps(log, indent=2) + "\n")
    return seconds


def prepare_models(
    preset: str | TofuPreset,
    *,
    cache_dir: str | os.PathLike | None = None,
    data: TofuData | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TofuModels:
    """Trains the tokenizer, target and oracles of a preset, or loads them from the cache.

    Args:
      preset: a preset name or value.
      cache_dir: the cache root (default `default_cache_dir()`).
      data: the preset's rows (default `load_tofu_data(preset)`).
      progress: show progress bars.
      log: where progress lines go.

    Returns:
      `TofuModels`.
    """
    from jaxunlearn.checkpoints import load_tokenizer

    preset = get_preset(preset)
    data = data or load_tofu_data(preset)
    key = model_cache_key(preset, data)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"{preset.name}-{key}"
    seconds: dict[str, float] = {}
    trained: list[str] = []
    tok_dir = folder / "tokenizer"
    start = time.perf_counter()
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = train_bpe_tokenizer(data.tokenizer_texts, preset.vocab_size)
        save_tokenizer(tokenizer, tok_dir)
        tokenizer = load_tokenizer(tok_dir)  # exactly what later runs will load
        trained.append("tokenizer")
    seconds["tokenizer"] = time.perf_counter() - start
    jobs = [("target", folder / "target", data.target_train)]
    jobs += [
        (f"oracle-{s}", folder / f"oracle-{s}", data.oracle_train[s]) for s in preset.forget_splits
    ]
    for name, model_dir, rows in jobs:
        if _is_complete(model_dir):
            log(f"[tofu] {name}: reusing {model_dir}")
            seconds[name] = 0.0
            continue
        log(f"[tofu] {name}: training on {len(rows)} items ({preset.finetune.epochs} epochs)")
        seconds[name] = _train_and_save(name, preset, tokenizer, rows, model_dir, progress)
        trained.append(name)
    oracle_dirs = {s: folder / f"oracle-{s}" for s in preset.forget_splits}
    return TofuModels(folder, key, tokenizer, folder / "target", oracle_dirs, trained, seconds)


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(
    model: Any,
    tokenizer: Any,
    preset: TofuPreset,
    split: str,
    rows: Mapping[str, list[dict[str, Any]]],
    *,
    retain_logs: Mapping[str, Any] | None = None,
    model_path: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Runs the TOFU suite (`jaxunlearn.eval.tofu.evaluate_tofu`) on the preset's items,
    given in memory as {TOFU split name: rows}.

    Returns:
      (logs, metadata, wall seconds).
    """
    from jaxunlearn.eval.tofu import evaluate_tofu

    extra = {} if preset.eval.buckets is None else {"buckets": preset.eval.buckets}
    start = time.perf_counter()
    result = evaluate_tofu(
        model,
        tokenizer,
        forget_split=split,
        rows=rows,
        fmt=PROMPT_FORMAT,
        retain_logs=retain_logs,
        max_new_tokens=preset.eval.max_new_tokens,
        batch_size=preset.eval.batch_size,
        model_path=model_path,
        **extra,
    )
    return dict(result.logs), dict(result.metadata), time.perf_counter() - start


def _write_logs(logs: Mapping[str, Any], metadata: Mapping[str, Any], folder: Path) -> Path:
    from jaxunlearn.eval.report import write_eval_logs

    return write_eval_logs(logs, folder, "TOFU", metadata=metadata)["eval"]


def _cached_eval(
    folder: Path,
    evaluate: Callable[[], tuple[dict[str, Any], dict[str, Any], float]],
    patch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], float]:
    """Loads `folder/TOFU_EVAL.json` or evaluates (then `patch`es and writes) it.

    Returns:
      (logs, the wall seconds the evaluation took when it ran).
    """
    path = folder / "TOFU_EVAL.json"
    if path.is_file():
        logs = load_eval_logs(path)
        return logs, float(logs.get("_jaxunlearn", {}).get("eval_seconds", 0.0))
    logs, metadata, seconds = evaluate()
    if patch is not None:
        patch(logs)
    _write_logs(logs, {**metadata, "eval_seconds": seconds}, folder)
    return load_eval_logs(path), seconds


def oracle_self_reference(logs: dict[str, Any]) -> None:
    """Fills the oracle's forget quality and PrivLeak against itself (1.0 and 0 by construction).

    Both are computed, not written in: the KS test of the oracle's truth ratios against
    themselves, and PrivLeak of its Min-K% AUC against the same AUC.
    """
    from jaxunlearn.eval.mia import privleak
    from jaxunlearn.eval.report import forget_quality_from_logs

    logs["forget_quality"] = {"agg_value": forget_quality_from_logs(logs, logs)}
    auc = logs.get("mia_min_k", {}).get("agg_value")
    if auc is not None:
        logs["privleak"] = {"agg_value": privleak(auc, auc)}


# ----------------------------------------------------------------------------- unlearning


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One unlearning run: a method and its settings (a sweep makes one per grid point).

    Attributes:
      method: a `jaxunlearn.recipes` method name.
      overrides: recipe hyperparameters on top of the preset's for this method.
      epochs: passes over the forget set (default: the preset's).
      batch_size: forget items per step (default: the preset's).
      setting: a label for sweep rows ("beta=0.1,lr=1e-05"); empty for the plain run.
    """

    method: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    setting: str = ""


def method_hyperparameters(preset: TofuPreset, run: MethodRun) -> dict[str, Any]:
    """The recipe overrides of a run: the preset's learning rate (for methods that take one),
    then the preset's per-method overrides, then the run's own (budget keys excluded)."""
    from jaxunlearn import recipes

    defaults = recipes.defaults(run.method)
    overrides: dict[str, Any] = {}
    if "learning_rate" in defaults:
        overrides["learning_rate"] = preset.unlearn.learning_rate
    overrides.update(preset.unlearn.method_overrides(run.method))
    overrides.update(run.overrides)
    return {k: v for k, v in overrides.items() if k not in BUDGET_KEYS}


# Keys of a preset's per-method overrides that set the run's budget, not the recipe.
BUDGET_KEYS = ("epochs", "batch_size")


def method_budget(preset: TofuPreset, run: MethodRun) -> tuple[int, int]:
    """(epochs, batch size) of a run: the run's own, else the preset's for this method, else
    the preset's default."""
    per_method = preset.unlearn.method_overrides(run.method)
    epochs = run.epochs or per_method.get("epochs") or preset.unlearn.epochs
    batch_size = run.batch_size or per_method.get("batch_size") or preset.unlearn.batch_size
    return int(epochs), int(batch_size)


def tofu_sampler(
    tokenizer: Any,
    data: TofuData,
    split: str,
    preset: TofuPreset,
    *,
    batch_size: int,
    retain: bool = True,
    refusals: bool = False,
) -> Any:
    """The split's forget (and retain / "I don't know" alternate) items as the sampler of
    `data.forget_retain`, padded to one length so a run compiles once."""
    from jaxunlearn.data import forget_retain

    return forget_retain(
        tokenizer,
        data.forget[split],
        data.retain[split] if retain else None,
        fmt=PROMPT_FORMAT,
        max_length=preset.max_length,
        batch_size=batch_size,
        seed=preset.unlearn.seed,
        refusals=True if refusals else None,
        buckets="longest",
    )


def unlearn_method(
    run: MethodRun,
    target: Any,
    tokenizer: Any,
    data: TofuData,
    split: str,
    preset: TofuPreset,
    *,
    progress: bool = True,
    log_path: str | os.PathLike | None = None,
) -> tuple[Any, int | None, dict[str, Any]]:
    """Unlearns the split's forget rows from the target with one method.

    Returns:
      (the unlearned model, optimizer steps taken (None for one-shot methods), the recipe's
      hyperparameters as run).
    """
    import math

    from jaxunlearn import recipes, train

    overrides = method_hyperparameters(preset, run)
    recipe = recipes.recipe(run.method, **overrides)
    epochs, batch_size = method_budget(preset, run)
    one_shot = recipe.kind == "one_shot"  # SSD's Fisher passes read retain + forget
    sampler = tofu_sampler(
        tokenizer, data, split, preset, batch_size=batch_size,
        retain=recipe.needs_retain or one_shot, refusals=recipe.needs_alternate,
    )  # fmt: skip
    hyper = {k: v for k, v in recipe.hyperparameters.items()}
    if one_shot:
        # SSD: the forget set against the target's TOFU training data (retain + forget authors)
        model = train.ssd_unlearn_sampler(target, sampler, recipe.hyperparameters).model
        return model, None, hyper | {"batch_size": batch_size}
    steps = epochs * math.ceil(len(data.forget[split]) / batch_size)
    result = train.unlearn(
        target,
        recipe.objective,
        recipe.tx,
        sampler,
        steps=steps,
        seed=preset.unlearn.seed,
        progress=progress,
        log_path=log_path,
    )
    hyper |= {"epochs": epochs, "batch_size": batch_size}
    return result.model, result.step, hyper


# ----------------------------------------------------------------------------- the benchmark


def _log_row(log: Callable[[str], None], row: lb.LeaderboardRow) -> None:
    m = row.metrics
    log(
        f"[tofu] {row.split} {row.label:>12}: "
        f"FQ {lb.format_value(m['forget_quality'], 'forget_quality')}"
        f"  MU {lb.format_value(m['model_utility'], 'model_utility')}"
        f"  forget TR {lb.format_value(m['forget_truth_ratio'], 'forget_truth_ratio')}"
        f"  ({row.unlearn_seconds or 0:.1f}s + eval {row.eval_seconds or 0:.1f}s)"
    )


def _folder_name(name: str, setting: str = "") -> str:
    label = f"{name}-{setting}" if setting else name
    return "".join(c if c.isalnum() or c in "=.-_" else "_" for c in label)


class TofuBenchmark:
    """One forget split of a preset, ready for unlearning: cached target and oracle, the
    oracle's reference evaluation, samplers, and evaluation into leaderboard rows.

    `run_tofu` is a loop over methods on top of this; notebooks and scripts use it to try
    their own objectives and optax chains against the same target and oracle:

    >>> bench = TofuBenchmark("tiny")                                     # doctest: +SKIP
    >>> result = jaxunlearn.unlearn(bench.target(), objective, tx, bench.sampler(),
    ...                             steps=bench.steps())                  # doctest: +SKIP
    >>> row = bench.evaluate(result.model, "my method")                  # doctest: +SKIP
    >>> bench.write_leaderboard()                                         # doctest: +SKIP

    Args:
      preset: a preset name or value.
      split: the forget split (default the preset's first).
      out_dir: where evaluation logs and the leaderboard go (default `./tofu-<preset>`).
      cache_dir: the model cache root (default `default_cache_dir()`).
      progress: show progress bars.
      log: where progress lines go.
      robustness: also audit every evaluated model (`audit.robustness_summary`: forget
        quality after 50 relearning steps and after 4-bit quantization, each against the
        oracle attacked alike, best-layer probe accuracy, trace-detection accuracy) and add
        the columns; about 2 minutes per method on the `small` preset and 2 CPU cores.

    Attributes:
      preset, split, data (`TofuData`), models (`TofuModels`), tokenizer, out_dir,
      oracle_logs (the oracle's
      `TOFU_EVAL.json` contents: the forget-quality and PrivLeak reference), rows (the
      leaderboard so far: target, oracle, then every `evaluate` call).
    """

    def __init__(
        self,
        preset: str | TofuPreset = "small",
        *,
        split: str | None = None,
        out_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
        data: TofuData | None = None,
        models: TofuModels | None = None,
        robustness: bool = False,
    ):
        self.preset = get_preset(preset)
        self.robustness = robustness
        self.split = split or self.preset.forget_splits[0]
        if self.split not in self.preset.forget_splits:
            raise ValueError(
                f"preset '{self.preset.name}' has no forget split {self.split}; "
                f"it has {list(self.preset.forget_splits)}"
            )
        self.progress, self.log = progress, log
        self.out_dir = Path(out_dir) if out_dir is not None else Path(f"tofu-{self.preset.name}")
        self.data = data or load_tofu_data(self.preset)
        self.models = models or prepare_models(
            self.preset, cache_dir=cache_dir, data=self.data, progress=progress, log=log
        )
        self.tokenizer = self.models.tokenizer
        self.rows: list[lb.LeaderboardRow] = []
        self.oracle_logs = self._reference_rows()

    # -- models

    def target(self) -> Any:
        """A fresh copy of the target model (trained on retain + forget authors)."""
        from jaxunlearn.checkpoints import load_pretrained

        return load_pretrained(self.models.target_dir)

    def oracle(self) -> Any:
        """A fresh copy of the oracle (the same recipe on the retain authors only)."""
        from jaxunlearn.checkpoints import load_pretrained

        return load_pretrained(self.models.oracle_dirs[self.split])

    # -- data

    def examples(self, which: str) -> list[dict[str, Any]]:
        """Tokenised "forget" or "retain" items ({"input_ids", "labels"}, "qa" format)."""
        if which not in ("forget", "retain"):
            raise ValueError(f"examples: which must be 'forget' or 'retain', got {which!r}")
        rows = getattr(self.data, which)[self.split]
        return tokenize_rows(self.tokenizer, rows, self.preset.max_length)

    def sampler(
        self, *, retain: bool = True, refusals: bool = False, batch_size: int | None = None
    ) -> Any:
        """A `data.ForgetRetainSampler` over the forget items (and retain items / "I don't
        know" alternates), padded to one length so a run compiles once."""
        return tofu_sampler(
            self.tokenizer, self.data, self.split, self.preset,
            batch_size=batch_size or self.preset.unlearn.batch_size, retain=retain,
            refusals=refusals,
        )  # fmt: skip

    def steps(self, epochs: int | None = None, batch_size: int | None = None) -> int:
        """Optimizer steps of `epochs` passes over the forget set (default: the preset's)."""
        import math

        epochs = epochs or self.preset.unlearn.epochs
        batch_size = batch_size or self.preset.unlearn.batch_size
        return epochs * math.ceil(len(self.data.forget[self.split]) / batch_size)

    # -- evaluation

    def _reference_rows(self) -> dict[str, Any]:
        """Evaluates (or loads the cached evaluations of) the oracle and the target."""
        key = eval_cache_key(self.preset, self.split, self.data)
        oracle_dir, target_dir = self.models.oracle_dirs[self.split], self.models.target_dir
        oracle_logs, oracle_s = _cached_eval(
            oracle_dir / f"eval-{self.split}-{key}",
            lambda: self._evaluate(self.oracle(), None, str(oracle_dir)),
            patch=oracle_self_reference,
        )
        target_logs, target_s = _cached_eval(
            target_dir / f"eval-{self.split}-{key}",
            lambda: self._evaluate(self.target(), oracle_logs, str(target_dir)),
        )
        for name, logs, seconds, folder in (
            ("target", target_logs, target_s, target_dir),
            ("oracle", oracle_logs, oracle_s, oracle_dir),
        ):
            train_log = json.loads((folder / "train_log.json").read_text(encoding="utf-8"))
            path = _write_logs(logs, logs.get("_jaxunlearn", {}), self._eval_folder(name))
            self._add_row(
                lb.row_from_summary(
                    name,
                    self.split,
                    name,
                    summarize(logs),
                    unlearn_seconds=train_log["seconds"],
                    eval_seconds=seconds,
                    eval_path=str(path),
                    hyperparameters={
                        "epochs": self.preset.finetune.epochs,
                        "train_items": train_log["items"],
                    },
                )
            )
        return oracle_logs

    def _evaluate(self, model: Any, retain_logs: Any, model_path: str) -> tuple:
        return evaluate_model(
            model,
            self.tokenizer,
            self.preset,
            self.split,
            self.data.eval_rows[self.split],
            retain_logs=retain_logs,
            model_path=model_path,
        )

    def _eval_folder(self, name: str, setting: str = "") -> Path:
        return self.out_dir / "evals" / self.split / _folder_name(name, setting)

    def _add_row(self, row: lb.LeaderboardRow) -> lb.LeaderboardRow:
        self.rows.append(row)
        _log_row(self.log, row)
        return row

    def evaluate(
        self,
        model: Any,
        name: str,
        *,
        setting: str = "",
        unlearn_seconds: float | None = None,
        steps: int | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
    ) -> lb.LeaderboardRow:
        """Runs the TOFU suite on `model` against the oracle, writes its `TOFU_EVAL.json`
        (under `out_dir/evals/<split>/<name>`) and adds a leaderboard row.

        Returns:
          The row (also appended to `rows`).
        """
        logs, metadata, seconds = self._evaluate(model, self.oracle_logs, name)
        metadata |= {
            "method": name,
            "setting": setting,
            "eval_seconds": seconds,
            "unlearn_seconds": unlearn_seconds,
            "hyperparameters": dict(hyperparameters or {}),
        }
        summary = summarize(logs)
        if self.robustness:
            summary |= self.robustness_columns(model)
        path = _write_logs(logs, metadata, self._eval_folder(name, setting))
        return self._add_row(
            lb.row_from_summary(
                name,
                self.split,
                "unlearned",
                summary,
                unlearn_seconds=unlearn_seconds,
                eval_seconds=seconds,
                steps=steps,
                hyperparameters=dict(hyperparameters or {}),
                eval_path=str(path),
                setting=setting,
            )
        )

    def robustness_columns(self, model: Any) -> dict[str, float | None]:
        """The audit's leaderboard columns for `model` (see `robustness`)."""
        from jaxunlearn import audit

        rows = self.data.eval_rows[self.split]
        prompts = [r["question"] for n in _REALWORLD for r in rows[f"{n}_perturbed"]]
        options = audit.ScoringOptions(
            PROMPT_FORMAT, self.preset.eval.batch_size, max_length=self.preset.max_length,
            **({} if self.preset.eval.buckets is None else {"buckets": self.preset.eval.buckets}),
        )  # fmt: skip
        config = audit.suite.SUMMARY_CONFIG._replace(
            relearn_lr=self.preset.unlearn.learning_rate, max_length=self.preset.max_length
        )
        summary = audit.robustness_summary(
            self.target(), model, self.oracle(), self.tokenizer,
            rows[tofu_perturbed_split(self.split)], rows[tofu_holdout_split(self.split)],
            trace_prompts=prompts, options=options, config=config,
        )  # fmt: skip
        return {k: summary.get(k) for k in lb.ROBUSTNESS_COLUMNS}

    def run(self, run: MethodRun | str) -> lb.LeaderboardRow:
        """Unlearns with a `recipes` method from the target and evaluates the result."""
        run = MethodRun(run) if isinstance(run, str) else run
        start = time.perf_counter()
        model, steps, hyper = unlearn_method(
            run,
            self.target(),
            self.tokenizer,
            self.data,
            self.split,
            self.preset,
            progress=self.progress,
            log_path=self._eval_folder(run.method, run.setting) / "metrics.jsonl",
        )
        seconds = time.perf_counter() - start
        return self.evaluate(
            model,
            run.method,
            setting=run.setting,
            unlearn_seconds=seconds,
            steps=steps,
            hyperparameters=_reported(hyper, run),
        )

    def write_leaderboard(self, title: str | None = None) -> dict[str, Path]:
        """Writes `leaderboard.{md,json}` and `fq_vs_mu.png` of the rows into `out_dir`."""
        return _write_outputs(self.preset, self.rows, self.out_dir, self.models, {}, title)


def _reported(hyper: Mapping[str, Any], run: MethodRun) -> dict[str, Any]:
    """The hyperparameters worth a leaderboard column: those differing from the recipe's
    defaults (what this benchmark chose), plus the budget."""
    from jaxunlearn import recipes

    defaults = recipes.defaults(run.method)
    shown = {k: v for k, v in hyper.items() if k not in defaults or defaults[k] != v}
    for key in ("learning_rate", "epochs", "batch_size"):
        if key in hyper:
            shown[key] = hyper[key]
    return shown


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class TofuRun:
    """What `run_tofu` produced.

    Attributes:
      preset: the preset run.
      rows: the leaderboard rows (target, oracle, then one per method run, per split).
      paths: {"json", "markdown", "plot", "run"} output files.
      models: the tokenizer / target / oracle record (cache folder, what was trained).
      seconds: stage -> wall seconds ("total" included).
    """

    preset: TofuPreset
    rows: list[lb.LeaderboardRow]
    paths: dict[str, Path]
    models: TofuModels
    seconds: dict[str, float]

    def row(self, method: str, split: str | None = None) -> lb.LeaderboardRow:
        """The first row of `method` (on `split`, default the preset's first split)."""
        split = split or self.preset.forget_splits[0]
        for row in self.rows:
            if row.method == method and row.split == split:
                return row
        raise KeyError(f"no leaderboard row for method '{method}' on {split}")


def run_tofu(
    preset: str | TofuPreset = "small",
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    runs: Sequence[MethodRun] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    title: str | None = None,
    robustness: bool = False,
) -> TofuRun:
    """Runs the TOFU benchmark end to end and writes the leaderboard and plot.

    Args:
      preset: "tiny", "small" (default), "full", or a `TofuPreset`.
      out_dir: output folder (default `./tofu-<preset>`): `leaderboard.{md,json}`,
        `fq_vs_mu.png`, `run.json`, and `evals/<split>/<method>/TOFU_EVAL.json`.
      cache_dir: where the tokenizer, target and oracles are cached (default
        `default_cache_dir()`).
      methods: method names to run (default: the preset's list, every method).
      runs: explicit `MethodRun`s instead of `methods` (sweeps).
      progress: show progress bars.
      log: where progress lines go.
      title: the leaderboard title.
      robustness: add the audit's columns (see `TofuBenchmark`).

    Returns:
      `TofuRun`.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    preset = get_preset(preset)
    out = Path(out_dir) if out_dir is not None else Path(f"tofu-{preset.name}")
    if runs is None:
        names = methods if methods is not None else preset.unlearn.methods
        runs = [MethodRun(m) for m in names]
    data = load_tofu_data(preset)
    models = prepare_models(preset, cache_dir=cache_dir, data=data, progress=progress, log=log)
    seconds = dict(models.seconds)
    rows: list[lb.LeaderboardRow] = []
    for split in preset.forget_splits:
        bench = TofuBenchmark(
            preset, split=split, out_dir=out, progress=progress, log=log, data=data,
            models=models, robustness=robustness,
        )  # fmt: skip
        bar = tqdm(runs, desc=f"methods ({split})", disable=not progress, leave=False)
        for run in bar:
            bar.set_postfix_str(run.setting or run.method)
            row = bench.run(run)
            seconds[f"{split}/{_folder_name(run.method, run.setting)}"] = (
                row.unlearn_seconds + row.eval_seconds
            )
        bar.close()
        rows += bench.rows
    seconds["total"] = time.perf_counter() - start
    paths = _write_outputs(preset, rows, out, models, seconds, title)
    log(f"[tofu] leaderboard: {paths['markdown']} (JSON: {paths['json']})")
    log(f"[tofu] plot:        {paths['plot']}")
    return TofuRun(preset, rows, paths, models, seconds)


def _write_outputs(
    preset: TofuPreset,
    rows: list[lb.LeaderboardRow],
    out: Path,
    models: TofuModels,
    seconds: dict[str, float],
    title: str | None,
) -> dict[str, Path]:
    import platform

    import jax

    notes = [
        f"preset `{preset.name}`: {preset.description}",
        f"prompt format `{PROMPT_FORMAT}`; models cached in `{models.cache_dir}`",
        f"device: {jax.devices()[0].platform} x{jax.device_count()}, {platform.machine()}"
        + (f"; total wall time {seconds['total']:.0f} s" if "total" in seconds else ""),
    ]
    metadata = {
        "preset": dataclasses.asdict(preset),
        "prompt_format": PROMPT_FORMAT,
        "cache_dir": str(models.cache_dir),
        "trained_this_run": models.trained,
        "seconds": seconds,
    }
    paths = lb.write_leaderboard(
        rows,
        out,
        title=title or f"TOFU leaderboard ({preset.name})",
        notes=notes,
        metadata=metadata,
    )
    paths["run"] = out / "run.json"
    atomic_write_text(paths["run"], json.dumps(jsonable(metadata), indent=2) + "\n")
    return paths
