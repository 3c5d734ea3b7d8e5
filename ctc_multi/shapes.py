"""Named CTC problem sizes and random problems of those sizes, shared by ``ctc-multi compare`` and benchmarks/.

Only NumPy is imported here, so anything may import this module without pulling in a framework.

Example:
  >>> from ctc_multi.shapes import SHAPES, random_problem
  >>> problem = random_problem(SHAPES["small"], seed=0)
  >>> problem.logits.shape, problem.labels.shape
  ((8, 100, 32), (8, 20))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class Shape:
    """A CTC problem size: B sequences of T frames over K classes (blank included), N labels at most."""

    name: str
    B: int
    T: int
    K: int
    N: int

    def __post_init__(self):
        for field, minimum in (("B", 1), ("T", 1), ("K", 2), ("N", 1)):
            value = getattr(self, field)
            if not (isinstance(value, int) and value >= minimum):
                raise ValueError(f"Shape {self.name!r}: {field} must be an integer >= {minimum}; got {value!r}")

    def __str__(self) -> str:
        return f"{self.name} (B={self.B}, T={self.T}, K={self.K}, N={self.N})"


# From a quick check (small) to speech-sized batches: characters, BPE vocabularies, long inputs,
# a 5000-word vocabulary, and a large batch.
SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("small", B=8, T=100, K=32, N=20),
        Shape("char", B=32, T=500, K=32, N=100),
        Shape("bpe", B=16, T=400, K=1024, N=80),
        Shape("long", B=4, T=2000, K=64, N=400),
        Shape("vocab5k", B=8, T=300, K=5000, N=60),
        Shape("big", B=64, T=1000, K=1024, N=200),
    )
}
DEFAULT_SHAPE = "small"


class Problem(NamedTuple):
    """CTC inputs as NumPy arrays, in the order the CTC functions take them (``ctc_loss(*problem)``)."""

    logits: np.ndarray  # (B, T, K) float32 or float64
    logit_paddings: np.ndarray  # (B, T) same dtype as logits, 1.0 on padded frames (at the end)
    labels: np.ndarray  # (B, N) int32, class ids in [1, K); 0 on padded positions
    label_paddings: np.ndarray  # (B, N) same dtype as logits, 1.0 on padded labels (at the end)


def _frames_needed(label: np.ndarray) -> int:
    """The fewest frames that can emit ``label``: one per label, plus a blank between repeats."""
    return len(label) + int(np.count_nonzero(label[1:] == label[:-1]))


def random_problem(shape: Shape, seed: int = 0, dtype: str | np.dtype = "float32") -> Problem:
    """A random, feasible CTC problem of size ``shape``, with blank id 0.

    Logits are standard normal; each sequence has between 0.8 T and T valid frames (the padding
    after them) and between N/2 and N labels drawn uniformly from the classes 1 .. K-1 (so
    repeats occur, about one in K-1). A label sequence that the valid frames cannot emit (only
    when N is above about 0.4 T) is shortened until they can, so no loss is infinite.

    Args:
      shape: the sizes B, T, K, N.
      seed: seed of the NumPy random generator; the same seed gives the same problem.
      dtype: float dtype of ``logits`` and of the paddings.

    Returns:
      A :class:`Problem` of NumPy arrays: logits (B, T, K), logit_paddings (B, T),
      labels (B, N), label_paddings (B, N).
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating-point dtype; got {dtype}")
    B, T, K, N = shape.B, shape.T, shape.K, shape.N
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, K)).astype(dtype)
    input_lengths = rng.integers(max(1, int(np.ceil(0.8 * T))), T + 1, size=B)
    label_lengths = rng.integers(int(np.ceil(N / 2)), N + 1, size=B)
    labels = np.zeros((B, N), dtype=np.int32)
    for b in range(B):
        label = rng.integers(1, K, size=label_lengths[b])
        while _frames_needed(label) > input_lengths[b]:
            label = label[:-1]
        labels[b, : len(label)] = label
        label_lengths[b] = len(label)
    logit_paddings = (np.arange(T)[None, :] >= input_lengths[:, None]).astype(dtype)
    label_paddings = (np.arange(N)[None, :] >= label_lengths[:, None]).astype(dtype)
    return Problem(logits, logit_paddings, labels, label_paddings)
