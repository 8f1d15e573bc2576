"""The classifier-unlearning benchmark end to end: data, target, oracle, every method, leaderboard.

`run_classifiers(preset, scenario, out)`:

1. loads the preset's images (scikit-learn digits by default, offline; CIFAR-10/100 from
   their binary archives; an image folder) and builds the scenario's `Task` (full class,
   sub-class inside a super-class, or random samples);
2. trains the target on the whole training set and the oracle on the retain set with the
   *same* recipe, caching both on disk under a hash of (architecture, recipe, data, task)
   so later runs reuse them;
3. runs each unlearning method on the target, timing it, and evaluates target, oracle and
   every result in the SSD / Bad-Teacher and SalUn conventions plus the linear probe;
4. writes ``leaderboard.{md,json}``, ``tradeoff.png`` and ``run.json`` into `out`.

The lead wires this to ``jaxunlearn demo --benchmark classifiers [--scenario ...]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxunlearn.checkpoints.vision import (
    check_num_labels,
    load_classifier,
    load_model_state,
    save_model_state,
)
from jaxunlearn.classifiers import leaderboard as lb
from jaxunlearn.classifiers import metrics as cm
from jaxunlearn.classifiers.evaluate import evaluate_classifier
from jaxunlearn.classifiers.methods import METHODS
from jaxunlearn.classifiers.scenarios import SCENARIOS, Task, make_task
from jaxunlearn.classifiers.training import TrainRecipe, train_classifier
from jaxunlearn.data import images as im
from jaxunlearn.models.vision import CNNConfig, ResNetConfig, ViTConfig, build_classifier

ALL_METHODS = tuple(METHODS)


@dataclasses.dataclass(frozen=True)
class ClassifierPreset:
    """One benchmark configuration.

    Attributes:
      name: the preset's name.
      description: one line for the leaderboard.
      data: "digits", "cifar10", "cifar100" or "folder" (the last three need `data_path`).
      model: "cnn", "resnet18" or "vit".
      model_kwargs: overrides of the architecture config (e.g. widths, width).
      recipe: the target / oracle training recipe.
      forget: default forget target per scenario (class, fine class, amount).
      methods: the methods run by default.
      method_kwargs: per-method hyperparameter overrides.
      subsample: (train, test) sizes to keep (stratified), or None for all data.
    """

    name: str
    description: str
    data: str = "digits"
    model: str = "cnn"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    recipe: TrainRecipe = TrainRecipe()
    forget: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"full_class": "3", "sub_class": "5", "random": 0.1}
    )
    methods: tuple[str, ...] = ALL_METHODS
    method_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    subsample: tuple[int, int] | None = None


_FEW_STEPS = {m: {"steps": 3, "batch_size": 16} for m in
              ("finetune", "gradascent", "random_labels", "salun", "gu", "hamu", "ofmu")}  # fmt: skip

PRESETS: dict[str, ClassifierPreset] = {
    "tiny": ClassifierPreset(
        "tiny", "digits subset (300 train / 150 test), CNN 8-16-32, 8 epochs, 3 steps per "
        "method: a smoke test, not a result", model_kwargs={"widths": (8, 16), "hidden_size": 32},
        recipe=TrainRecipe(epochs=8, batch_size=32, learning_rate=0.1), method_kwargs=_FEW_STEPS,
        subsample=(300, 150),
    ),
    "small": ClassifierPreset(
        "small", "scikit-learn digits (1,347 train / 450 test), CNN 16-32-64, 15 epochs",
        recipe=TrainRecipe(epochs=15, batch_size=64),
    ),
    "resnet18-digits": ClassifierPreset(
        "resnet18-digits", "digits, ResNet-18 (width 16, batch norm), 15 epochs",
        model="resnet18", model_kwargs={"width": 16}, recipe=TrainRecipe(epochs=15),
    ),
    "cifar10": ClassifierPreset(
        "cifar10", "CIFAR-10 (binary archive), ResNet-18, 20 epochs (SSD's CIFAR-10 length)",
        data="cifar10", model="resnet18", recipe=TrainRecipe(epochs=20, batch_size=128,
                                                             learning_rate=0.1),
        forget={"full_class": "airplane", "random": 100},
    ),
    "cifar100": ClassifierPreset(
        "cifar100", "CIFAR-100 (binary archive), ResNet-18, 40 epochs; sub-class inside the "
        "20 super-classes", data="cifar100", model="resnet18",
        recipe=TrainRecipe(epochs=40, batch_size=128, learning_rate=0.1),
        forget={"full_class": "rocket", "sub_class": "rocket", "random": 0.1},
    ),
}  # fmt: skip


def get_preset(preset: str | ClassifierPreset) -> ClassifierPreset:
    if isinstance(preset, ClassifierPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown classifier preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[preset]


def default_cache_dir() -> Path:
    """`$JAXUNLEARN_CACHE/classifiers`, else `~/.cache/jaxunlearn/classifiers`."""
    root = os.environ.get("JAXUNLEARN_CACHE") or Path.home() / ".cache" / "jaxunlearn"
    return Path(root) / "classifiers"


def load_data(
    preset: ClassifierPreset, data_path: str | os.PathLike | None = None
) -> im.ImageSplits:
    """The preset's `ImageSplits` (stratified subsample when the preset asks for one)."""
    if preset.data == "digits":
        splits = im.load_digits()
    elif preset.data in ("cifar10", "cifar100", "folder"):
        env = f"JAXUNLEARN_{preset.data.upper()}"
        path = data_path or os.environ.get(env)
        if not path:
            raise ValueError(
                f"preset {preset.name!r} needs its data on disk: pass data_path= (or set {env}) "
                + ("to the CIFAR binary archive." if preset.data != "folder" else "to the folder.")
            )
        splits = im.load_cifar(path) if preset.data != "folder" else im.load_image_folder(path)
    else:
        raise ValueError(f"unknown data {preset.data!r} in preset {preset.name!r}.")
    if preset.subsample is None:
        return splits
    n_train, n_test = preset.subsample

    def keep(data, n):
        if n >= len(data):
            return data
        idx, _ = im.split_train_test(data.images, data.labels, 1 - n / len(data), seed=0)
        return data.subset(idx)

    return im.ImageSplits(splits.name, keep(splits.train, n_train), keep(splits.test, n_test))


def model_config(preset: ClassifierPreset, task: Task) -> Any:
    """The architecture for the task's label space and image shape."""
    _, size, _, channels = task.train.images.shape
    kw = dict(preset.model_kwargs)
    if preset.model == "cnn":
        return CNNConfig(num_labels=task.num_labels, num_channels=channels, image_size=size, **kw)
    if preset.model == "resnet18":
        return ResNetConfig.resnet18(task.num_labels, channels, **kw)
    if preset.model == "vit":
        return ViTConfig(num_labels=task.num_labels, num_channels=channels, image_size=size, **kw)
    raise ValueError(f"unknown model {preset.model!r} in preset {preset.name!r}.")


def _digest(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def model_cache_key(config: Any, recipe: TrainRecipe, data: im.ImageSplits, task: Task,
                    which: str) -> str:  # fmt: skip
    """Hash of everything that shapes a trained model; the oracle's includes the forget set."""
    record = {
        "which": which, "config": dataclasses.asdict(config), "recipe": dataclasses.asdict(recipe),
        "data": data.fingerprint(), "labels": task.kind == "sub_class",
        "forget": np.flatnonzero(task.forget).tolist() if which == "oracle" else None,
    }  # fmt: skip
    return _digest(record)[:20]


def cached_model(
    config, recipe, data, task, which, cache_dir: Path, log
) -> tuple[Any, float, bool]:
    """(model, training seconds, trained now) for the target or the oracle."""
    folder = cache_dir / f"{which}-{model_cache_key(config, recipe, data, task, which)}"
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        return load_model_state(folder, config), float(meta["seconds"]), False
    train_set = task.train if which == "target" else task.retain_set()
    log(f"[classifiers] training the {which} on {len(train_set)} images ...")
    start = time.perf_counter()
    model, train_log = train_classifier(config, train_set, recipe)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, model)))
    seconds = time.perf_counter() - start
    save_model_state(model, folder, {"seconds": seconds, "loss": train_log["loss"], "which": which,
                                     "recipe": dataclasses.asdict(recipe)})  # fmt: skip
    return model, seconds, True


@dataclasses.dataclass
class ClassifierRun:
    """The result of `run_classifiers`.

    Attributes:
      preset: the preset used.
      task: the unlearning task.
      rows: leaderboard rows (target, oracle, then methods in run order).
      paths: written files ("json", "markdown", "plot", "run").
      models: {"target", "oracle", method name: model}.
    """

    preset: ClassifierPreset
    task: Task
    rows: list[lb.ClassifierRow]
    paths: dict[str, Path]
    models: dict[str, Any]

    def row(self, method: str) -> lb.ClassifierRow:
        return next(r for r in self.rows if r.method == method)


def run_classifiers(
    preset: str | ClassifierPreset = "small",
    scenario: str = "full_class",
    out: str | os.PathLike | None = None,
    *,
    forget: Any = None,
    data_path: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> ClassifierRun:
    """Runs the classifier-unlearning benchmark and writes its leaderboard.

    Args:
      preset: "tiny", "small" (default), "resnet18-digits", "cifar10", "cifar100", or a
        `ClassifierPreset`.
      scenario: "full_class", "sub_class" or "random".
      out: output folder (default ``./classifiers-<preset>-<scenario>``).
      forget: the class / fine class / amount to forget (default: the preset's).
      data_path: the CIFAR archive or image folder for presets that need one.
      methods: method names (default: the preset's, all of `METHODS`).
      cache_dir: where target and oracle are cached (default `default_cache_dir()`).
      checkpoint: a Hugging Face ResNet / ViT image classifier to use as the target instead
        of training one (its label count must match the data's classes); the oracle is
        trained from scratch with the same architecture and the preset's recipe.
      log: where progress lines go.

    Returns:
      A `ClassifierRun`.

    Raises:
      ValueError: unknown preset / scenario / method, a forget class that does not exist.
    """
    start = time.perf_counter()
    preset = get_preset(preset)
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}.")
    names = tuple(methods) if methods is not None else preset.methods
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}.")
    out = Path(out) if out is not None else Path(f"classifiers-{preset.name}-{scenario}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = load_data(preset, data_path)
    if forget is None and scenario not in preset.forget:
        raise ValueError(f"preset {preset.name!r} has no default forget target for {scenario!r}.")
    task = make_task(data, scenario, preset.forget[scenario] if forget is None else forget)
    if checkpoint is not None:
        target, _ = load_classifier(checkpoint)
        config, t_seconds = target.config, None
        check_num_labels(config.num_labels, task.num_labels, where=str(checkpoint))
    else:
        config = model_config(preset, task)
        target, t_seconds, _ = cached_model(config, preset.recipe, data, task, "target", cache, log)
    oracle, o_seconds, _ = cached_model(config, preset.recipe, data, task, "oracle", cache, log)
    incompetent = build_classifier(config, seed=preset.recipe.seed + 1000)

    def evaluate(model):
        return evaluate_classifier(model, task, incompetent=incompetent)

    rows = [
        lb.ClassifierRow("target", "target", task.name, evaluate(target), t_seconds),
        lb.ClassifierRow("oracle", "oracle", task.name, evaluate(oracle), o_seconds),
    ]
    oracle_metrics = rows[1].metrics
    models = {"target": target, "oracle": oracle}
    for name in names:
        hp = dict(preset.method_kwargs.get(name, {}))
        t0 = time.perf_counter()
        model = METHODS[name](target, task, **hp)
        jax.block_until_ready(jax.tree.leaves(model))
        seconds = time.perf_counter() - t0
        metrics = evaluate(model)
        rows.append(lb.ClassifierRow(name, "unlearned", task.name, metrics, seconds, hp))
        models[name] = model
        log(f"[classifiers] {name:14s} {seconds:7.2f}s  Df={metrics['Df']:.1f} "
            f"Dr={metrics['Dr']:.1f} MIA={metrics['MIA']:.3f}")  # fmt: skip
    for row in rows:
        row.metrics["avg_gap"] = cm.average_gap(row.metrics, oracle_metrics)
    paths = _write(preset, task, rows, out, cache, time.perf_counter() - start)
    log(
        f"[classifiers] leaderboard: {paths['markdown']} (JSON {paths['json']}, plot {paths['plot']})"
    )
    return ClassifierRun(preset, task, rows, paths, models)


def _write(preset, task, rows, out: Path, cache: Path, total: float) -> dict[str, Path]:
    from jaxunlearn.eval.report import atomic_write_text

    dev = jax.devices()[0]
    notes = [
        f"preset `{preset.name}`: {preset.description}",
        f"task `{task.name}`: {int(task.forget.sum())} forget / {int(task.retain.sum())} retain "
        f"training images, {int(task.forget_test.sum())} forget-test images",
        "oracle: retrained from scratch on the retain set with the target's recipe; times "
        "include JAX compilation",
        f"device: {dev.platform} x{jax.device_count()}, {platform.machine()}; total {total:.0f} s",
    ]
    metadata = {
        "preset": dataclasses.asdict(preset), "task": task.describe(), "cache_dir": str(cache),
        "total_seconds": total,
    }  # fmt: skip
    paths = lb.write_leaderboard(
        rows, out, title=f"Classifier unlearning ({preset.name}, {task.name})", notes=notes,
        metadata=metadata,
    )  # fmt: skip
    paths["run"] = out / "run.json"
    atomic_write_text(paths["run"], json.dumps(metadata, indent=2, default=str) + "\n")
    return paths
