"""Classifier unlearning: forget a class, a sub-class or random samples from image classifiers.

- `scenarios`: `Task`s (`full_class`, `sub_class`, `random_samples`).
- `training`: `train_classifier` (target and retrain oracle, one `TrainRecipe`), `predict`.
- `objectives`: classification loss terms (cross-entropy, gradient ascent, random labels).
- `methods`: `METHODS` (finetune, gradascent, random_labels, salun, ssd, lf_ssd, gu, hamu,
  ofmu, acu), each ``method(model, task, **hparams) -> model``.
- `acu`: the exact closed-form forgetting of a ridge head; `saliency`: SalUn's mask.
- `metrics` and `evaluate`: the SSD/Bad-Teacher and SalUn metric conventions plus the
  penultimate-feature linear probe.
"""

from jaxunlearn.classifiers import acu, metrics, objectives, saliency, scenarios
from jaxunlearn.classifiers.evaluate import evaluate_classifier
from jaxunlearn.classifiers.methods import METHODS, ForgetRetainImages
from jaxunlearn.classifiers.scenarios import SCENARIOS, Task, full_class, random_samples, sub_class
from jaxunlearn.classifiers.training import TrainRecipe, predict, train_classifier

__all__ = [
    "METHODS",
    "SCENARIOS",
    "ForgetRetainImages",
    "Task",
    "TrainRecipe",
    "acu",
    "evaluate_classifier",
    "full_class",
    "metrics",
    "objectives",
    "predict",
    "random_samples",
    "saliency",
    "scenarios",
    "sub_class",
    "train_classifier",
]
