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


def kept() -> list:
    """This thread's kept arrays."""
    return getattr(numpy_backend._kept, "arrays", [])


@pytest.fixture(autouse=True)
def own_scratch(monkeypatch):
    """Each test starts with this thread's kept arrays let go, and reuse on; and ends so."""
    monkeypatch.setattr(numpy_backend, "REUSE_SCRATCH", True)
    numpy_backend.release_scratch()
    yield
    numpy_backend.release_scratch()


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


def test_small_arrays_and_reuse_off_are_fresh_and_off_lets_go(monkeypatch):
    small = numpy_backend._scratch((8, 8), np.float32)
    assert small.shape == (8, 8) and kept() == []
    numpy_backend._scratch(LARGE, np.float32)
    assert len(kept()) == 1
    monkeypatch.setattr(numpy_backend, "REUSE_SCRATCH", False)
    numpy_backend._scratch(LARGE, np.float32)
    assert kept() == []  # switched off: what the thread kept is let go at its next call


def test_release_scratch_lets_go_and_nothing_is_kept_without_reference_counts(monkeypatch):
    numpy_backend._scratch(LARGE, np.float32)
    numpy_backend.release_scratch()
    assert kept() == []
    monkeypatch.setattr(numpy_backend, "_HELD_BY_THE_LIST_ALONE", None)  # as where sys.getrefcount is missing (PyPy)
    numpy_backend._scratch(LARGE, np.float32)
    numpy_backend._scratch(LARGE, np.float32)
    assert kept() == []


def test_a_thread_keeps_at_most_scratch_max_bytes(monkeypatch):
    monkeypatch.setattr(numpy_backend, "SCRATCH_MAX_BYTES", 5 << 20)
    numpy_backend._scratch(LARGE, np.float32)  # 2 MB
    numpy_backend._scratch((512, 1025), np.float32)  # 2 MB more: 4 MB kept
    numpy_backend._scratch((512, 1026), np.float32)  # 6 MB: the first let go
    assert [x.shape for x in kept()] == [(512, 1025), (512, 1026)]
    numpy_backend._scratch((2048, 1024), np.float32)  # 8 MB alone: above the cap, not kept
    assert [x.shape for x in kept()] == [(512, 1025), (512, 1026)]


def test_each_thread_keeps_at_most_scratch_kept_arrays_of_its_own():
    arrays = [numpy_backend._scratch((512, 1024 + i), np.float32) for i in range(numpy_backend.SCRATCH_KEPT + 3)]
    assert len(kept()) == numpy_backend.SCRATCH_KEPT
    assert all(one is array for one, array in zip(kept(), arrays[3:]))
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.append(list(kept())))
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
        results = call(first)
        copies = [np.array(x, copy=True) for x in results]
        again = call(second)
        for array, copy in zip(results, copies):
            np.testing.assert_array_equal(array, copy)
        for array, expected in zip(again, call(second)):
            np.testing.assert_array_equal(array, expected)
    assert kept()  # the runs above did keep arrays


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
