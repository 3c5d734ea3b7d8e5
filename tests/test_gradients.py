"""Gradients on every backend: ctc_loss_and_grad, jax.grad / torch autograd of ctc_loss, options.

Every test body runs on each installed backend through the ``xp`` fixture, unless its name says
which framework it is about. Expected values come from the float64 reference (``reference.py``),
from ``torch.nn.functional.ctc_loss`` (``torch_reference.py``), from central finite differences,
or from exact arithmetic on those; never from ctc_multi itself.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import BACKENDS, TOLERANCE, installed
from helpers import (
    LOG_EPSILON,
    Problem,
    assert_gradient_structure,
    assert_impossible,
    autodiff,
    compiled,
    feasible_rows,
    poison_padded_frames,
    random_problem,
    reference_forward_probs,
    run_in_fresh_python,
    small_problems,
    to_backend,
)
from hypothesis import HealthCheck, given, settings
from reference import ctc_reference
from torch_reference import lengths_of, torch_ctc

import ctc_multi

AUTODIFF = ("jax", "torch")


def loss_and_grad(xp, problem: Problem, dtype: str = "float64", **options):
    """ctc_loss_and_grad as NumPy arrays (array type and dtype checked), and the problem as held."""
    arrays, held = to_backend(xp, problem, dtype)
    loss, grad = compiled(xp, functools.partial(ctc_multi.ctc_loss_and_grad, **options))(*arrays)
    xp.check_type(loss, grad)
    assert loss.dtype == xp.dtype(dtype) and grad.dtype == xp.dtype(dtype)
    assert tuple(grad.shape) == problem.logits.shape
    return xp.to_numpy(loss), xp.to_numpy(grad), held


def summed_loss(**options):
    """x, *rest -> sum of ctc_loss(x, *rest, **options), the scalar to differentiate."""
    return lambda x, *rest: ctc_multi.ctc_loss(x, *rest, **options).sum()


def mixed_problem() -> Problem:
    """Right-padded (so torch can take it): ordinary, empty labels, repeats, and one that cannot be aligned.

    Row 3 has labels [3, 3] (three frames needed: a blank must separate them) but two frames.
    """
    rng = np.random.default_rng(30)
    input_lengths = np.array([7, 5, 6, 2])
    logit_paddings = (np.arange(7)[None, :] >= input_lengths[:, None]).astype(np.float64)
    labels = np.array([[1, 2, 3], [0, 0, 0], [2, 2, 4], [3, 3, 0]])
    label_paddings = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 1.0]])
    return Problem(rng.normal(scale=2.0, size=(4, 7, 5)), logit_paddings, labels, label_paddings)


INFEASIBLE_ROW = 3


def expected_values(held: Problem, *, blank_id: int = 0, zero_infinity: bool = False, reduction: str = "none"):
    """Reference loss and d(reduced loss)/d logits; zero_infinity and reduction applied by hand (torch's rules)."""
    loss, grad = ctc_reference(*held, blank_id=blank_id)
    if zero_infinity:
        infeasible = ~np.isfinite(loss)
        loss = np.where(infeasible, 0.0, loss)
        grad = np.where(infeasible[:, None, None], 0.0, grad)
    if reduction == "sum":
        return loss.sum(), grad
    if reduction == "mean":
        label_lengths = held.labels.shape[1] - held.label_paddings.sum(axis=1)
        scale = 1.0 / np.maximum(label_lengths, 1.0) / loss.shape[0]
        return (loss * scale).sum(), grad * scale[:, None, None]
    return loss, grad


# ---------------------------------------------------------------------------------------------
# ctc_loss_and_grad against the reference, on every backend
# ---------------------------------------------------------------------------------------------

CASES = {
    "plain": dict(B=3, T=8, K=5, N=3),
    "blank_last": dict(B=3, T=7, K=4, N=3, blank_id=3),
    "blank_inside": dict(B=3, T=7, K=5, N=3, blank_id=2, pad_label=-1),
    "middle_padding": dict(B=4, T=9, K=4, N=3, frame_layout="middle", pad_label=-1),
    "anywhere_padding": dict(B=4, T=8, K=4, N=3, frame_layout="anywhere", blank_id=1),
    "many_repeats": dict(B=3, T=9, K=3, N=4, repeat_probability=0.7, min_label_length=2),
    "confident": dict(B=3, T=8, K=5, N=3, scale=12.0),
}


def case_problem(case: str, seed: int) -> tuple[Problem, int]:
    """The random problem of ``CASES[case]`` (seed ``seed`` plus the case's rank) and its blank_id."""
    config = dict(CASES[case])
    shape = [config.pop(name) for name in ("B", "T", "K", "N")]
    problem = random_problem(np.random.default_rng(seed + sorted(CASES).index(case)), *shape, **config)
    return problem, config.get("blank_id", 0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grad_match_reference(xp, case, dtype):
    problem, blank_id = case_problem(case, 40)
    loss, grad, held = loss_and_grad(xp, problem, dtype, blank_id=blank_id)
    expected_loss, expected_grad = ctc_reference(*held, blank_id=blank_id)
    np.testing.assert_allclose(loss, expected_loss, **TOLERANCE[dtype])
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE[f"gradient_{dtype}"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ["anywhere_padding", "blank_inside", "confident"])
def test_jax_as_on_a_gpu_matches_reference(jax_x64, monkeypatch, case, dtype):
    """Off a CPU the JAX adapter takes the gradient's occupancies from the mirror image
    (``OCCUPANCY_ELSEWHERE``), a path the ``xp`` tests run only on a GPU. Here it runs on the
    CPU, ``jax.default_backend()`` patched and JAX's caches cleared on both sides (the way is
    chosen when a function is traced), for ctc_loss_and_grad and jax.grad of ctc_loss."""
    import jax

    import ctc_multi.backends.jax as adapter
    from ctc_multi.lattice import forward_and_occupancy_by_mirror

    assert adapter.OCCUPANCY_ELSEWHERE is forward_and_occupancy_by_mirror
    calls = []

    def counted(*args, **options):
        calls.append(1)
        return forward_and_occupancy_by_mirror(*args, **options)

    monkeypatch.setattr(adapter, "OCCUPANCY_ELSEWHERE", counted)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jax.clear_caches()
    try:
        xp = BACKENDS["jax"][1]()
        problem, blank_id = case_problem(case, 90)
        loss, grad, held = loss_and_grad(xp, problem, dtype, blank_id=blank_id)
        arrays, _ = to_backend(xp, problem, dtype)
        autodiff_grad = xp.to_numpy(jax.jit(jax.grad(summed_loss(blank_id=blank_id)))(*arrays))
    finally:
        jax.clear_caches()
    assert len(calls) == 2, "the mirror image was not taken"
    expected_loss, expected_grad = ctc_reference(*held, blank_id=blank_id)
    np.testing.assert_allclose(loss, expected_loss, **TOLERANCE[dtype])
    for gradient in (grad, autodiff_grad):
        np.testing.assert_allclose(gradient, expected_grad, **TOLERANCE[f"gradient_{dtype}"])
        assert_gradient_structure(gradient, held.logit_paddings, atol=TOLERANCE[f"gradient_{dtype}"]["atol"])


@pytest.mark.parametrize("num_classes", [5, 300])  # the one-hot sum and the scatter-add
def test_loss_and_grad_leave_inputs_and_earlier_results_as_they_were(xp, num_classes):
    """NumPy writes the gradient's softmax over its own log-softmax and edits that array in
    place: the caller's arrays, and the results of an earlier call, must come out unchanged."""
    problem = random_problem(np.random.default_rng(57), 3, 9, num_classes, 3, frame_layout="anywhere")
    arrays, _ = to_backend(xp, problem, "float32")
    before = [np.array(xp.to_numpy(array)) for array in arrays]
    first_loss, first_grad = ctc_multi.ctc_loss_and_grad(*arrays)
    kept_loss, kept_grad = np.array(xp.to_numpy(first_loss)), np.array(xp.to_numpy(first_grad))
    second_loss, second_grad = ctc_multi.ctc_loss_and_grad(*arrays)

    for array, original in zip(arrays, before):
        np.testing.assert_array_equal(xp.to_numpy(array), original)
    np.testing.assert_array_equal(xp.to_numpy(first_loss), kept_loss)
    np.testing.assert_array_equal(xp.to_numpy(first_grad), kept_grad)
    np.testing.assert_array_equal(xp.to_numpy(second_loss), kept_loss)
    np.testing.assert_array_equal(xp.to_numpy(second_grad), kept_grad)
    assert not np.shares_memory(xp.to_numpy(first_grad), xp.to_numpy(second_grad))


def test_numpy_logits_that_are_read_only_or_strided_give_the_same_numbers():
    """The logits are used as given when their dtype is right (no copy): a read-only or a
    non-contiguous (B, T, K) view gives what a fresh contiguous array gives, and is not written."""
    problem = random_problem(np.random.default_rng(58), 3, 9, 300, 3, frame_layout="anywhere")
    others = problem[1:]
    expected_loss, expected_grad = ctc_multi.ctc_loss_and_grad(problem.logits.copy(), *others)
    read_only = problem.logits.copy()
    read_only.flags.writeable = False
    strided = np.ascontiguousarray(np.transpose(problem.logits, (2, 0, 1))).transpose(1, 2, 0)
    assert not strided.flags.c_contiguous
    for logits in (read_only, strided):
        before = logits.copy()
        loss, grad = ctc_multi.ctc_loss_and_grad(logits, *others)
        np.testing.assert_array_equal(loss, expected_loss)
        np.testing.assert_array_equal(grad, expected_grad)
        np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_padded_frames_get_zero_gradient_and_valid_frames_sum_to_zero(xp, dtype):
    """NaN / inf stored in padded frames (first, middle, last) reach neither loss nor gradient."""
    problem = poison_padded_frames(random_problem(np.random.default_rng(50), 4, 9, 5, 3, frame_layout="anywhere"))
    loss, grad, held = loss_and_grad(xp, problem, dtype)
    assert_gradient_structure(grad, problem.logit_paddings, atol=TOLERANCE[f"gradient_{dtype}"]["atol"])
    np.testing.assert_allclose(grad, ctc_reference(*held)[1], **TOLERANCE[f"gradient_{dtype}"])


def test_infeasible_sequences_have_finite_gradients(xp):
    """Too few frames for the labels: a large finite loss and a finite gradient, never NaN."""
    loss, grad, held = loss_and_grad(xp, mixed_problem())
    expected_loss, expected_grad = ctc_reference(*held)
    feasible = np.arange(4) != INFEASIBLE_ROW
    assert_impossible(loss[INFEASIBLE_ROW])
    assert_gradient_structure(grad, held.logit_paddings, atol=TOLERANCE["gradient_float64"]["atol"])
    np.testing.assert_allclose(loss[feasible], expected_loss[feasible], **TOLERANCE["float64"])
    np.testing.assert_allclose(grad[feasible], expected_grad[feasible], **TOLERANCE["gradient_float64"])

    arrays, _ = to_backend(xp, mixed_problem())
    autodiff_grad = autodiff(xp, summed_loss(), *arrays)
    if autodiff_grad is not None:
        assert np.all(np.isfinite(autodiff_grad))
        np.testing.assert_allclose(autodiff_grad, grad, **TOLERANCE["gradient_float64"])


def test_zero_infinity_zeroes_loss_and_gradient_of_infeasible_sequences(xp):
    problem = mixed_problem()
    loss, grad, held = loss_and_grad(xp, problem, zero_infinity=True)
    assert loss[INFEASIBLE_ROW] == 0.0
    assert np.all(grad[INFEASIBLE_ROW] == 0.0)
    expected_loss, expected_grad = expected_values(held, zero_infinity=True)
    np.testing.assert_allclose(loss, expected_loss, **TOLERANCE["float64"])
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE["gradient_float64"])

    arrays, _ = to_backend(xp, problem)
    only_loss = compiled(xp, functools.partial(ctc_multi.ctc_loss, zero_infinity=True))(*arrays)
    xp.check_type(only_loss)
    np.testing.assert_allclose(xp.to_numpy(only_loss), expected_loss, **TOLERANCE["float64"])
    autodiff_grad = autodiff(xp, summed_loss(zero_infinity=True), *arrays)
    if autodiff_grad is not None:
        assert np.all(autodiff_grad[INFEASIBLE_ROW] == 0.0)
        np.testing.assert_allclose(autodiff_grad, expected_grad, **TOLERANCE["gradient_float64"])


def test_many_classes_and_frames_in_several_blocks_of_numpys_log_softmax(xp):
    """NumPy's log-softmax (also CPU torch's) runs over blocks of 2**18 values; a mutation review
    found no test whose B*T*K reaches a second block (only the first would have been normalised,
    a loss 770 nats off). Here 2 * 300 * 512 values, two blocks, padded frames in the second."""
    rng = np.random.default_rng(21)
    B, T, K, N = 2, 300, 512, 20
    paddings = np.zeros((B, T))
    paddings[1, 280:] = 1.0
    problem = Problem(rng.standard_normal((B, T, K)), paddings, rng.integers(1, K, size=(B, N)), np.zeros((B, N)))
    loss, grad, held = loss_and_grad(xp, problem)
    expected_loss, expected_grad = expected_values(held)
    np.testing.assert_allclose(loss, expected_loss, **TOLERANCE["float64"])
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE["gradient_float64"])


def test_the_gradient_of_an_impossible_sequence_is_its_losss(xp):
    """Without zero_infinity a sequence that cannot be aligned (two repeated labels, two frames)
    has a finite loss near -log_epsilon and the gradient of that loss, not zero (a mutation
    review: no test read it; zeroing it left every test passing). Checked against central
    differences of the loss itself (step 1e-5 on a loss of 1e5: rounding about 1e-6)."""
    logits = np.random.default_rng(0).standard_normal((1, 2, 4))
    problem = Problem(logits, np.zeros((1, 2)), np.array([[1, 1]]), np.zeros((1, 2)))
    loss, grad, _ = loss_and_grad(xp, problem)
    assert 9e4 < loss[0] < 1.1e5
    arrays, _ = to_backend(xp, problem)
    step, numeric = 1e-5, np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        losses = [xp.to_numpy(ctc_multi.ctc_loss(xp.asarray(x), *arrays[1:]))[0] for x in (up, down)]
        numeric[index] = (losses[0] - losses[1]) / (2 * step)
    assert np.abs(numeric).max() > 0.1  # a gradient to get wrong
    np.testing.assert_allclose(grad, numeric, atol=1e-4)


def test_zero_infinity_leaves_sequences_that_inf_logits_block_and_forced_align_finds_them(xp):
    """As the README states (API, Differences): a sequence whose every path runs through a
    -inf logit is not zeroed by zero_infinity; its emissions count as -1e5, so its loss is about
    1e5 per blocked frame. forced_align tells it apart (token -1 on every frame), the recipe
    the README gives for torch's behaviour. The other sequence is untouched."""
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((2, 6, 4))
    logits[0, :, 3] = -np.inf  # class 3, sequence 0's second label, has probability 0 throughout
    problem = Problem(logits, np.zeros((2, 6)), np.array([[1, 3], [1, 2]]), np.zeros((2, 2)))
    arrays, _ = to_backend(xp, problem)
    loss = xp.to_numpy(compiled(xp, functools.partial(ctc_multi.ctc_loss, zero_infinity=True))(*arrays))
    assert 1e5 <= loss[0] < 1e5 + 100, loss
    expected_loss, _ = ctc_reference(*Problem(*(a[1:] for a in problem)))
    np.testing.assert_allclose(loss[1:], expected_loss, **TOLERANCE["float64"])
    tokens, _ = compiled(xp, ctc_multi.forced_align)(*arrays)
    blocked = (xp.to_numpy(tokens) == -1).all(axis=1)
    assert blocked.tolist() == [True, False]
    np.testing.assert_allclose(np.where(blocked, 0.0, loss), [0.0, expected_loss[0]], **TOLERANCE["float64"])


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(xp, reduction, zero_infinity):
    """"mean" is torch's: each loss over its label length (at least 1, row 1 has none), then the batch mean."""
    problem = mixed_problem()
    if not zero_infinity:  # the infeasible row's loss would be ~1e5 here, inf in the reference
        problem = Problem(*(array[:INFEASIBLE_ROW] for array in problem))
    arrays, held = to_backend(xp, problem)
    options = dict(reduction=reduction, zero_infinity=zero_infinity)
    expected_loss, expected_grad = expected_values(held, **options)
    loss = compiled(xp, functools.partial(ctc_multi.ctc_loss, **options))(*arrays)
    assert tuple(loss.shape) == np.shape(expected_loss)
    np.testing.assert_allclose(xp.to_numpy(loss), expected_loss, **TOLERANCE["float64"])
    autodiff_grad = autodiff(xp, summed_loss(**options), *arrays)
    if autodiff_grad is not None:
        np.testing.assert_allclose(autodiff_grad, expected_grad, **TOLERANCE["gradient_float64"])


@pytest.mark.parametrize("frames_per_block", [1, 2, 3, 100])
def test_torch_mean_gradient_scaled_in_blocks(monkeypatch, frames_per_block):
    """torch on a CPU: a "mean" takes its weights into the gradient as NumPy's softmax is made,
    a block of frames at a time (``SCALED_EXP_BLOCK`` elements); blocks that split the frames
    unevenly, one frame each, and one block for all must each give the reference's gradient."""
    torch = pytest.importorskip("torch")
    import ctc_multi.lattice

    problem = Problem(*(array[:INFEASIBLE_ROW] for array in mixed_problem()))
    monkeypatch.setattr(ctc_multi.lattice, "SCALED_EXP_BLOCK", frames_per_block * problem.logits.shape[2])
    _, expected = expected_values(problem, reduction="mean")
    logits = torch.tensor(problem.logits, requires_grad=True)
    ctc_multi.ctc_loss(logits, *(torch.as_tensor(array) for array in problem[1:]), reduction="mean").backward()
    np.testing.assert_allclose(logits.grad.numpy(), expected, **TOLERANCE["gradient_float64"])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reduced_losses_keep_the_array_type(xp, reduction):
    """Array type in, array type out: a 0-d array for "sum" and "mean", not a NumPy scalar."""
    arrays, _ = to_backend(xp, mixed_problem())
    xp.check_type(ctc_multi.ctc_loss(*arrays, reduction=reduction))


def test_reduction_is_checked(xp):
    (logits, *rest), _ = to_backend(xp, mixed_problem())
    with pytest.raises(ValueError, match="reduction"):
        ctc_multi.ctc_loss(logits, *rest, reduction="average")


# ---------------------------------------------------------------------------------------------
# Against torch.nn.functional.ctc_loss (a second, independent implementation)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradients_match_torch_ctc_loss(xp, reduction, zero_infinity):
    """torch's gradient goes through its own log_softmax, so both are d loss / d logits."""
    problem = mixed_problem()
    if not zero_infinity:  # torch gives inf and NaN gradients for the infeasible row
        problem = Problem(*(array[:INFEASIBLE_ROW] for array in problem))
    expected_loss, expected_grad = torch_ctc(problem, reduction=reduction, zero_infinity=zero_infinity)
    tolerance = TOLERANCE["torch_float64"]
    arrays, _ = to_backend(xp, problem)
    options = dict(reduction=reduction, zero_infinity=zero_infinity)
    loss = compiled(xp, functools.partial(ctc_multi.ctc_loss, **options))(*arrays)
    np.testing.assert_allclose(xp.to_numpy(loss), expected_loss, **tolerance)
    if reduction == "none":
        _, grad, _ = loss_and_grad(xp, problem, zero_infinity=zero_infinity)
        np.testing.assert_allclose(grad, expected_grad, **tolerance)
    autodiff_grad = autodiff(xp, summed_loss(**options), *arrays)
    if autodiff_grad is not None:
        np.testing.assert_allclose(autodiff_grad, expected_grad, **tolerance)


def test_random_batches_match_torch_ctc_loss(xp):
    problem = random_problem(np.random.default_rng(60), 4, 10, 6, 4, blank_id=2, repeat_probability=0.5)
    lengths_of(problem)  # right-padded, as torch needs
    expected_loss, expected_grad = torch_ctc(problem, blank_id=2)
    loss, grad, _ = loss_and_grad(xp, problem, blank_id=2)
    np.testing.assert_allclose(loss, expected_loss, **TOLERANCE["torch_float64"])
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE["torch_float64"])


# ---------------------------------------------------------------------------------------------
# Gradients of the forward probabilities (autodiff through the scan, where there is autodiff)
# ---------------------------------------------------------------------------------------------


def test_forward_probs_gradients_match_finite_differences(xp):
    """Backends with autodiff (JAX, torch): d/d logits of a random mix of every reachable alpha.

    Unreachable alphas sit near log_epsilon; they get weight zero (but must not make NaN).
    """
    if xp.name not in AUTODIFF:
        pytest.skip(f"{xp.name} has no automatic differentiation")
    rng = np.random.default_rng(70)
    problem = random_problem(rng, 2, 5, 3, 2, frame_layout="middle", min_label_length=1)
    (logits, *rest), held = to_backend(xp, problem)
    expected_blank, expected_nonblank = reference_forward_probs(*held)
    weight_blank = rng.normal(size=expected_blank.shape) * (expected_blank > LOG_EPSILON / 10)
    weight_nonblank = rng.normal(size=expected_nonblank.shape) * (expected_nonblank > LOG_EPSILON / 10)
    weights = xp.asarray(weight_blank), xp.asarray(weight_nonblank)

    def mix(x, *rest):
        loss, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(x, *rest)
        return (blank * weights[0]).sum() + (nonblank * weights[1]).sum() + 0.5 * loss.sum()

    gradient = autodiff(xp, mix, logits, *rest)
    value = compiled(xp, mix)
    assert np.all(np.isfinite(gradient))
    step = 1e-6
    numeric = np.zeros_like(problem.logits)
    for index in np.ndindex(problem.logits.shape):
        shifted = [problem.logits.copy(), problem.logits.copy()]
        shifted[0][index] += step
        shifted[1][index] -= step
        up, down = (float(xp.to_numpy(value(xp.asarray(s), *rest))) for s in shifted)
        numeric[index] = (up - down) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, **TOLERANCE["finite_difference_float64"])


# ---------------------------------------------------------------------------------------------
# JAX: custom_vjp under jit and vmap
# ---------------------------------------------------------------------------------------------


def test_jax_custom_vjp_matches_autodiff_through_the_scan_under_jit_and_vmap(jax_x64):
    """jax.grad of ctc_loss (explicit backward) = jax.grad through the plain scan = the reference."""
    jax = jax_x64
    import jax.numpy as jnp

    problem = random_problem(np.random.default_rng(80), 3, 8, 5, 3, frame_layout="middle", pad_label=-1)
    rest = tuple(jnp.asarray(array) for array in problem[1:])
    expected = ctc_reference(*problem)[1]

    def explicit(x, *others):
        return ctc_multi.ctc_loss(x, *others).sum()

    def through_scan(x, *others):
        return ctc_multi.ctc_loss_with_forward_probs(x, *others)[0].sum()

    assert "custom_vjp_call" in str(jax.make_jaxpr(explicit)(jnp.asarray(problem.logits), *rest))
    # Eager jax.grad is covered by tests/test_losses.py; here under jit, then jit of vmap.
    for function in (explicit, through_scan):
        gradient = jax.jit(jax.grad(function))(jnp.asarray(problem.logits), *rest)
        np.testing.assert_allclose(np.asarray(gradient), expected, **TOLERANCE["gradient_float64"])

    # vmap over a leading axis of every argument (the paddings and labels become tracers too).
    second = random_problem(np.random.default_rng(81), 3, 8, 5, 3, frame_layout="anywhere", pad_label=-1)
    stacked = [jnp.asarray(np.stack([a, b])) for a, b in zip(problem, second)]
    for function in (explicit, through_scan):
        gradients = jax.jit(jax.vmap(jax.grad(function)))(*stacked)
        np.testing.assert_allclose(np.asarray(gradients[0]), expected, **TOLERANCE["gradient_float64"])
        np.testing.assert_allclose(np.asarray(gradients[1]), ctc_reference(*second)[1], **TOLERANCE["gradient_float64"])


def test_jax_jit_with_closed_over_arrays(jax_x64):
    """The usual pattern: jit a function of the logits that closes over JAX paddings and labels."""
    jax = jax_x64
    import jax.numpy as jnp

    problem = random_problem(np.random.default_rng(83), 2, 5, 4, 2)
    rest = tuple(jnp.asarray(array) for array in problem[1:])
    gradient = jax.jit(jax.grad(lambda x: ctc_multi.ctc_loss(x, *rest).sum()))(jnp.asarray(problem.logits))
    np.testing.assert_allclose(np.asarray(gradient), ctc_reference(*problem)[1], **TOLERANCE["gradient_float64"])


def test_jax_vjp_scales_by_the_cotangent(jax_x64):
    jax = jax_x64
    import jax.numpy as jnp

    problem = random_problem(np.random.default_rng(82), 3, 6, 4, 2)
    rest = tuple(jnp.asarray(array) for array in problem[1:])
    loss, pullback = jax.vjp(lambda x: ctc_multi.ctc_loss(x, *rest), jnp.asarray(problem.logits))
    cotangent = np.array([0.5, -2.0, 3.0])
    (gradient,) = pullback(jnp.asarray(cotangent))
    expected = ctc_reference(*problem)[1] * cotangent[:, None, None]
    np.testing.assert_allclose(np.asarray(gradient), expected, **TOLERANCE["gradient_float64"])


# ---------------------------------------------------------------------------------------------
# torch: autograd.Function checked by torch's own gradcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_torch_gradcheck(reduction, zero_infinity):
    torch = pytest.importorskip("torch")
    problem = mixed_problem() if zero_infinity else random_problem(np.random.default_rng(90), 3, 6, 4, 3, frame_layout="middle")
    logits = torch.tensor(problem.logits, dtype=torch.float64, requires_grad=True)
    rest = tuple(torch.as_tensor(array) for array in problem[1:])
    assert torch.autograd.gradcheck(
        lambda x: ctc_multi.ctc_loss(x, *rest, reduction=reduction, zero_infinity=zero_infinity), (logits,), eps=1e-6, atol=1e-7
    )


def test_jax_second_derivatives_match_finite_differences(jax_x64):
    """JAX: reverse over reverse through the custom_vjp (its forward, which makes the gradient,
    is traced JAX): a Hessian-vector product of the summed loss against central differences of
    the float64 reference's gradient."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(93)
    problem = random_problem(rng, 2, 6, 4, 2, frame_layout="middle", min_label_length=1)
    direction = rng.normal(size=problem.logits.shape)
    rest = tuple(jnp.asarray(array) for array in problem[1:])

    def gradient(x):
        return jax.grad(lambda y: jnp.sum(ctc_multi.ctc_loss(y, *rest)))(x)

    product = jax.jit(jax.grad(lambda x: jnp.vdot(gradient(x), jnp.asarray(direction))))(jnp.asarray(problem.logits))
    step = 1e-5
    up = ctc_reference(problem.logits + step * direction, *problem[1:])[1]
    down = ctc_reference(problem.logits - step * direction, *problem[1:])[1]
    np.testing.assert_allclose(np.asarray(product), (up - down) / (2 * step), **TOLERANCE["finite_difference_float64"])


@pytest.mark.parametrize("gathered_in_scan", [False, True], ids=["gathered before the scan", "gathered in the scan"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_jax_second_derivatives_ignore_nan_and_inf_in_padded_frames(jax_x64, reduction, gathered_in_scan, monkeypatch):
    """Padded frames holding NaN or inf: the Hessian-vector product is the one with zeros
    there (zero on the padded frames themselves). The first derivative was clean, the second
    NaN on those frames: the log-softmax parts and the softmax read their raw values, whose
    own derivatives, times zero, are NaN; and where the scan gathers each frame's emissions (on
    a CPU from 2**18 cells, forced here), NaN throughout."""
    import jax
    import jax.numpy as jnp

    import ctc_multi.backends.jax as jax_backend

    monkeypatch.setitem(jax_backend.GATHER_IN_SCAN_MIN_CELLS, jax.default_backend(), 0 if gathered_in_scan else 2**62)

    rng = np.random.default_rng(94)
    problem = random_problem(rng, 3, 6, 4, 2, frame_layout="anywhere", min_label_length=1)
    dtype = jnp.float32 if gathered_in_scan else jnp.float64  # float32: the scaled sums, which gather in the scan
    direction = jnp.asarray(rng.normal(size=problem.logits.shape), dtype)
    rest = tuple(jnp.asarray(array) for array in problem[1:])

    def product(x):
        gradient = jax.grad(lambda y: jnp.sum(ctc_multi.ctc_loss(y, *rest, reduction=reduction)))
        return np.asarray(jax.jit(jax.grad(lambda z: jnp.vdot(gradient(z), direction)))(jnp.asarray(x, dtype)))

    padded = problem.logit_paddings.astype(bool)
    assert padded.any()
    clean = np.where(padded[:, :, None], 0.0, problem.logits)
    expected = product(clean)
    assert np.all(expected[padded] == 0) and np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(product(poison_padded_frames(problem._replace(logits=clean)).logits), expected, **TOLERANCE["float32" if gathered_in_scan else "float64"])


@pytest.mark.parametrize("weight_values", [[0.5, -2.0, 3.0], [1.0, 1.0, 1.0]])
def test_torch_gradient_stays_differentiable_in_the_cotangent(weight_values):
    """torch: refusing the second derivative in the logits must not take away the derivative in
    the cotangent, which autograd records: per-sequence weights w, g = d sum(w * loss) / dx has
    rows w_b G_b, so d |g|^2 / dw_b = 2 w_b |G_b|^2; and torch.autograd.functional.jvp (a double
    backward) gives sum(G_b * v_b). G is the float64 reference's gradient. Weights of one make
    a cotangent of ones, which must still be recorded (the backward's shortcut for
    ``loss.sum()`` lost it)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(95)
    problem = random_problem(rng, 3, 6, 4, 2, frame_layout="middle", min_label_length=1)
    _, expected_gradient = ctc_reference(*problem)
    rest = tuple(torch.as_tensor(array) for array in problem[1:])
    logits = torch.tensor(problem.logits, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor(weight_values, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad((weights * ctc_multi.ctc_loss(logits, *rest)).sum(), logits, create_graph=True)
    (by_weight,) = torch.autograd.grad((gradient**2).sum(), weights)
    squared_norms = (expected_gradient**2).sum(axis=(1, 2))
    np.testing.assert_allclose(by_weight.numpy(), 2 * weights.detach().numpy() * squared_norms, **TOLERANCE["gradient_float64"])

    direction = rng.normal(size=problem.logits.shape)
    _, product = torch.autograd.functional.jvp(lambda x: ctc_multi.ctc_loss(x, *rest), torch.tensor(problem.logits), torch.tensor(direction))
    np.testing.assert_allclose(product.numpy(), (expected_gradient * direction).sum(axis=(1, 2)), **TOLERANCE["gradient_float64"])


def test_torch_second_derivatives_through_autodiff_are_right():
    """torch, where autograd records the loop (``ctc_loss_with_forward_probs``,
    ``ctc_posteriors``): second derivatives are finite and right, though torch's logaddexp
    differentiates twice through exp(b - a) and the lattice holds terms ~1e5 apart (NaN before).
    The loss's Hessian-vector product against central differences of the float64 reference's
    gradient; the posteriors' against JAX's, where JAX is installed."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(94)
    problem = random_problem(rng, 2, 6, 4, 2, frame_layout="middle", min_label_length=1)
    direction = rng.normal(size=problem.logits.shape)
    rest = tuple(torch.as_tensor(array) for array in problem[1:])

    def product(function):
        logits = torch.tensor(problem.logits, dtype=torch.float64, requires_grad=True)
        (gradient,) = torch.autograd.grad(function(logits, *rest), logits, create_graph=True)
        (result,) = torch.autograd.grad((gradient * torch.as_tensor(direction)).sum(), logits)
        return result.numpy()

    step = 1e-5
    up = ctc_reference(problem.logits + step * direction, *problem[1:])[1]
    down = ctc_reference(problem.logits - step * direction, *problem[1:])[1]
    loss_product = product(lambda *arrays: ctc_multi.ctc_loss_with_forward_probs(*arrays)[0].sum())
    np.testing.assert_allclose(loss_product, (up - down) / (2 * step), **TOLERANCE["finite_difference_float64"])

    posteriors_product = product(lambda *arrays: (ctc_multi.ctc_posteriors(*arrays) ** 2).sum())
    assert np.all(np.isfinite(posteriors_product))
    if installed("jax"):
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        jax_rest = tuple(jnp.asarray(array) for array in problem[1:])

        def jax_gradient(x):
            return jax.grad(lambda y: jnp.sum(ctc_multi.ctc_posteriors(y, *jax_rest) ** 2))(x)

        expected = jax.grad(lambda x: jnp.vdot(jax_gradient(x), jnp.asarray(direction)))(jnp.asarray(problem.logits))
        np.testing.assert_allclose(posteriors_product, np.asarray(expected), **TOLERANCE["float64"])


def test_torch_second_derivatives_are_refused():
    """torch: the explicit gradient's own derivative was never recorded, so a second derivative
    must fail loudly, never come out as zero: under ``create_graph`` the gradient is tied to the
    logits through a node that raises, and torch.func refuses the autograd function outright."""
    torch = pytest.importorskip("torch")
    problem = random_problem(np.random.default_rng(92), 2, 5, 3, 2)
    rest = tuple(torch.as_tensor(array) for array in problem[1:])
    logits = torch.tensor(problem.logits, requires_grad=True)
    # A gradient penalty beside terms that do depend on the logits: the penalty's derivative
    # through the loss must not silently count as zero.
    loss = ctc_multi.ctc_loss(logits, *rest).sum()
    (gradient,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        (loss + (gradient**2).sum() + (logits**2).sum()).backward()
    # The gradient alone.
    (gradient,) = torch.autograd.grad(ctc_multi.ctc_loss(logits, *rest).sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(gradient.sum(), logits)

    def summed(x):
        return ctc_multi.ctc_loss(x, *rest).sum()

    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: torch.func.grad(summed)(x).sum())(torch.tensor(problem.logits))


def test_torch_func_vmap_over_the_logits_computes_what_a_loop_does():
    """torch.func.vmap over a stack of logits (each one problem of its own): the losses, the
    explicit gradients and the forward probabilities of a loop over the stack. Mapping the
    paddings or labels is refused: the input checks read their values."""
    torch = pytest.importorskip("torch")
    problem = random_problem(np.random.default_rng(96), 1, 6, 4, 2, frame_layout="middle", min_label_length=1)
    rest = tuple(torch.as_tensor(array) for array in problem[1:])
    stack = torch.as_tensor(np.random.default_rng(97).normal(size=(3,) + problem.logits.shape))
    for function in (ctc_multi.ctc_loss, ctc_multi.ctc_loss_and_grad, ctc_multi.ctc_loss_with_forward_probs):
        mapped = torch.func.vmap(lambda x: function(x, *rest))(stack)
        for index, logits in enumerate(stack):
            expected = function(logits, *rest)
            for got, want in zip(*((r,) if isinstance(r, torch.Tensor) else r for r in (mapped, expected))):
                np.testing.assert_allclose(got[index].numpy(), want.numpy(), **TOLERANCE["float64"])
    paddings = torch.as_tensor(np.stack([problem.logit_paddings] * 3))
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        torch.func.vmap(lambda p: ctc_multi.ctc_loss(stack[0], p, *rest[1:]))(paddings)


def test_torch_forward_mode_ad_carries_the_tangent():
    """Dual tensors (torch.autograd.forward_ad): the loss's tangent is the gradient times the
    logits' tangent. On a CPU the loop ran in NumPy on views of the tensors, which dropped the
    tangent: None, read by torch as a zero derivative (torch's own ops, as on CUDA, carried it)."""
    torch = pytest.importorskip("torch")
    from torch.autograd import forward_ad

    problem = random_problem(np.random.default_rng(98), 2, 6, 4, 2, min_label_length=1)  # right-padded, as torch_ctc_loss takes it
    logits, tangent = torch.tensor(problem.logits), torch.tensor(np.random.default_rng(99).normal(size=problem.logits.shape))
    rest = tuple(torch.as_tensor(array) for array in problem[1:])
    _, gradient = ctc_reference(*problem)
    expected = (gradient * tangent.numpy()).sum(axis=(1, 2))
    lengths = [tuple(int(n) for n in length) for length in lengths_of(problem)]
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(logits, tangent)
        losses = (
            ctc_multi.ctc_loss(dual, *rest),
            ctc_multi.ctc_loss_with_forward_probs(dual, *rest)[0],
            ctc_multi.torch_ctc_loss(torch.log_softmax(dual, -1).transpose(0, 1), rest[1], *lengths, reduction="none"),
        )
        for loss in losses:
            carried = forward_ad.unpack_dual(loss).tangent
            assert carried is not None
            np.testing.assert_allclose(carried.numpy(), expected, **TOLERANCE["float64"])
        carried = forward_ad.unpack_dual(ctc_multi.ctc_loss(dual, *rest, reduction="sum")).tangent
        np.testing.assert_allclose(carried.numpy(), expected.sum(), **TOLERANCE["float64"])
        label_lengths = np.maximum((problem.label_paddings == 0).sum(axis=1), 1)
        carried = forward_ad.unpack_dual(ctc_multi.ctc_loss(dual, *rest, reduction="mean")).tangent
        np.testing.assert_allclose(carried.numpy(), (expected / label_lengths).mean(), **TOLERANCE["float64"])
    # Dual logits that also require grad (a model's output, here through a weight): the loss's
    # Function has no jvp, so torch raised "You must implement the jvp function"; now the tangent
    # is carried and the reverse-mode gradient of the weight is the reference's.
    weight = torch.eye(logits.shape[-1], dtype=logits.dtype, requires_grad=True)
    with forward_ad.dual_level():
        loss = ctc_multi.ctc_loss(forward_ad.make_dual(logits, tangent) @ weight, *rest)
        np.testing.assert_allclose(forward_ad.unpack_dual(loss).tangent.detach().numpy(), expected, **TOLERANCE["float64"])
    loss.sum().backward()
    expected_weight_gradient = np.einsum("btk,btj->kj", problem.logits, gradient)
    np.testing.assert_allclose(weight.grad.numpy(), expected_weight_gradient, **TOLERANCE["gradient_float64"])


def test_torch_backward_of_the_sum_again_with_retain_graph():
    """torch: the gradient of ``loss.sum()`` (cotangent all ones) is handed back unscaled, the
    saved one itself. Backward passes over a retained graph must still agree with the reference
    whatever the cotangent, accumulate in ``.grad``, be tensors of their own, and, once the
    returned gradient has been changed in place, raise rather than return the changed numbers."""
    torch = pytest.importorskip("torch")
    problem = random_problem(np.random.default_rng(91), 3, 6, 4, 3, frame_layout="middle")
    _, expected = ctc_reference(*problem)
    weights = np.array([2.0, -0.5, 3.0])
    logits = torch.tensor(problem.logits, dtype=torch.float64, requires_grad=True)
    loss = ctc_multi.ctc_loss(logits, *(torch.as_tensor(array) for array in problem[1:]))

    (of_sum,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (weighted,) = torch.autograd.grad((loss * torch.as_tensor(weights)).sum(), logits, retain_graph=True)
    (again,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    tolerance = TOLERANCE["gradient_float64"]
    np.testing.assert_allclose(of_sum.numpy(), expected, **tolerance)
    np.testing.assert_allclose(weighted.numpy(), expected * weights[:, None, None], **tolerance)
    np.testing.assert_allclose(again.numpy(), expected, **tolerance)
    # Two results of backward passes over one graph are two tensors: `again` was `of_sum`
    # itself, so that adding one into the other changed both.
    again.add_(of_sum)
    np.testing.assert_allclose(of_sum.numpy(), expected, **tolerance)
    np.testing.assert_allclose(again.numpy(), 2 * expected, **tolerance)

    loss.sum().backward(retain_graph=True)
    loss.sum().backward(retain_graph=True)
    np.testing.assert_allclose(logits.grad.numpy(), 2 * expected, **tolerance)

    of_sum.mul_(5.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss.sum(), logits)


@pytest.mark.parametrize("hooks", ["save_on_cpu", "identity", "clone_on_pack", "view_on_unpack"])
def test_torch_changed_hand_back_raises_under_saved_tensor_hooks(hooks):
    """Under saved-tensor hooks torch does not check saved tensors' versions: a gradient handed
    back by the first backward and changed in place was returned by the second one (0.74 off,
    silently, under ``save_on_cpu``). It must raise as without hooks; unchanged, it agrees."""
    torch = pytest.importorskip("torch")
    make_hooks = {
        "save_on_cpu": torch.autograd.graph.save_on_cpu,
        "identity": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        "clone_on_pack": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t),
        "view_on_unpack": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.view_as(t)),
    }[hooks]
    problem = random_problem(np.random.default_rng(92), 3, 6, 4, 3)
    _, expected = ctc_reference(*problem)
    tolerance = TOLERANCE["gradient_float64"]
    for change in (False, True):
        logits = torch.tensor(problem.logits, dtype=torch.float64, requires_grad=True)
        with make_hooks():
            loss = ctc_multi.ctc_loss(logits, *(torch.as_tensor(array) for array in problem[1:])).sum()
        (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
        np.testing.assert_allclose(first.numpy(), expected, **tolerance)
        if not change:
            (second,) = torch.autograd.grad(loss, logits)
            np.testing.assert_allclose(second.numpy(), expected, **tolerance)
            continue
        first.clamp_(-0.01, 0.01)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, logits)


# ---------------------------------------------------------------------------------------------
# Property tests: random small problems, every backend against the reference
# ---------------------------------------------------------------------------------------------


def _loss_and_grad_function(xp):
    if xp.name == "jax":
        import jax

        # Every example has new shapes: one jit compile each costs less than eager dispatch.
        return jax.jit(ctc_multi.ctc_loss_and_grad, static_argnames="blank_id")
    return ctc_multi.ctc_loss_and_grad


def test_random_small_problems_match_reference(xp):
    function = _loss_and_grad_function(xp)

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(small_problems())
    def check(drawn):
        problem, blank_id = drawn
        arrays, held = to_backend(xp, problem)
        loss, grad = function(*arrays, blank_id=blank_id)
        xp.check_type(loss, grad)
        loss, grad = xp.to_numpy(loss), xp.to_numpy(grad)
        expected_loss, expected_grad = ctc_reference(*held, blank_id=blank_id)
        feasible = feasible_rows(held)
        assert np.array_equal(feasible, np.isfinite(expected_loss))
        np.testing.assert_allclose(loss[feasible], expected_loss[feasible], **TOLERANCE["float64"])
        np.testing.assert_allclose(grad[feasible], expected_grad[feasible], **TOLERANCE["gradient_float64"])
        assert_impossible(loss[~feasible])
        assert_gradient_structure(grad, held.logit_paddings, atol=TOLERANCE["gradient_float64"]["atol"])

    check()


def test_readmes_data_parallel_recipe_for_torchs_mean_over_uneven_shards():
    """README, Scaling beyond one device: with shards of 2 and 3 sequences on two ranks, each
    rank's ``(losses / label_lengths.clamp(min=1)).sum() * world_size / global_batch_size``,
    averaged over the ranks as DDP averages their gradients, is ``reduction="mean"`` of the
    whole batch, in value and in gradient; the local means averaged are not."""
    torch = pytest.importorskip("torch")
    problem = random_problem(np.random.default_rng(98), 5, 7, 4, 3, frame_layout="right")
    logits = torch.tensor(problem.logits, requires_grad=True)
    rest = [torch.as_tensor(array) for array in problem[1:]]

    def recipe(shard):
        losses = ctc_multi.ctc_loss(logits[shard], *(array[shard] for array in rest))
        label_lengths = (rest[2][shard] == 0).sum(dim=1)
        return (losses / label_lengths.clamp(min=1)).sum() * 2 / 5

    shards = (slice(0, 2), slice(2, 5))
    ranks_average = sum(recipe(shard) for shard in shards) / 2
    (gradient,) = torch.autograd.grad(ranks_average, logits)
    whole = ctc_multi.ctc_loss(logits, *rest, reduction="mean")
    (expected_gradient,) = torch.autograd.grad(whole, logits)
    np.testing.assert_allclose(ranks_average.item(), whole.item(), **TOLERANCE["float64"])
    np.testing.assert_allclose(gradient.numpy(), expected_gradient.numpy(), **TOLERANCE["float64"])
    local_means = sum(ctc_multi.ctc_loss(logits[s], *(a[s] for a in rest), reduction="mean") for s in shards) / 2
    assert abs(local_means.item() - whole.item()) > 1e-3


def test_float32_gradient_with_a_moderate_log_epsilon_and_padded_labels(xp):
    """float32, log_epsilon = -5, peaky logits and 20 padded labels behind 10: the states of the
    padded labels end far above the two end states, which lie more than 100 below log_epsilon.
    The ending occupancy took its largest value from log_epsilon there, so both end states'
    shares underflowed to 0 / 0: NaN in every gradient entry and posterior (or, one end state
    short of that, a wrong split between them). Now the float64 gradient's, within float32's
    accuracy."""
    rng = np.random.default_rng(0)
    T, K, labels, padded = 100, 8, 10, 20
    logits = rng.standard_normal((1, T, K)) * 5
    problem = Problem(
        logits, np.zeros((1, T)), rng.integers(1, K, (1, labels + padded)), (np.arange(labels + padded)[None] >= labels).astype(float)
    )
    expected_loss, expected_grad = ctc_multi.ctc_loss_and_grad(*problem, log_epsilon=-5.0)  # NumPy, float64
    expected_posteriors = ctc_multi.ctc_posteriors(*problem, log_epsilon=-5.0)
    arrays, _ = to_backend(xp, problem, "float32")
    loss, grad = (xp.to_numpy(r) for r in ctc_multi.ctc_loss_and_grad(*arrays, log_epsilon=-5.0))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-4)
    posteriors = xp.to_numpy(ctc_multi.ctc_posteriors(*arrays, log_epsilon=-5.0))
    np.testing.assert_allclose(posteriors, expected_posteriors, atol=1e-4)


def test_torch_three_backward_passes_through_a_view_of_the_leaf():
    """torch: the logits a view of the leaf (``x.view``, and torch_ctc_loss, which transposes
    its (T, B, C) input back): autograd may keep the gradient handed to the leaf as ``x.grad``
    and add the next one into it in place. Three backward passes over a retained graph give
    three times the reference's gradient; a third one raised "modified by an inplace operation"
    when the saved gradient itself was handed back."""
    torch = pytest.importorskip("torch")
    problem = random_problem(np.random.default_rng(99), 2, 8, 5, 3, frame_layout="right", min_label_length=1)
    _, expected = ctc_reference(*problem)
    rest = [torch.as_tensor(array) for array in problem[1:]]
    lengths = [torch.as_tensor((paddings == 0).sum(axis=1)) for paddings in (problem.logit_paddings, problem.label_paddings)]
    losses = {
        "view": lambda x: ctc_multi.ctc_loss(x.view(x.shape), *rest).sum(),
        "view, sum": lambda x: ctc_multi.ctc_loss(x.view(x.shape), *rest, reduction="sum"),
        "torch_ctc_loss": lambda x: ctc_multi.torch_ctc_loss(
            torch.log_softmax(x, dim=-1).transpose(0, 1), rest[1], *lengths, reduction="sum"
        ),
        "torch_ctc_loss of a leaf's view": lambda x: ctc_multi.torch_ctc_loss(x.transpose(0, 1), rest[1], *lengths, reduction="sum"),
    }
    log_probs = problem.logits - np.log(np.exp(problem.logits).sum(axis=-1, keepdims=True))  # the same gradient
    for name, loss_of in losses.items():
        logits = torch.tensor(log_probs if name.endswith("leaf's view") else problem.logits, requires_grad=True)
        loss = loss_of(logits)
        for _ in range(3):
            loss.backward(retain_graph=True)
        np.testing.assert_allclose(logits.grad.numpy(), 3 * expected, **TOLERANCE["gradient_float64"], err_msg=name)


@pytest.mark.parametrize("eager", [True, False], ids=["eager_under_compile", "traced"])
@pytest.mark.parametrize("case", ["view", "torch_ctc_loss"])
def test_torch_compile_of_a_view_and_of_torch_ctc_loss(case, eager):
    """torch.compile of a training step whose logits are a view (``x.view``; torch_ctc_loss
    transposes its input inside): the gradient is eager mode's, with ctc_multi run eagerly
    (the default) or traced (``EAGER_UNDER_TORCH_COMPILE = False``). Each in a fresh process,
    since an earlier compile in the same one can hide the failure (a view's base is unknown
    while dynamo traces; reading it failed the compile)."""
    pytest.importorskip("torch")
    script = f"""
import torch, ctc_multi, ctc_multi.backends.torch
ctc_multi.backends.torch.EAGER_UNDER_TORCH_COMPILE = {eager}
torch.manual_seed(0)
B, T, K, N = 2, 8, 5, 3
x0, w = torch.randn(B, T, K, dtype=torch.float64), torch.randn(K, K, dtype=torch.float64)
paddings, labels, label_paddings = torch.zeros(B, T), torch.randint(1, K, (B, N)), torch.zeros(B, N)
if {case!r} == "view":
    make, step = (lambda: x0.clone().reshape(-1)), (lambda z: ctc_multi.ctc_loss(z.view(B, T, K), paddings, labels, label_paddings).sum())
else:
    lengths = (torch.full((B,), T), torch.full((B,), N))
    make, step = (lambda: x0.clone().transpose(0, 1).contiguous()), (lambda z: ctc_multi.torch_ctc_loss((z @ w).log_softmax(-1), labels, *lengths))
x = make().requires_grad_()
torch.compile(step)(x).backward()
compiled = x.grad.clone()
x = make().requires_grad_()
step(x).backward()
print("max difference", float((compiled - x.grad).abs().max()))
"""
    result = run_in_fresh_python(script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("max difference")[-1]) < 1e-12


def test_torch_export_traces_ctc_multi():
    """``torch.export`` (strict: dynamo, one graph) of a module calling ctc_loss: traced, not run
    eagerly (the graph break that torch.compile takes raised there), and the exported program
    gives eager mode's loss on other values."""
    pytest.importorskip("torch")
    script = """
import torch, ctc_multi
class Loss(torch.nn.Module):
    def forward(self, x, paddings, labels, label_paddings):
        return ctc_multi.ctc_loss(x, paddings, labels, label_paddings)
rest = (torch.zeros(2, 5), torch.tensor([[1, 2], [3, 1]]), torch.zeros(2, 2))
exported = torch.export.export(Loss(), (torch.randn(2, 5, 4),) + rest, strict=True)
x = torch.randn(2, 5, 4)
print("max difference", float((exported.module()(x, *rest) - ctc_multi.ctc_loss(x, *rest)).abs().max()))
"""
    result = run_in_fresh_python(script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("max difference")[-1]) < 1e-5


def test_torch_compile_runs_ctc_multi_eagerly_for_any_number_of_frames():
    """A compiled training step over batches of 12 frame counts: no recompilation storm (the
    traced loop was compiled anew for each number of frames, 17 to 24 s each, and after eight
    torch gave up: here that limit raises), the gradient eager mode's. ``fullgraph=True``
    refuses the graph break with a message naming the switch that traces ctc_multi instead."""
    pytest.importorskip("torch")
    script = """
import torch, ctc_multi
torch._dynamo.config.fail_on_recompile_limit_hit = True
torch.manual_seed(0)
B, K, N = 3, 5, 3
w = torch.randn(K, K, dtype=torch.float64, requires_grad=True)
def step(x, paddings, labels, label_paddings):
    return ctc_multi.ctc_loss(x @ w, paddings, labels, label_paddings).sum()
compiled = torch.compile(step)
worst = 0.0
for T in range(10, 22):
    args = (torch.randn(B, T, K, dtype=torch.float64), torch.zeros(B, T), torch.randint(1, K, (B, N)), torch.zeros(B, N))
    compiled(*args).backward()
    got, w.grad = w.grad, None
    step(*args).backward()
    worst, w.grad = max(worst, float((got - w.grad).abs().max())), None
print("max difference", worst)
try:  # a function of its own: dynamo would reuse step's compiled code
    torch.compile(lambda x: ctc_multi.ctc_loss(x, *args[1:]).sum(), fullgraph=True)(args[0])
except Exception as error:
    print("fullgraph:", str(error).replace(chr(10), " "))
"""
    result = run_in_fresh_python(script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("max difference")[-1].split()[0]) < 1e-12
    assert "EAGER_UNDER_TORCH_COMPILE = False" in result.stdout.split("fullgraph:")[-1]


def test_the_gradient_where_both_end_states_lie_far_below_log_epsilon(xp):
    """log_epsilon = -5 and class 1 certain on every frame (logit 500): the paths that read
    labels 2 and 3 cost about 1000 nats, so after the last frame both end states lie ~1000
    below the path states' peak and far below log_epsilon. The ending occupancy must take its
    largest value from the two end states alone (mutation L24: from log_epsilon too, both
    shares underflowed: 0 / 0, NaN in every gradient entry and posterior). Checked against
    central differences of NumPy's float64 loss, which does not read the ending occupancy."""
    logits = np.zeros((1, 10, 4))
    logits[0, :, 1] = 500.0
    problem = Problem(logits, np.zeros((1, 10)), np.array([[1, 2, 3]]), np.zeros((1, 3)))
    arrays, _ = to_backend(xp, problem)
    loss, grad = (xp.to_numpy(r) for r in ctc_multi.ctc_loss_and_grad(*arrays, log_epsilon=-5.0))
    posteriors = xp.to_numpy(ctc_multi.ctc_posteriors(*arrays, log_epsilon=-5.0))
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(posteriors))
    step, numeric = 1e-5, np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (ctc_multi.ctc_loss(up, *problem[1:], log_epsilon=-5.0)[0] - ctc_multi.ctc_loss(down, *problem[1:], log_epsilon=-5.0)[0]) / (2 * step)
    assert 990 < loss[0] < 1010 and np.abs(numeric).max() > 0.5
    np.testing.assert_allclose(grad, numeric, atol=1e-4)
