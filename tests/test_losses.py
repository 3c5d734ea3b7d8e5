"""ctc_loss and ctc_loss_with_forward_probs on every backend, against independent values.

Every test body runs on each installed backend through the ``xp`` fixture. Expected values come
from the float64 reference (``reference.py``), from optax's alpha conventions written as a loop
(``helpers.reference_forward_probs``), or from counting paths; never from ctc_multi itself.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
from conftest import TOLERANCE, installed
from helpers import (
    LOG_EPSILON,
    Problem,
    assert_impossible,
    assert_log_probs_close,
    loss_gradient,
    poison_padded_frames,
    random_problem,
    reference_forward_probs,
    to_backend,
    uniform_logits_loss,
)
from reference import ctc_reference

import ctc_multi


def run(xp, problem: Problem, *, dtype: str = "float64", **options):
    """ctc_loss_with_forward_probs on ``problem``; checks array type in = array type out.

    Returns (loss, logalpha_blank, logalpha_nonblank) as NumPy arrays and the problem as the
    backend holds it (logits rounded to ``dtype``), for computing expected values.
    """
    arrays, held = to_backend(xp, problem, dtype)
    results = ctc_multi.ctc_loss_with_forward_probs(*arrays, **options)
    xp.check_type(*results)
    return tuple(xp.to_numpy(result) for result in results), held


def check_against_reference(xp, problem: Problem, *, dtype: str = "float64", blank_id: int = 0, also_ctc_loss: bool = False, **options):
    """Loss against the Graves reference, alphas against optax's conventions; returns the loss.

    ``also_ctc_loss`` checks ctc_loss too (kept for a few tests: each extra JAX call compiles).
    """
    (loss, blank, nonblank), held = run(xp, problem, dtype=dtype, blank_id=blank_id, **options)
    tolerance = TOLERANCE["float64" if dtype == "float64" else "float32"]
    expected_loss, _ = ctc_reference(*held, blank_id=blank_id)
    np.testing.assert_allclose(loss, expected_loss, **tolerance)
    if also_ctc_loss:
        arrays, _ = to_backend(xp, problem, dtype)
        loss_only = ctc_multi.ctc_loss(*arrays, blank_id=blank_id, **options)
        xp.check_type(loss_only)
        np.testing.assert_allclose(xp.to_numpy(loss_only), expected_loss, **tolerance)
    expected_blank, expected_nonblank = reference_forward_probs(*held, blank_id=blank_id)
    assert_log_probs_close(blank, expected_blank, **tolerance)
    assert_log_probs_close(nonblank, expected_nonblank, **tolerance)
    return loss


# Most tests share one shape: JAX compiles its eager operations once per shape and dtype.
SHAPE = dict(B=4, T=8, K=5, N=3)

CASES = {
    "plain": dict(),
    "blank_last_middle_padding": dict(blank_id=4, frame_layout="middle", pad_label=-1),
    "blank_inside_anywhere_padding": dict(blank_id=2, frame_layout="anywhere", pad_label=7),
    "many_repeats_middle_padding": dict(repeat_probability=0.8, min_label_length=2, frame_layout="middle"),
}


def standard_problem(seed: int, **options) -> Problem:
    return random_problem(np.random.default_rng(seed), *SHAPE.values(), **options)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(xp, case, dtype):
    problem = standard_problem(list(CASES).index(case), **CASES[case])
    check_against_reference(xp, problem, dtype=dtype, blank_id=CASES[case].get("blank_id", 0), also_ctc_loss=True)


@pytest.mark.parametrize(("K", "N"), [(5, 3), (9, 3)], ids=["fewer_classes_than_states", "more_classes_than_states"])
def test_log_softmax_before_or_after_the_gather(xp, K, N):
    """NumPy and torch take the log-softmax of the (B, T, K) logits before the lattice's gather,
    JAX of the (T, B, S) gathered logits after it; with fewer and with more classes than lattice
    states (S = 2N + 1), both give the reference's loss, alphas and gradient."""
    problem = random_problem(np.random.default_rng(31), 3, 7, K, N, frame_layout="anywhere", blank_id=K - 1)
    check_against_reference(xp, problem, blank_id=K - 1)
    arrays, held = to_backend(xp, problem)
    _, gradient = ctc_multi.ctc_loss_and_grad(*arrays, blank_id=K - 1)
    np.testing.assert_allclose(xp.to_numpy(gradient), ctc_reference(*held, blank_id=K - 1)[1], **TOLERANCE["gradient_float64"])


def test_gradient_with_many_classes_and_labels_used_twice(xp):
    """K above the backends' one-hot limit (128): the per-class sum is a scatter-add, which must
    add up the columns of a class used by several labels (and by the blank column)."""
    K = 150
    problem = random_problem(np.random.default_rng(41), 3, 9, K, 4, frame_layout="anywhere", min_label_length=3)
    labels = np.where(problem.label_paddings != 0, problem.labels, 1 + problem.labels % 2)  # labels 1 and 2 only
    problem = problem._replace(labels=labels)
    arrays, held = to_backend(xp, problem)
    loss, gradient = ctc_multi.ctc_loss_and_grad(*arrays)
    expected_loss, expected_gradient = ctc_reference(*held)
    np.testing.assert_allclose(xp.to_numpy(loss), expected_loss, **TOLERANCE["float64"])
    np.testing.assert_allclose(xp.to_numpy(gradient), expected_gradient, **TOLERANCE["gradient_float64"])


@pytest.mark.parametrize("flat", [True, False], ids=["flat indices", "down the columns"])
def test_jax_scatters_in_either_order_add_up_labels_used_twice(jax_x64, monkeypatch, flat):
    """The JAX adapter scatters the per-class sums of many classes down each class's column of
    frames, or frame by frame at flat indices (on a CPU, for some K: ctc_multi.backends.jax.
    FLAT_SCATTER_STRIDES): each order, forced here, adds up a class used by several labels."""
    import jax.numpy as jnp

    import ctc_multi.backends.jax as adapter

    monkeypatch.setattr(adapter, "FLAT_SCATTER_STRIDES", {jax_x64.default_backend(): 1} if flat else {})
    jax_x64.clear_caches()
    K = 150
    problem = random_problem(np.random.default_rng(43), 3, 9, K, 4, frame_layout="anywhere", min_label_length=3)
    problem = problem._replace(labels=np.where(problem.label_paddings != 0, problem.labels, 1 + problem.labels % 2))
    _, gradient = ctc_multi.ctc_loss_and_grad(*[jnp.asarray(a) for a in problem])
    np.testing.assert_allclose(np.asarray(gradient), ctc_reference(*problem)[1], **TOLERANCE["gradient_float64"])
    jax_x64.clear_caches()


def test_jax_scatters_at_flat_indices_on_a_cpu_for_page_sized_column_strides(jax_x64, monkeypatch):
    from ctc_multi.backends.jax import scatters_at_flat_indices

    monkeypatch.setattr(jax_x64, "default_backend", lambda: "cpu")
    assert scatters_at_flat_indices(400, 1024, 4) and scatters_at_flat_indices(400, 3072, 4) and scatters_at_flat_indices(400, 2048, 2)
    assert not scatters_at_flat_indices(400, 1000, 4) and not scatters_at_flat_indices(400, 5000, 4) and not scatters_at_flat_indices(400, 1024, 2)
    assert scatters_at_flat_indices(2**17, 2**14, 4)  # the last flat index, 2**31 - 1, fits int32
    assert not scatters_at_flat_indices(2**17 + 1, 2**14, 4)
    monkeypatch.setattr(jax_x64, "default_backend", lambda: "gpu")
    assert not scatters_at_flat_indices(400, 1024, 4)


@pytest.mark.parametrize(("dtype", "result_dtype"), [("float64", "float64"), ("float32", "float32"), ("float16", "float32"), ("bfloat16", "float32")])
def test_types_dtypes_and_shapes(xp, dtype, result_dtype):
    """float32 / float64 keep their dtype; 16-bit logits are computed in, and return, float32."""
    problem = standard_problem(10, min_label_length=1, frame_layout="middle")
    arrays, held = to_backend(xp, problem, dtype)
    loss, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(*arrays)
    loss_only = ctc_multi.ctc_loss(*arrays)
    xp.check_type(loss, blank, nonblank, loss_only)
    for result in (loss, blank, nonblank, loss_only):
        assert result.dtype == xp.dtype(result_dtype)
    B, T, N = SHAPE["B"], SHAPE["T"], SHAPE["N"]
    assert tuple(loss.shape) == (B,)
    assert tuple(loss_only.shape) == (B,)
    assert tuple(blank.shape) == (T, B, N + 1)
    assert tuple(nonblank.shape) == (T, B, N)
    # 16-bit logits: the float32 computation on exactly the values they hold.
    expected = ctc_reference(*held)[0]
    np.testing.assert_allclose(xp.to_numpy(loss), expected, **TOLERANCE[result_dtype])
    np.testing.assert_allclose(xp.to_numpy(loss_only), expected, **TOLERANCE[result_dtype])


def test_forward_probs_are_arrays_of_their_own(xp):
    """Each result holds only its own values, C-ordered: logalpha_nonblank was a stride-2 view
    of the whole (T, B, 2N + 1) history (NumPy, torch), which kept and pickled about twice its
    size, and which torch's ``.view(-1)`` refused."""
    problem = standard_problem(11)
    arrays, _ = to_backend(xp, problem, "float32")
    for result in ctc_multi.ctc_loss_with_forward_probs(*arrays):
        if isinstance(result, np.ndarray):
            assert result.flags.c_contiguous and result.base is None
        elif type(result).__module__.startswith("torch"):
            assert result.is_contiguous()
            assert result.untyped_storage().nbytes() == result.numel() * result.element_size()
            result.view(-1)


def test_empty_labels(xp):
    """All labels padded (with values in and out of [0, K)): only the blank can be emitted."""
    problem = standard_problem(11, frame_layout="anywhere")
    problem = problem._replace(labels=np.resize([0, -1, 9, 2], problem.labels.shape), label_paddings=np.ones_like(problem.label_paddings))
    loss = check_against_reference(xp, problem)
    logits = problem.logits
    log_blank = logits[:, :, 0] - np.log(np.exp(logits).sum(axis=2))
    np.testing.assert_allclose(loss, -np.sum(log_blank * (1 - problem.logit_paddings), axis=1), **TOLERANCE["float64"])


def test_the_mean_over_an_empty_batch_is_nan_without_a_warning(xp):
    """B = 0, reduction "mean": NaN, as a mean of nothing is, on every backend. NumPy's loop
    (torch's on a CPU too) computed it as 0 / 0 and warned, which an error filter turns into
    an exception on those backends only."""
    arrays, _ = to_backend(xp, Problem(np.zeros((0, 5, 4)), np.zeros((0, 5)), np.zeros((0, 2), np.int64), np.zeros((0, 2))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = ctc_multi.ctc_loss(*arrays, reduction="mean")
    assert np.isnan(xp.to_numpy(loss)) and xp.to_numpy(loss).shape == ()


def test_minus_infinite_logits_are_a_zero_probability_not_nan(xp):
    """-inf logits at unpadded frames, where each such frame keeps a finite logit: the loss, the
    alphas and the gradient are those of logits far below the others (-1e6 here, in the
    reference), with no NaN. Sequence 0 has -inf at a class its labels do not use, sequence 1
    at a label's class on some frames, sequence 2 at a label's class on every frame (no
    alignment: the loss of an impossible one)."""
    problem = Problem(*(np.array(a) for a in standard_problem(14, frame_layout="anywhere", min_label_length=1)))
    labels, label_paddings = problem.labels, problem.label_paddings
    logits = problem.logits.copy()
    first_label = labels[:, 0]
    unused = next(k for k in range(1, 5) if k not in labels[0][label_paddings[0] == 0])
    logits[0, ::2, unused] = -np.inf
    logits[1, 1::3, first_label[1]] = -np.inf
    logits[2, :, first_label[2]] = -np.inf
    arrays, _ = to_backend(xp, problem._replace(logits=logits))
    loss, blank, nonblank = (xp.to_numpy(r) for r in ctc_multi.ctc_loss_with_forward_probs(*arrays))
    _, grad = (xp.to_numpy(r) for r in ctc_multi.ctc_loss_and_grad(*arrays))
    assert not any(np.isnan(a).any() for a in (loss, blank, nonblank, grad))

    finite = problem._replace(logits=np.where(np.isinf(logits), -1e6, logits))
    expected_loss, expected_grad = ctc_reference(*finite)
    np.testing.assert_allclose(loss[:2], expected_loss[:2], **TOLERANCE["float64"])
    assert_impossible(loss[2])
    np.testing.assert_allclose(grad[:2], expected_grad[:2], **TOLERANCE["float64"])
    expected_blank, expected_nonblank = reference_forward_probs(*finite)
    assert_log_probs_close(blank[:, :2], expected_blank[:, :2], **TOLERANCE["float64"])
    assert_log_probs_close(nonblank[:, :2], expected_nonblank[:, :2], **TOLERANCE["float64"])


def test_no_label_positions(xp):
    """N = 0: labels of shape (B, 0); the blank rows have one entry, the label rows none."""
    rng = np.random.default_rng(12)
    problem = Problem(rng.normal(size=(2, 3, 4)), np.array([[0, 0, 1], [0, 0, 0.0]]), np.zeros((2, 0), dtype=np.int64), np.zeros((2, 0)))
    (_, blank, nonblank), _ = run(xp, problem)
    assert blank.shape == (3, 2, 1)
    assert nonblank.shape == (3, 2, 0)
    loss = check_against_reference(xp, problem, also_ctc_loss=True)
    arrays, _ = to_backend(xp, problem)
    for reduction, expected in (("sum", loss.sum()), ("mean", loss.mean())):  # "mean": each length clamped to 1
        np.testing.assert_allclose(xp.to_numpy(ctc_multi.ctc_loss(*arrays, reduction=reduction)), expected, **TOLERANCE["float64"])


def test_single_frame(xp):
    """T = 1: no label (the blank), one label, and two labels (impossible in one frame)."""
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(3, 1, 4))
    problem = Problem(logits, np.zeros((3, 1)), np.array([[0, 0], [2, 0], [1, 3]]), np.array([[1, 1], [0, 1], [0, 0.0]]))
    (loss, _, _), _ = run(xp, problem)
    log_probs = logits[:, 0] - np.log(np.exp(logits[:, 0]).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(loss[:2], [-log_probs[0, 0], -log_probs[1, 2]], **TOLERANCE["float64"])
    assert_impossible(loss[2])


UNIFORM_CASES = {
    # K, blank_id, then (valid frames, label) per sequence: the expected loss counts paths.
    "K2_blank0": (2, 0, [(4, [1]), (5, [1, 1]), (2, []), (5, [1, 1, 1])]),
    "K2_blank1": (2, 1, [(5, [0, 0]), (3, [0]), (5, [0, 0, 0]), (1, [0])]),
    "K3_blank0": (3, 0, [(5, [1, 2]), (4, [1, 1]), (5, [2, 1, 2]), (5, [1, 2, 2])]),
    "K3_blank2": (3, 2, [(4, [0, 1]), (5, [1, 1]), (5, [0, 0, 1]), (3, [1, 0, 1])]),
}


@pytest.mark.parametrize("case", list(UNIFORM_CASES))
def test_uniform_logits_count_paths(xp, case):
    """Uniform logits: exp(-loss) is the share of the K**T paths that collapse to the label.

    Sequences shorter than the batch's 5 frames are padded in the middle, so the count also
    checks that padded frames are skipped.
    """
    K, blank_id, sequences = UNIFORM_CASES[case]
    B, T, N = len(sequences), 5, 3
    logit_paddings = np.ones((B, T))
    labels = np.full((B, N), -1)
    label_paddings = np.ones((B, N))
    for b, (frames, label) in enumerate(sequences):
        logit_paddings[b, [0] + list(range(T - frames + 1, T))] = 0.0
        labels[b, : len(label)] = label
        label_paddings[b, : len(label)] = 0.0
    problem = Problem(np.zeros((B, T, K)), logit_paddings, labels, label_paddings)
    (loss, _, _), _ = run(xp, problem, blank_id=blank_id)
    expected = [uniform_logits_loss(K, frames, label, blank_id) for frames, label in sequences]
    np.testing.assert_allclose(loss, expected, **TOLERANCE["float64"])


@pytest.mark.parametrize("blank_id", [0, 1])
def test_batch_of_one_with_two_classes_by_hand(xp, blank_id):
    """B = 1, K = 2, blank first or last: three uniform frames, 6 of the 8 paths read the label.

    So loss = log(8/6); alpha is worked out by hand below.
    """
    label = 1 - blank_id
    problem = Problem(np.zeros((1, 3, 2)), np.zeros((1, 3)), np.array([[label]]), np.zeros((1, 1)))
    (loss, blank, nonblank), _ = run(xp, problem, blank_id=blank_id)
    np.testing.assert_allclose(loss, [math.log(8 / 6)], **TOLERANCE["float64"])
    # States (blank, label, blank) hold (1/2, 1/2, 0), (1/4, 1/2, 1/4), (1/8, 3/8, 3/8); the
    # last blank row holds P(exactly n labels emitted): (1/8, 3/8 + 3/8).
    expected_blank = np.log([[1 / 2, 1], [1 / 4, 1 / 4], [1 / 8, 6 / 8]])[:, None, :]
    expected_blank[0, 0, 1] = -np.inf  # the final blank is out of reach on frame 0
    expected_nonblank = np.log([1 / 2, 1 / 2, 3 / 8])[:, None, None]
    assert_log_probs_close(blank, expected_blank, **TOLERANCE["float64"])
    assert_log_probs_close(nonblank, expected_nonblank, **TOLERANCE["float64"])
    # The same shape with random logits, against the reference.
    random_logits = np.random.default_rng(14).normal(scale=3.0, size=(1, 3, 2))
    check_against_reference(xp, problem._replace(logits=random_logits), blank_id=blank_id)


def test_fully_padded_sequences(xp):
    """A sequence with every frame padded: no labels cost nothing, any label is impossible."""
    problem = standard_problem(15, frame_layout="middle", min_label_length=1)
    logit_paddings = problem.logit_paddings.copy()
    logit_paddings[:2] = 1.0
    label_paddings = problem.label_paddings.copy()
    label_paddings[0] = 1.0
    problem = problem._replace(logit_paddings=logit_paddings, label_paddings=label_paddings)
    (loss, blank, nonblank), held = run(xp, problem)
    assert loss[0] >= 0.0
    np.testing.assert_allclose(loss[0], 0.0, atol=TOLERANCE["float64"]["atol"])
    assert_impossible(loss[1])
    np.testing.assert_allclose(loss[2:], ctc_reference(*held)[0][2:], **TOLERANCE["float64"])
    expected_blank, expected_nonblank = reference_forward_probs(*held)
    assert_log_probs_close(blank, expected_blank, **TOLERANCE["float64"])
    assert_log_probs_close(nonblank, expected_nonblank, **TOLERANCE["float64"])


@pytest.mark.parametrize("padding_dtype", [np.float32, np.int32, np.bool_])
def test_padding_dtypes(xp, padding_dtype):
    """Paddings may be float, int or bool (float64 is used everywhere else)."""
    problem = standard_problem(16, frame_layout="middle")
    problem = problem._replace(
        logit_paddings=problem.logit_paddings.astype(padding_dtype),
        label_paddings=problem.label_paddings.astype(padding_dtype),
    )
    check_against_reference(xp, problem)


def test_other_arguments_may_come_from_numpy(xp):
    """Only the logits decide the namespace: NumPy paddings and labels are converted to it."""
    problem = standard_problem(17, frame_layout="middle")
    loss, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(xp.asarray(problem.logits), *problem[1:])
    xp.check_type(loss, blank, nonblank)
    np.testing.assert_allclose(xp.to_numpy(loss), ctc_reference(*problem)[0], **TOLERANCE["float64"])


def test_other_arguments_may_come_from_torch_or_jax_in_any_form(xp):
    """Paddings and labels from torch (requiring grad, bfloat16) or JAX (bfloat16) beside any
    backend's logits: converted by value, as NumPy ones are."""
    problem = standard_problem(19, frame_layout="middle")
    expected = ctc_reference(*problem)[0]
    forms = []
    if installed("torch"):
        import torch

        forms.append(lambda a: torch.tensor(a, dtype=torch.float32, requires_grad=True))
        forms.append(lambda a: torch.tensor(a, dtype=torch.bfloat16))
    if installed("jax"):
        import jax.numpy as jnp

        forms.append(lambda a: jnp.asarray(a, dtype=jnp.bfloat16))
    if not forms:
        pytest.skip("neither torch nor jax is installed")
    for form in forms:
        loss = ctc_multi.ctc_loss(xp.asarray(problem.logits), form(problem.logit_paddings), problem.labels, form(problem.label_paddings))
        xp.check_type(loss)
        np.testing.assert_allclose(xp.to_numpy(loss), expected, **TOLERANCE["float64"])


def test_numpy_bfloat16_logits():
    """NumPy arrays of ml_dtypes' bfloat16 (what np.asarray makes of JAX's) are computed in
    float32, as torch's and JAX's bfloat16 are: the same losses as their float32 values."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    problem = standard_problem(20, frame_layout="middle")
    for narrow_dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e5m2):  # the second crashed after a change (kind "f")
        narrow = problem.logits.astype(narrow_dtype)
        loss = ctc_multi.ctc_loss(narrow, *problem[1:])
        assert loss.dtype == np.float32
        np.testing.assert_allclose(loss, ctc_multi.ctc_loss(narrow.astype(np.float32), *problem[1:]), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.asmatrix
def test_numpy_arrays_in_any_layout_numpy_can_make(xp):
    """NumPy arguments that NumPy itself makes from files and other frameworks: big-endian
    (``np.load`` of a '>f8' file: its float64 logits were computed in float32, 1.4e-3 off on a
    long sequence; its labels crashed), ``np.matrix`` paddings and labels (crashed beside NumPy
    logits), ml_dtypes' bfloat16 paddings and int4 labels (refused, or int4 read as float32)."""
    problem = standard_problem(21, frame_layout="middle")
    expected = ctc_reference(*problem)[0]
    big_endian = [a.astype(a.dtype.newbyteorder(">")) for a in problem]
    if xp.name == "numpy":  # the logits decide the namespace: only NumPy's can be big-endian
        loss = ctc_multi.ctc_loss(big_endian[0], *problem[1:])
        assert loss.dtype == np.float64
        np.testing.assert_allclose(loss, expected, **TOLERANCE["float64"])
    logits = xp.asarray(problem.logits)
    forms = {
        "big-endian": big_endian[1:],
        "np.matrix": (np.asmatrix(problem.logit_paddings), np.asmatrix(problem.labels), np.asmatrix(problem.label_paddings)),
    }
    if installed("ml_dtypes"):
        import ml_dtypes

        assert problem.labels.max() < 8  # int4 holds them
        forms["ml_dtypes"] = (problem.logit_paddings.astype(ml_dtypes.bfloat16), problem.labels.astype(ml_dtypes.int4), problem.label_paddings.astype(ml_dtypes.float8_e4m3fn))
        # float8_e5m2, unlike the others, has NumPy's kind "f", which NumPy's isdtype refuses
        forms["float8_e5m2"] = (problem.logit_paddings.astype(ml_dtypes.float8_e5m2), problem.labels, problem.label_paddings.astype(ml_dtypes.float8_e5m2))
    for name, others in forms.items():
        loss = ctc_multi.ctc_loss(logits, *others)
        xp.check_type(loss)
        np.testing.assert_allclose(xp.to_numpy(loss), expected, **TOLERANCE["float64"], err_msg=name)


def test_torch_meta_tensors_give_shapes_without_values():
    """torch's meta device holds shapes, no values (model shape inference): the value checks,
    which read values, crashed there ("Tensor.item() cannot be called on meta tensors"); they
    are skipped as under torch.compile. A meta argument beside CPU logits cannot be read:
    refused, naming it."""
    torch = pytest.importorskip("torch")
    meta = functools.partial(torch.empty, device="meta")
    logits, paddings, labels, label_paddings = meta(2, 6, 4, requires_grad=True), meta(2, 6), meta(2, 3, dtype=torch.long), meta(2, 3)
    loss = ctc_multi.ctc_loss(logits, paddings, labels, label_paddings)
    assert loss.is_meta and loss.shape == (2,)
    loss.sum().backward()
    assert logits.grad.is_meta and logits.grad.shape == (2, 6, 4)
    _, blank, label = ctc_multi.ctc_loss_with_forward_probs(logits, paddings, labels, label_paddings)
    assert (blank.shape, label.shape) == ((6, 2, 4), (6, 2, 3))
    tokens, _ = ctc_multi.forced_align(logits, paddings, labels, label_paddings)
    assert tokens.is_meta and tokens.shape == (2, 6)
    assert ctc_multi.torch_ctc_loss(meta(6, 2, 4), labels, meta(2, dtype=torch.long), meta(2, dtype=torch.long)).is_meta
    assert ctc_multi.lengths_to_paddings(meta(2, dtype=torch.long), 5).shape == (2, 5)
    with pytest.raises(ValueError, match="^logit_paddings cannot be read onto the logits' device cpu"):
        ctc_multi.ctc_loss(torch.zeros(2, 6, 4), paddings, np.ones((2, 3), dtype=np.int64), np.zeros((2, 3)))


def test_results_do_not_depend_on_numpys_error_state(xp):
    """The recursion's exp of "log 0" underflows to 0 by design: a caller's np.seterr(under=
    "raise") made every call on NumPy arrays and CPU torch tensors (which run NumPy's loop)
    raise FloatingPointError. Padded frames and a -inf class included."""
    problem = standard_problem(23, frame_layout="middle")
    problem = problem._replace(logits=np.where(np.arange(SHAPE["K"]) == 4, -np.inf, problem.logits))
    arrays, _ = to_backend(xp, problem, "float32")
    expected = [xp.to_numpy(r) for r in ctc_multi.ctc_loss_and_grad(*arrays)]
    with np.errstate(under="raise"):
        got = [xp.to_numpy(r) for r in ctc_multi.ctc_loss_and_grad(*arrays)]
        for function in (ctc_multi.ctc_loss, ctc_multi.ctc_loss_with_forward_probs, ctc_multi.ctc_posteriors, ctc_multi.forced_align):
            function(*arrays)
        if xp.name.startswith("torch"):
            logits = arrays[0].clone().requires_grad_(True)
            ctc_multi.ctc_loss(logits, *arrays[1:], reduction="mean").backward()
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_torch_tensors_get_no_numpy_warnings_from_the_loop_numpy_runs_for_them():
    """A NaN logit on a valid frame of a CPU tensor gave a NaN loss (right) and a NumPy
    "RuntimeWarning: invalid value encountered in logaddexp" (from the NumPy loop that runs for
    CPU tensors, an implementation detail): torch's own ops warn of nothing. Under a caller's
    np.seterr(all="raise"), set for their NumPy code, it raised. Now neither, on every entry point."""
    torch = pytest.importorskip("torch")
    problem = standard_problem(24)
    logits = problem.logits.copy()
    logits[0, 2, 1] = np.nan
    arrays = (torch.tensor(logits, dtype=torch.float32), *(torch.tensor(a) for a in problem[1:]))
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        loss = ctc_multi.ctc_loss(*arrays)
        assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
        ctc_multi.ctc_loss_and_grad(*arrays)
        ctc_multi.ctc_loss_with_forward_probs(*arrays)
        ctc_multi.ctc_posteriors(*arrays)
        ctc_multi.forced_align(*arrays)
        logits = arrays[0].clone().requires_grad_(True)
        ctc_multi.ctc_loss(logits, *arrays[1:]).sum().backward()
    assert torch.isnan(logits.grad[0]).any() and torch.isfinite(logits.grad[1:]).all()


def test_logits_wider_than_float64_are_refused():
    """NumPy's longdouble was computed in float32; it is refused, naming logits."""
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("longdouble is float64 on this platform")
    problem = standard_problem(22)
    with pytest.raises(ValueError, match=r"^logits of dtype float128, wider than float64"):
        ctc_multi.ctc_loss(problem.logits.astype(np.longdouble), *problem[1:])


def test_a_moderate_log_epsilon_does_not_clamp_real_emissions(xp):
    """log_epsilon = -10 with logits 8 times a standard normal: some states' emissions lie below
    -10. They still count as what they are (optax counts them too); only "log 0" itself, worth
    about e^-10 = 4.5e-5 per move it allows, separates the loss from the exact one. Clamped at
    log_epsilon, the second sequence's loss was 1e-2 off."""
    logits = np.random.default_rng(12).standard_normal((2, 4, 3)) * 8
    labels, label_paddings, logit_paddings = np.array([[1, 2], [1, 0]]), np.array([[0.0, 0.0], [0.0, 1.0]]), np.zeros((2, 4))
    log_probs = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    assert log_probs[1][:, [0, 1]].min() < -10  # a blank or label emission below log_epsilon
    exact = ctc_reference(logits, logit_paddings, labels, label_paddings)[0]
    arrays = (xp.asarray(logits), xp.asarray(logit_paddings), xp.asarray(labels), xp.asarray(label_paddings))
    loss = xp.to_numpy(ctc_multi.ctc_loss(*arrays, log_epsilon=-10.0))
    np.testing.assert_allclose(loss, exact, rtol=0, atol=1e-4)


def test_padded_labels_outside_the_classes_are_ignored(xp):
    """Padded label positions may hold anything (-1, K, large): they are never read as classes."""
    problem = standard_problem(18, min_label_length=1)
    padded = problem.label_paddings != 0
    labels = problem.labels.copy()
    labels[padded] = np.resize([-1, SHAPE["K"], 1000], labels.shape)[padded]
    (loss, _, _), held = run(xp, problem._replace(labels=labels))
    np.testing.assert_allclose(loss, ctc_reference(*held)[0], **TOLERANCE["float64"])


@pytest.mark.parametrize("label_dtype", [np.int8, np.uint8, np.uint16, np.uint32, np.uint64])
def test_narrow_label_dtypes_with_many_classes(xp, label_dtype):
    """Labels of any integer dtype, also when K - 1 and blank_id do not fit in it (int8, K = 130),
    and unsigned ones (for which torch has few ops: they are converted first)."""
    K = 130
    problem = random_problem(np.random.default_rng(24), 2, 4, K, 2, blank_id=K - 1, min_label_length=1)
    labels = np.where(problem.label_paddings != 0, 0, np.minimum(problem.labels, 120)).astype(label_dtype)
    problem = problem._replace(labels=labels)
    (loss, _, _), held = run(xp, problem, blank_id=K - 1)
    np.testing.assert_allclose(loss, ctc_reference(*held, blank_id=K - 1)[0], **TOLERANCE["float64"])


# ---------------------------------------------------------------------------------------------
# Where optax is wrong: non-finite padded frames, negative losses, impossible alignments.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_non_finite_padded_frames_do_not_leak(xp, dtype):
    """NaN / inf stored in padded frames (first, middle and last frames) change nothing."""
    problem = poison_padded_frames(standard_problem(19, frame_layout="anywhere", pad_label=-1))
    assert np.isnan(problem.logits).any() and np.isinf(problem.logits).any()
    (loss, blank, nonblank), _ = run(xp, problem, dtype=dtype)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(blank)) and np.all(np.isfinite(nonblank))
    check_against_reference(xp, problem, dtype=dtype, also_ctc_loss=True)


def test_non_finite_padded_frames_have_zero_gradient(xp):
    """jax.grad / torch autograd: padded frames get exactly zero gradient, and no NaN anywhere."""
    problem = poison_padded_frames(standard_problem(20, frame_layout="middle"))
    (logits, *rest), held = to_backend(xp, problem)
    for function in (ctc_multi.ctc_loss, ctc_multi.ctc_loss_with_forward_probs):
        gradient = loss_gradient(xp, function, logits, *rest)
        assert np.all(np.isfinite(gradient))
        assert np.all(gradient[problem.logit_paddings != 0] == 0.0)
        np.testing.assert_allclose(gradient, ctc_reference(*held)[1], **TOLERANCE["gradient_float64"])


def test_loss_is_never_negative(xp):
    """optax issue 1771: a near-certain label gave a loss of -8.3e-8 in float32."""
    problem = Problem(np.array([[[0.0, 17.0], [0.0, 17.0]]]), np.zeros((1, 2)), np.array([[1]]), np.zeros((1, 1)))
    (loss, _, _), _ = run(xp, problem, dtype="float32")
    assert loss.dtype == np.float32
    # Exactly: -log(1 - P(no frame emits 1)**2) = 1.7e-15.
    assert 0.0 <= loss[0] <= 1e-6


def test_a_certain_sequence_loses_plus_zero(xp):
    """Only the blank can be emitted and the labels are empty: the loss is +0.0, not -0.0.

    (torch's own loop printed tensor([-0.]): a log-likelihood of 0.0, negated.)"""
    logits = np.full((2, 3, 4), -1e4)
    logits[..., 0] = 0.0
    problem = Problem(logits, np.zeros((2, 3)), np.zeros((2, 2), dtype=np.int64), np.ones((2, 2)))
    for dtype in ("float32", "float64"):
        (loss, _, _), _ = run(xp, problem, dtype=dtype)
        assert np.array_equal(loss, [0.0, 0.0])
        assert not np.any(np.signbit(loss)), loss


def test_confident_logits_give_non_negative_losses(xp):
    """Near-certain float32 alignments: rounding must not push any loss below zero."""
    problem = standard_problem(21, scale=40.0)
    (loss, _, _), held = run(xp, problem, dtype="float32")
    assert np.all(loss >= 0.0)
    np.testing.assert_allclose(loss, ctc_reference(*held)[0], rtol=1e-4, atol=1e-4)


IMPOSSIBLE = Problem(
    # Two frames cannot emit [1, 1] (it needs a blank in between) nor [1, 2, 3]; [3, 2] is fine.
    np.random.default_rng(22).normal(size=(3, 2, 4)),
    np.zeros((3, 2)),
    np.array([[1, 1, 0], [1, 2, 3], [3, 2, 0]]),
    np.array([[0, 0, 1], [0, 0, 0], [0, 0, 1.0]]),
)


@pytest.mark.parametrize(("dtype", "log_epsilon"), [("float64", LOG_EPSILON), ("float32", LOG_EPSILON), ("float64", -1e3)])
def test_impossible_alignments_are_large_and_finite(xp, dtype, log_epsilon):
    (loss, blank, nonblank), held = run(xp, IMPOSSIBLE, dtype=dtype, log_epsilon=log_epsilon)
    assert_impossible(loss[:2], log_epsilon)
    np.testing.assert_allclose(loss[2], ctc_reference(*held)[0][2], **TOLERANCE[dtype])
    assert not np.isnan(blank).any() and not np.isnan(nonblank).any()


def test_impossible_alignments_have_finite_gradients(xp):
    (logits, *rest), held = to_backend(xp, IMPOSSIBLE)
    gradient = loss_gradient(xp, ctc_multi.ctc_loss, logits, *rest)
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(gradient[2], ctc_reference(*held)[1][2], **TOLERANCE["gradient_float64"])




@pytest.mark.parametrize(
    "shape",
    [
        (2, 1, 3, 1),
        (2, 4, 3, 0),
        (1, 5, 2, 2),
    ],
    ids=["one_frame", "no_label_positions", "batch_of_one_two_classes"],
)
def test_gradient_edge_shapes(xp, shape):
    """jax.grad / torch autograd with T = 1, N = 0, and B = 1 with K = 2 (blank last)."""
    B, T, K, N = shape
    problem = random_problem(np.random.default_rng(23), B, T, K, N, blank_id=K - 1)
    (logits, *rest), held = to_backend(xp, problem)
    gradient = loss_gradient(xp, ctc_multi.ctc_loss, logits, *rest, blank_id=K - 1)
    np.testing.assert_allclose(gradient, ctc_reference(*held, blank_id=K - 1)[1], **TOLERANCE["gradient_float64"])


def test_loss_is_never_negative_with_labels_padded_by_the_blank(xp):
    """test_losses' near-certain float32 label (optax issue 1771), its label row padded with the
    blank's id (torch's zero padding). The padded 0 is not a label equal to the blank: the clamp
    of rounding-level negatives applies (mutation L29: the first padded label counted as
    unpadded, the clamp was skipped and the loss came back negative)."""
    problem = Problem(np.array([[[0.0, 17.0], [0.0, 17.0]]]), np.zeros((1, 2)), np.array([[1, 0]]), np.array([[0.0, 1.0]]))
    arrays, _ = to_backend(xp, problem, "float32")
    loss = xp.to_numpy(ctc_multi.ctc_loss(*arrays))
    assert 0.0 <= loss[0] <= 1e-6, loss


def test_non_finite_logits_on_padded_frames_make_no_numpy_warning(xp):
    """Padded frames may hold anything (README): a +inf and a NaN there give no NumPy warning
    and no error under np.errstate(all="raise"). NumPy's blocked log-softmax takes those frames
    as zeros (mutation B02, the rows taken as they are: "invalid value encountered in subtract",
    inf - inf in the padded frame's log-softmax, on every entry point; the values unchanged)."""
    import warnings

    logits = np.random.default_rng(0).normal(size=(1, 5, 4))
    logits[0, 4, :] = np.inf
    logits[0, 3, 1] = np.nan
    paddings = np.zeros((1, 5))
    paddings[0, 3:] = 1.0
    arrays, _ = to_backend(xp, Problem(logits, paddings, np.array([[1, 2]]), np.zeros((1, 2))))
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        loss = xp.to_numpy(ctc_multi.ctc_loss(*arrays))
        ctc_multi.ctc_loss_and_grad(*arrays)
        ctc_multi.ctc_posteriors(*arrays)
        ctc_multi.forced_align(*arrays)
    assert np.all(np.isfinite(loss))


def test_a_plus_inf_logit_off_the_labels_has_no_softmax(xp):
    """A valid frame with a +inf logit has no softmax: NaN, as optax and torch give (README,
    Emissions below -1e5). With +inf on class 3, which labels [1, 2] never emit, NumPy, CPU
    torch and JAX gave a finite loss of 100002.59 (the path classes' log-probabilities came out
    -inf, floored to -1e5: the row's peak was taken as 0) and a gradient NaN in one class only.
    The other sequence is untouched."""
    logits = np.random.default_rng(0).normal(size=(2, 4, 4))
    logits[0, 1, 3] = np.inf
    problem = Problem(logits, np.zeros((2, 4)), np.array([[1, 2], [1, 2]]), np.zeros((2, 2)))
    arrays, held = to_backend(xp, problem)
    with np.errstate(all="ignore"):
        loss, gradient = (xp.to_numpy(result) for result in ctc_multi.ctc_loss_and_grad(*arrays))
        (with_probs, _, _), _ = run(xp, problem)
    expected, expected_gradient = ctc_reference(*(array[1:] for array in held))
    for losses in (loss, with_probs):
        assert np.isnan(losses[0]), losses
        np.testing.assert_allclose(losses[1], expected[0], **TOLERANCE["float64"])
    assert np.all(np.isnan(gradient[0, 1]))
    np.testing.assert_allclose(gradient[1], expected_gradient[0], **TOLERANCE["gradient_float64"])
