"""NumPy's kept scratch arrays (``ctc_multi.backends.numpy.REUSE_SCRATCH``): an array is handed
out again only where nothing else holds it, each thread has its own, and results a caller keeps
are never written over."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import ctc_multi
from ctc_multi.backends import numpy as numpy_backend
from ctc_multi.shapes import Shape, random_problem

LARGE = (512, 1024)  # 2 MB of float32: above SCRATCH_MIN_BYTES


def address(array) -> int:
    return array.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def own_scratch(monkeypatch):
    """Each test starts with this thread's kept arrays empty, and reuse on."""
    monkeypatch.setattr(numpy_backend, "REUSE_SCRATCH", True)
    monkeypatch.setattr(numpy_backend._kept, "arrays", [], raising=False)


def test_an_array_is_handed_out_again_only_where_nothing_holds_it():
    first = numpy_backend._scratch(LARGE, np.float32)
    held = numpy_backend._scratch(LARGE, np.float32)
    assert address(held) != address(first)  # the first is still held here
    kept_address = address(first)
    del first
    assert address(numpy_backend._scratch(LARGE, np.float32)) == kept_address
    view = held[1:, :]  # a view holds its base
    held_address = address(held)
    del held
    fresh = numpy_backend._scratch(LARGE, np.float32)
    assert address(fresh) != held_address and view.base is not None
    assert address(numpy_backend._scratch(LARGE, np.float64)) not in (kept_address, held_address, address(fresh))


def test_small_arrays_and_reuse_off_are_fresh(monkeypatch):
    small = numpy_backend._scratch((8, 8), np.float32)
    assert small.shape == (8, 8) and numpy_backend._kept.arrays == []
    monkeypatch.setattr(numpy_backend, "REUSE_SCRATCH", False)
    numpy_backend._scratch(LARGE, np.float32)
    assert numpy_backend._kept.arrays == []


def test_each_thread_keeps_at_most_scratch_kept_arrays_of_its_own():
    arrays = [numpy_backend._scratch((512, 1024 + i), np.float32) for i in range(numpy_backend.SCRATCH_KEPT + 3)]
    assert len(numpy_backend._kept.arrays) == numpy_backend.SCRATCH_KEPT
    assert all(kept is array for kept, array in zip(numpy_backend._kept.arrays, arrays[3:]))
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.append(list(getattr(numpy_backend._kept, "arrays", []))))
    worker.start()
    worker.join()
    assert in_thread == [[]]


SHAPE = Shape("scratch", B=16, T=200, K=16, N=40)  # a (T, B, S) lattice of 2 MB in float64: its arrays are kept


def test_results_a_caller_keeps_are_never_written_over():
    """Two problems of the same sizes, one call after the other: the first call's results, kept,
    are still its own after the second (every public function whose NumPy run keeps arrays)."""
    first, second = (random_problem(SHAPE, seed, "float64") for seed in (1, 2))
    calls = (
        lambda p: ctc_multi.ctc_loss_with_forward_probs(*p),
        lambda p: ctc_multi.ctc_loss_and_grad(*p),
        lambda p: ctc_multi.ctc_posteriors(*p),
        lambda p: ctc_multi.forced_align(*p),
    )
    for call in calls:
        kept = call(first)
        copies = [np.array(x, copy=True) for x in kept]
        again = call(second)
        for array, copy in zip(kept, copies):
            np.testing.assert_array_equal(array, copy)
        for array, expected in zip(again, call(second)):
            np.testing.assert_array_equal(array, expected)
    assert numpy_backend._kept.arrays  # the runs above did keep arrays


def test_threads_at_once_get_their_own_results():
    problems = [random_problem(SHAPE, seed, "float64") for seed in range(4)]
    expected = [ctc_multi.ctc_loss_and_grad(*p) for p in problems]
    failures = []

    def work(index):
        for _ in range(6):
            loss, grad = ctc_multi.ctc_loss_and_grad(*problems[index])
            if not (np.array_equal(loss, expected[index][0]) and np.array_equal(grad, expected[index][1])):
                failures.append(index)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []
