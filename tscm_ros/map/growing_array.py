"""A numpy array that grows by amortised doubling, so adding one row at a time stays cheap."""

from __future__ import annotations

from typing import Any

import numpy as np


class GrowingArray:
    """Rows of one shape and dtype, appended with ``extend``; ``values`` is a view of those held."""

    def __init__(self, row_shape: tuple[int, ...], dtype: Any) -> None:
        self._data = np.empty((0, *row_shape), dtype=dtype)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def extend(self, rows: np.ndarray) -> None:
        needed = self._size + len(rows)
        if needed > len(self._data):
            grown = np.empty((max(needed, 2 * len(self._data), 64), *self._data.shape[1:]), self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : needed] = rows
        self._size = needed

    @property
    def values(self) -> np.ndarray:
        return self._data[: self._size]
