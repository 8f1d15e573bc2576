"""Unlearning scenarios for image classifiers: full class, sub-class, random samples.

A `Task` fixes what the model is trained on (its label space), which training examples are
forgotten, and which test examples measure forgetting and retention, following SSD's
scenarios (Foster et al., arXiv 2308.07707, ``forget_{full_class,subclass,random}_*``) and
SalUn's (Fan et al., arXiv 2310.12508):

- full class: forget every training image of one class; Df-test = that class's test images.
- sub-class: the model classifies super-classes; forget one fine class inside its
  super-class (CIFAR-100 "rocket" within "vehicles 2"); Df-test = that fine class's test
  images, still labelled by their super-class.
- random: forget a random subset of training images; there is no forget-test set, so
  SSD's convention (``forget_valid = forget_train``) measures Df on the forget set itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxunlearn.data.images import ImageDataset, ImageSplits, class_index

SCENARIOS = ("full_class", "sub_class", "random")


@dataclasses.dataclass(frozen=True)
class Task:
    """One unlearning request on one dataset.

    Attributes:
      name: "full_class:3", "sub_class:rocket", "random:0.1", ...
      kind: one of `SCENARIOS`.
      train: the training set in the model's label space.
      test: the test set in the model's label space.
      forget: boolean [len(train)] mask of the forget set D_f.
      forget_test: boolean [len(test)] mask of the forget-test images (all False for random).
      num_labels: the model's output count.
      forget_label: the model-space label of the forgotten class (super-class for
        sub-class), None for random.
      seed: the seed behind any random choice (random labels, random samples).
    """

    name: str
    kind: str
    train: ImageDataset
    test: ImageDataset
    forget: np.ndarray
    forget_test: np.ndarray
    num_labels: int
    forget_label: int | None
    seed: int = 0

    @property
    def retain(self) -> np.ndarray:
        """Boolean mask of the retain set D_r."""
        return ~self.forget

    def forget_set(self) -> ImageDataset:
        return self.train.subset(self.forget)

    def retain_set(self) -> ImageDataset:
        return self.train.subset(self.retain)

    def forget_eval_set(self) -> ImageDataset:
        """Df for the SSD convention: forget-test images, or the forget set for random."""
        if self.kind == "random":
            return self.forget_set()
        return self.test.subset(self.forget_test)

    def retain_test_set(self) -> ImageDataset:
        """Dr for the SSD convention: the test images not in the forget-test set."""
        return self.test.subset(~self.forget_test)

    def describe(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "forget": int(self.forget.sum()),
            "retain": int(self.retain.sum()), "forget_test": int(self.forget_test.sum()),
            "num_labels": self.num_labels, "seed": self.seed,
        }  # fmt: skip


def full_class(splits: ImageSplits, cls: int | str) -> Task:
    """Forget every training image of class `cls` (an index or a name)."""
    c = class_index(splits.train, cls)
    return Task(
        f"full_class:{splits.train.class_names[c]}", "full_class", splits.train, splits.test,
        splits.train.labels == c, splits.test.labels == c, splits.train.num_classes, c,
    )  # fmt: skip


def sub_class(splits: ImageSplits, fine: int | str) -> Task:
    """Forget fine class `fine` from a model trained on super-classes.

    Raises:
      ValueError: the data has no super-classes, or `fine` is not one of its classes.
    """
    c = class_index(splits.train, fine)
    train, test = splits.train.with_coarse_labels(), splits.test.with_coarse_labels()
    coarse = {int(x) for x in train.labels[splits.train.labels == c]}
    if len(coarse) != 1:
        raise ValueError(f"sub_class: class {fine!r} has no single super-class ({sorted(coarse)}).")
    return Task(
        f"sub_class:{splits.train.class_names[c]}", "sub_class", train, test,
        splits.train.labels == c, splits.test.labels == c, train.num_classes, coarse.pop(),
    )  # fmt: skip


def random_samples(splits: ImageSplits, amount: float | int, *, seed: int = 0) -> Task:
    """Forget a uniformly random subset of the training set.

    Args:
      splits: the data.
      amount: a fraction in (0, 1) (SalUn: 0.1) or a count >= 1 (SSD: 100 on CIFAR-10).
      seed: which subset.
    """
    n = len(splits.train)
    count = int(round(amount * n)) if 0 < amount < 1 else int(amount)
    if not 1 <= count < n:
        raise ValueError(
            f"random_samples: amount {amount!r} selects {count} of {n} training images; give a "
            "fraction in (0, 1) or a count between 1 and n - 1."
        )
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).choice(n, count, replace=False)] = True
    return Task(
        f"random:{amount}", "random", splits.train, splits.test, mask,
        np.zeros(len(splits.test), bool), splits.train.num_classes, None, seed,
    )  # fmt: skip


def make_task(splits: ImageSplits, scenario: str, target: int | str | float, seed: int = 0) -> Task:
    """`full_class`, `sub_class` or `random_samples` by name."""
    if scenario == "full_class":
        return full_class(splits, target)
    if scenario == "sub_class":
        return sub_class(splits, target)
    if scenario == "random":
        return random_samples(splits, float(target), seed=seed)
    raise ValueError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}.")
