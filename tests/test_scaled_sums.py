"""The scaled probability-space sum over paths (ctc_multi.lattice.ScaledSemiring).

JAX on a CPU sums float32 paths this way (each state a mantissa and its own power of two);
everything else sums in log space. The tests run the scaled semiring on NumPy and on JAX, so
both can be held against the log-space one and against the float64 reference, including the
cases a probability-space recursion renormalised by the frame would get wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

import ctc_multi
from ctc_multi.inputs import check_inputs
from ctc_multi.lattice import ScaledSemiring, forward_and_occupancy_by_shares, loss_from_final_state, run_recursion, sum_semiring
from ctc_multi.losses import _Problem
from helpers import Problem, assert_gradient_structure, assert_impossible, feasible_rows, random_problem, small_problems
from hypothesis import HealthCheck, given, settings
from reference import ctc_reference

from conftest import TOLERANCE, installed

NAMESPACES = ["numpy", "jax"]


def _namespace(name):
    if not installed(name):
        pytest.skip(f"{name} is not installed in this environment")
    if name == "jax":
        import jax.numpy as jnp

        return jnp
    return np


def _run(name, problem: Problem, *, scaled: bool, log_epsilon: float = -1e5, dtype: str = "float32"):
    """(B,) losses and (T, B, N + 1) occupancies by the chosen semiring, through the lattice as
    the losses build it, on NumPy or JAX (eagerly)."""
    xp = _namespace(name)
    arrays = (xp.asarray(problem.logits, dtype=getattr(xp, dtype)),) + tuple(xp.asarray(a) for a in problem[1:])
    inputs = check_inputs(*arrays, blank_id=0, log_epsilon=log_epsilon)
    run = _Problem.of(inputs)
    lattice = run.lattice(inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded, differentiable=False)
    final, _ = run_recursion(run.xp, run.backend.scan, lattice, semiring=sum_semiring(scaled))
    loss = loss_from_final_state(run.xp, lattice, final, run.index_dtype)
    _, occupancy = forward_and_occupancy_by_shares(run.xp, run.backend.scan, lattice, scaled=scaled)
    return np.asarray(loss), np.asarray(occupancy)


def _problems():
    rng = np.random.default_rng(7)
    yield "random", random_problem(rng, 4, 40, 6, 8, frame_layout="anywhere")
    yield "peaky", random_problem(rng, 3, 30, 5, 6, scale=40.0, frame_layout="middle")
    yield "repeats", random_problem(rng, 3, 25, 3, 8, repeat_probability=0.9)
    infeasible = random_problem(rng, 2, 6, 4, 5, min_label_length=5, repeat_probability=0.0)
    yield "too few frames", infeasible._replace(logit_paddings=np.concatenate([np.zeros((2, 3)), np.ones((2, 3))], axis=1))


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("case", [name for name, _ in _problems()])
def test_scaled_and_log_sums_agree(name, case):
    """float32 scaled against float64 log space. Where no path is possible, every path's weight
    holds powers of exp(log_epsilon), which float32 keeps to about 0.5% either way (log space:
    -1e5 plus a few; scaled: the fraction of -1e5 / log 2): there the losses are compared."""
    problem = dict(_problems())[case]
    scaled_loss, scaled_occupancy = _run(name, problem, scaled=True)
    log_loss, log_occupancy = _run("numpy", problem, scaled=False, dtype="float64")
    np.testing.assert_allclose(scaled_loss, log_loss, rtol=2e-6)
    if case != "too few frames":
        np.testing.assert_allclose(scaled_occupancy, log_occupancy, atol=2e-5)
    if case != "too few frames":
        expected, _ = ctc_reference(*problem)
        np.testing.assert_allclose(scaled_loss, expected, rtol=1e-5)


@pytest.mark.parametrize("name", NAMESPACES)
def test_a_custom_log_epsilon_weighs_a_forbidden_jump_alike(name):
    """A jump between repeated labels is weighted exp(log_epsilon) in log space; scaled, too."""
    problem = random_problem(np.random.default_rng(3), 3, 12, 3, 5, repeat_probability=1.0)
    scaled_loss, _ = _run(name, problem, scaled=True, log_epsilon=-3.0)
    log_loss, _ = _run(name, problem, scaled=False, log_epsilon=-3.0)
    np.testing.assert_allclose(scaled_loss, log_loss, rtol=2e-6)


def _the_lead_that_dies(frames_of_ones: int) -> Problem:
    """Labels (1, 2). Frames emit 1, 2, then ``frames_of_ones`` times 1, then 2 (each frame's
    class at logit 0, the others at -200). The path 1, 2 leads after two frames, e^200 ahead
    of every other, and then dies: from the last label it can emit neither 1 nor a blank
    cheaply. The path that stays on label 1 (one frame's e^-200) wins in the end; after
    frame 1 it is e^-200 behind the best state, where float32 probabilities scaled per frame
    underflow (below e^-103) and lose it."""
    classes = [1, 2] + [1] * frames_of_ones + [2]
    logits = np.full((1, len(classes), 4), -200.0)
    logits[0, np.arange(len(classes)), classes] = 0.0
    return Problem(logits, np.zeros((1, len(classes))), np.array([[1, 2]]), np.zeros((1, 2)))


@pytest.mark.parametrize("name", NAMESPACES)
def test_a_path_far_behind_the_frames_best_is_kept(name):
    problem = _the_lead_that_dies(frames_of_ones=4)
    expected, _ = ctc_reference(*problem)
    assert 190 < expected[0] < 210  # one frame of e^-200: the lagging path, not the leader's 4
    scaled_loss, _ = _run(name, problem, scaled=True)
    np.testing.assert_allclose(scaled_loss, expected, rtol=1e-6)


def test_jax_on_a_cpu_sums_float32_in_scaled_probabilities(jax_x64):
    import jax
    import jax.numpy as jnp

    from ctc_multi.backends import jax as jax_backend
    from ctc_multi.backends import numpy as numpy_backend

    assert jax_backend.scaled_sums(jnp.float32) == (jax.default_backend() == "cpu")
    assert not jax_backend.scaled_sums(jnp.float64) and not numpy_backend.scaled_sums(np.float32)
    problem = random_problem(np.random.default_rng(0), 2, 10, 4, 3)

    def traced(dtype):
        arrays = (jnp.asarray(problem.logits, dtype=dtype),) + tuple(jnp.asarray(a) for a in problem[1:])
        return str(jax.make_jaxpr(ctc_multi.ctc_loss)(*arrays))

    if jax.default_backend() == "cpu":
        assert "bitcast_convert_type" in traced(jnp.float32)
    assert "bitcast_convert_type" not in traced(jnp.float64)


def test_jax_float32_loss_and_gradient_match_the_reference_over_many_frames():
    """3000 frames: the powers of two run far beyond float32's exponent range (the loss is
    about 9000), and the loss keeps float32 accuracy."""
    if not installed("jax"):
        pytest.skip("jax is not installed in this environment")
    import jax
    import jax.numpy as jnp

    problem = random_problem(np.random.default_rng(5), 2, 3000, 20, 12, frame_layout="anywhere")
    arrays = (jnp.asarray(problem.logits, dtype=jnp.float32),) + tuple(jnp.asarray(a) for a in problem[1:])
    loss, grad = jax.jit(ctc_multi.ctc_loss_and_grad)(*arrays)
    expected_loss, expected_grad = ctc_reference(*problem)
    assert expected_loss.min() > 2000
    np.testing.assert_allclose(np.asarray(loss), expected_loss, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, atol=2e-4)


@pytest.mark.parametrize("name", NAMESPACES)
def test_nan_in_a_valid_frame_makes_that_loss_nan(name):
    """No NaN turns into a number on the way through a scaled state (its power of two is an
    integer, and a NaN's bits would read as one)."""
    problem = random_problem(np.random.default_rng(1), 2, 12, 4, 3)
    poisoned = problem.logits.copy()
    poisoned[0, 5, :] = np.nan
    with np.errstate(invalid="ignore"):  # NumPy's NaN warnings: the NaN is what is tested
        loss, _ = _run(name, problem._replace(logits=poisoned), scaled=True)
    clean, _ = _run(name, problem, scaled=True)
    assert np.isnan(loss[0])
    np.testing.assert_allclose(loss[1], clean[1], rtol=1e-6)


def test_the_scaled_semiring_keeps_no_history():
    problem = random_problem(np.random.default_rng(2), 1, 5, 3, 2)
    inputs = check_inputs(*problem, blank_id=0, log_epsilon=-1e5)
    run = _Problem.of(inputs)
    lattice = run.lattice(inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded)
    with pytest.raises(ValueError, match="log-space semirings only"):
        run_recursion(run.xp, run.backend.scan, lattice, semiring=ScaledSemiring, keep_history=True)


@pytest.mark.parametrize("name", NAMESPACES)
def test_peaky_occupancies_keep_float32_precision(name):
    """Logits x30: the paths that carry the occupancy sit hundreds of nats below the frame's
    best state, where a log value near -500 keeps about 3e-5 in float32; a scaled state keeps
    float32's relative precision at any depth (the log-space float32 recursion is off by 1e-5
    here, the scaled one by 2.8e-6, against float64)."""
    rng = np.random.default_rng(0)
    batch, frames, classes, num_labels = 4, 300, 16, 30
    logits = (30 * rng.standard_normal((batch, frames, classes))).astype(np.float32)
    problem = Problem(logits, np.zeros((batch, frames)), rng.integers(1, classes, (batch, num_labels)), np.zeros((batch, num_labels)))
    _, truth = _run("numpy", problem, scaled=False, dtype="float64")
    _, occupancy = _run(name, problem, scaled=True)
    np.testing.assert_allclose(occupancy, truth, atol=5e-6)


def _edge_problems():
    rng = np.random.default_rng(17)
    yield "one frame", random_problem(rng, 3, 1, 4, 1)
    yield "no label positions", Problem(rng.normal(size=(2, 4, 3)), np.array([[0, 0, 1, 1], [0, 0, 0, 0.0]]), np.zeros((2, 0), dtype=np.int64), np.zeros((2, 0)))
    every_label_padded = random_problem(rng, 2, 5, 4, 3)
    yield "every label padded", every_label_padded._replace(label_paddings=np.ones_like(every_label_padded.label_paddings))
    yield "two classes, blank last", random_problem(rng, 1, 5, 2, 2, blank_id=1)
    yield "a fully padded sequence", random_problem(rng, 2, 6, 4, 2)._replace(logit_paddings=np.array([[0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1.0]]), label_paddings=np.array([[0, 0], [1, 1.0]]))


@pytest.mark.parametrize("case", [name for name, _ in _edge_problems()])
def test_jax_float32_edge_shapes_against_the_reference(jax_x64, case):
    """The scaled sums (JAX, float32 on a CPU) on the shapes most tests run in float64 only."""
    import jax.numpy as jnp

    problem = dict(_edge_problems())[case]
    blank_id = 1 if "blank last" in case else 0
    arrays = (jnp.asarray(problem.logits, dtype=jnp.float32),) + tuple(jnp.asarray(a) for a in problem[1:])
    loss, grad = jax_x64.jit(ctc_multi.ctc_loss_and_grad, static_argnames="blank_id")(*arrays, blank_id=blank_id)
    held = (np.asarray(arrays[0], dtype=np.float64),) + tuple(problem[1:])
    expected_loss, expected_grad = ctc_reference(*held, blank_id=blank_id)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), expected_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-5)


def test_jax_float32_random_small_problems_match_the_reference(jax_x64):
    """tests/test_gradients.py's property test, in float32, where JAX on a CPU sums scaled."""
    import jax.numpy as jnp

    function = jax_x64.jit(ctc_multi.ctc_loss_and_grad, static_argnames="blank_id")

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(small_problems())
    def check(drawn):
        problem, blank_id = drawn
        logits = jnp.asarray(problem.logits, dtype=jnp.float32)
        loss, grad = function(logits, *(jnp.asarray(a) for a in problem[1:]), blank_id=blank_id)
        loss, grad = np.asarray(loss), np.asarray(grad)
        expected_loss, expected_grad = ctc_reference(np.asarray(logits, dtype=np.float64), *problem[1:], blank_id=blank_id)
        feasible = feasible_rows(problem)
        np.testing.assert_allclose(loss[feasible], expected_loss[feasible], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad[feasible], expected_grad[feasible], rtol=1e-4, atol=1e-5)
        assert_impossible(loss[~feasible])
        assert_gradient_structure(grad, problem.logit_paddings, atol=TOLERANCE["gradient_float32"]["atol"])

    check()


@pytest.mark.parametrize("log_epsilon", [-1e6, -1e20])
def test_an_impossible_alignment_costs_about_minus_log_epsilon(jax_x64, log_epsilon):
    """A scaled state's power of two has a floor (about -3.7e8 in log space); from
    ``SCALED_MIN_LOG_EPSILON`` down, log space runs, so an impossible alignment still costs about
    -log_epsilon (loss and gradient), as on every backend."""
    import jax.numpy as jnp

    from ctc_multi.lattice import SCALED_MIN_LOG_EPSILON

    assert log_epsilon >= SCALED_MIN_LOG_EPSILON or log_epsilon < -3.7e8  # one of each side
    logits = jnp.asarray(np.random.default_rng(22).normal(size=(2, 2, 4)), dtype=jnp.float32)
    labels, label_paddings = jnp.asarray([[1, 1], [1, 2]]), jnp.zeros((2, 2))  # [1, 1] needs 3 frames
    loss = ctc_multi.ctc_loss(logits, jnp.zeros((2, 2)), labels, label_paddings, log_epsilon=log_epsilon)
    loss_too, grad = ctc_multi.ctc_loss_and_grad(logits, jnp.zeros((2, 2)), labels, label_paddings, log_epsilon=log_epsilon)
    for value in (loss, loss_too):
        assert_impossible(np.asarray(value)[:1], log_epsilon)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_the_scaled_sums_run_down_to_scaled_min_log_epsilon_inclusive(jax_x64):
    """JAX float32 on a CPU sums scaled probabilities for any log_epsilon >= SCALED_MIN_LOG_EPSILON
    (-1e6), the boundary included. A feasible loss does not depend on log_epsilon there, bit for
    bit, so the loss at exactly -1e6 equals the one at -999999.9 (mutation S04, '>' for '>=':
    log space ran at -1e6, one float32 ulp off on row 2)."""
    import jax.numpy as jnp

    from ctc_multi.lattice import SCALED_MIN_LOG_EPSILON

    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(3, 50, 6)) * 3, dtype=jnp.float32)
    arrays = (logits, jnp.zeros((3, 50)), jnp.asarray(rng.integers(1, 6, (3, 8))), jnp.zeros((3, 8)))
    at_boundary = np.asarray(ctc_multi.ctc_loss(*arrays, log_epsilon=SCALED_MIN_LOG_EPSILON))
    above = np.asarray(ctc_multi.ctc_loss(*arrays, log_epsilon=SCALED_MIN_LOG_EPSILON + 0.1))
    np.testing.assert_array_equal(at_boundary, above)


def test_a_scaled_loss_beyond_the_floor_comes_back_as_the_cap(jax_x64):
    """README: the scaled sums' powers have a floor (2**-(2**29)), so a JAX float32 loss on a CPU
    beyond about 3.72e8 nats comes back as 3.72e8 = 2**29 log 2. 16000 frames on which the blank
    and the label have probability 0 (floored to -1e5 each: 1.6e9 nats): the cap, to float32's
    accuracy (mutation L08, no floor on the product's power: 3.7233e8, 2e5 nats past it)."""
    import math

    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("JAX sums scaled on a CPU only; elsewhere the loss is exact")
    frames = 16000
    logits = np.full((1, frames, 3), -np.inf, np.float32)
    logits[..., 2] = 0.0
    loss = np.asarray(ctc_multi.ctc_loss(jnp.asarray(logits), jnp.zeros((1, frames)), jnp.asarray([[1]]), jnp.zeros((1, 1))))
    np.testing.assert_allclose(loss, 2**29 * math.log(2), rtol=1e-6)
