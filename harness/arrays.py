"""A dataset in memory: its train and test arrays, subsets of them, and the check of its labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.errors import DataError


@dataclass
class Dataset:
    name: str
    source: str  # a path, or "synthetic"
    synthetic: bool
    x_train: np.ndarray  # images: float32 NHWC in [0, 1]; text: int32 token windows
    y_train: np.ndarray  # int32: a label per image, or per position of a window
    x_test: np.ndarray
    y_test: np.ndarray
    subset: str | None = None  # a note when only part of the data is used
    tokenizer: str | None = None  # text: the tokenizer.json whose ids the windows hold; None: bytes

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "synthetic": self.synthetic,
                "n_train": int(len(self.y_train)), "n_test": int(len(self.y_test)), "subset": self.subset,
                "tokenizer": self.tokenizer}

    def head(self, n_train: int, n_test: int) -> Dataset:
        """The first n samples of each split (a documented, reproducible subset)."""
        note = f"first {n_train} train / {n_test} test samples"
        return Dataset(self.name, self.source, self.synthetic, self.x_train[:n_train], self.y_train[:n_train],
                       self.x_test[:n_test], self.y_test[:n_test], subset=note, tokenizer=self.tokenizer)

    def classes(self, keep: tuple[int, ...] | None) -> Dataset:
        """Only the samples of `keep`, relabelled 0..len(keep)-1 in that order."""
        if keep is None:
            return self
        lookup = np.full(max(int(self.y_train.max()), int(self.y_test.max()), *keep) + 1, -1, np.int32)
        lookup[list(keep)] = np.arange(len(keep), dtype=np.int32)

        def pick(x, y):
            mask = lookup[y] >= 0
            return x[mask], lookup[y[mask]]

        x_tr, y_tr = pick(self.x_train, self.y_train)
        x_te, y_te = pick(self.x_test, self.y_test)
        return Dataset(self.name, self.source, self.synthetic, x_tr, y_tr, x_te, y_te, subset=self.subset)


def check_labels(dataset: Dataset, classes: int) -> None:
    """Every label in [0, classes): a label the task's head has no logit for would index past it in one
    framework and be clamped or ignored in another, so it is refused when the data loads."""
    for split, y in (("train", dataset.y_train), ("test", dataset.y_test)):
        if not y.size:
            continue
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise DataError(f"{dataset.source}: {dataset.name} has {split} label {high if high >= classes else low}, "
                            f"outside the task's {classes} classes (num_classes); give the task num_classes = "
                            f"{high + 1} or more, or data it can label")
