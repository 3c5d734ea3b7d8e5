"""Bad input gets a ValueError that names the argument, on every backend.

Each message must start with the name of the argument at fault (so "logits" does not pass for
"logit_paddings") and, for shapes, show what was given. Value checks (label range, right
padding, 0/1 paddings) run whenever the values are concrete; under jax.jit they cannot.
"""

from __future__ import annotations

import builtins
import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import Problem

import ctc_multi

B, T, K, N = 2, 4, 3, 2

GOOD = Problem(
    np.zeros((B, T, K)),
    np.array([[0, 0, 0, 1], [0, 0, 0, 0.0]]),
    np.array([[1, 2], [2, 0]]),
    np.array([[0, 0], [0, 1.0]]),
)


def check_raises(xp, problem: Problem, argument: str, *details: str, **options) -> None:
    """Both public functions raise a ValueError whose message starts with ``argument``."""
    arrays = (xp.asarray(problem.logits), xp.asarray(problem.logit_paddings), xp.asarray(problem.labels), xp.asarray(problem.label_paddings))
    pattern = rf"^{argument}\b" + "".join(rf"(?s:.*){re.escape(detail)}" for detail in details)
    for function in (ctc_multi.ctc_loss, ctc_multi.ctc_loss_with_forward_probs):
        with pytest.raises(ValueError, match=pattern):
            function(*arrays, **options)


def test_good_input_does_not_raise(xp):
    """The baseline every error case below changes in one way."""
    arrays = (xp.asarray(GOOD.logits), xp.asarray(GOOD.logit_paddings), xp.asarray(GOOD.labels), xp.asarray(GOOD.label_paddings))
    loss = ctc_multi.ctc_loss(*arrays, blank_id=0, log_epsilon=-1e5)
    xp.check_type(loss)


# --- shapes and ranks ---------------------------------------------------------------------------


def test_logits_of_wrong_rank(xp):
    check_raises(xp, GOOD._replace(logits=np.zeros((B, T))), "logits", "(2, 4)")
    check_raises(xp, GOOD._replace(logits=np.zeros((1, B, T, K))), "logits", "(1, 2, 4, 3)")


def test_labels_of_wrong_rank(xp):
    check_raises(xp, GOOD._replace(labels=np.array([1, 2])), "labels", "(2,)")


def test_batch_mismatch(xp):
    labels = np.ones((B + 1, N), dtype=np.int64)
    check_raises(xp, GOOD._replace(labels=labels, label_paddings=np.zeros((B + 1, N))), "labels", "(3, 2)")


def test_logit_paddings_shape_mismatch(xp):
    check_raises(xp, GOOD._replace(logit_paddings=np.zeros((B, T + 1))), "logit_paddings", "(2, 4)", "(2, 5)")
    check_raises(xp, GOOD._replace(logit_paddings=np.zeros((B, T, 1))), "logit_paddings", "(2, 4)", "(2, 4, 1)")


def test_label_paddings_shape_mismatch(xp):
    check_raises(xp, GOOD._replace(label_paddings=np.zeros((B, N + 1))), "label_paddings", "(2, 2)", "(2, 3)")
    check_raises(xp, GOOD._replace(label_paddings=np.zeros((B,))), "label_paddings", "(2, 2)", "(2,)")


def test_no_classes(xp):
    check_raises(xp, GOOD._replace(logits=np.zeros((B, T, 0))), "logits", "(2, 4, 0)")


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("blank_id", [-1, K, K + 5])
def test_blank_id_outside_the_classes(xp, blank_id):
    check_raises(xp, GOOD, "blank_id", str(blank_id), blank_id=blank_id)


@pytest.mark.parametrize("blank_id", [1.0, "0", None, True, np.array(1.0)], ids=["float", "str", "None", "bool", "float_array"])
def test_blank_id_not_an_integer(xp, blank_id):
    check_raises(xp, GOOD, "blank_id", blank_id=blank_id)


@pytest.mark.parametrize("log_epsilon", [float("nan"), float("inf"), float("-inf"), 0.0, 1e5, "big", "-7", True])
def test_log_epsilon_not_finite_and_negative(xp, log_epsilon):
    check_raises(xp, GOOD, "log_epsilon", log_epsilon=log_epsilon)


def test_log_epsilon_beyond_the_compute_dtype(xp):
    """float32 logits: a log_epsilon that float32 cannot hold (or whose sums it cannot) is refused,
    where it would have turned every output into NaN; one within float32's range works."""
    logits = GOOD.logits.astype(np.float32)
    check_raises(xp, GOOD._replace(logits=logits), "log_epsilon", "compute dtype", log_epsilon=-1e300)
    check_raises(xp, GOOD._replace(logits=logits), "log_epsilon", "compute dtype", log_epsilon=-3e38)
    arrays = (xp.asarray(logits), xp.asarray(GOOD.logit_paddings), xp.asarray(GOOD.labels), xp.asarray(GOOD.label_paddings))
    for output in ctc_multi.ctc_loss_with_forward_probs(*arrays, log_epsilon=-1e38):
        assert np.all(np.isfinite(xp.to_numpy(output)))


def test_paddings_of_strings(xp):
    """Strings that look like 0 and 1 are not paddings, whichever framework the logits come from."""
    arrays = (xp.asarray(GOOD.logits), GOOD.logit_paddings.astype(str), xp.asarray(GOOD.labels), xp.asarray(GOOD.label_paddings))
    with pytest.raises(ValueError, match="^logit_paddings"):
        ctc_multi.ctc_loss(*arrays)


def test_ragged_lists_name_their_argument(xp):
    """Ragged nested lists gave NumPy's message (logits) or "must be an array, a list or a
    tuple; got list" (labels, which was one)."""
    with pytest.raises(ValueError, match="^logits must be an array, or a list or tuple of numbers nested to a rectangular shape"):
        ctc_multi.ctc_loss([[[0.0, 1.0]], [[0.0]]], GOOD.logit_paddings, GOOD.labels, GOOD.label_paddings)
    arrays = (xp.asarray(GOOD.logits), xp.asarray(GOOD.logit_paddings), [[1, 2], [2]], xp.asarray(GOOD.label_paddings))
    with pytest.raises(ValueError, match="^labels must be an array, or a list or tuple of numbers nested to a rectangular shape"):
        ctc_multi.ctc_loss(*arrays)


def test_an_argument_the_logits_device_cannot_hold():
    """array_api_strict's device without float64: float64 paddings beside its logits were put
    on the default device (an error about mixing devices that the library had caused)."""
    xps = pytest.importorskip("array_api_strict")
    try:
        device = xps.Device("no_float64")
    except Exception:
        pytest.skip("this array_api_strict has no device without float64")
    logits = xps.asarray(GOOD.logits.astype(np.float32), device=device)
    with pytest.raises(ValueError, match="^logit_paddings of dtype float64 cannot be put on the logits' device"):
        ctc_multi.ctc_loss(logits, GOOD.logit_paddings, GOOD.labels, GOOD.label_paddings)


@pytest.mark.parametrize("zero_infinity", ["False", 1, None])
def test_zero_infinity_not_a_bool(xp, zero_infinity):
    arrays = (xp.asarray(GOOD.logits), xp.asarray(GOOD.logit_paddings), xp.asarray(GOOD.labels), xp.asarray(GOOD.label_paddings))
    with pytest.raises(ValueError, match="^zero_infinity must be True or False"):
        ctc_multi.ctc_loss(*arrays, zero_infinity=zero_infinity)


def test_zero_infinity_as_a_bool_array_and_the_static_arguments_under_jit(jax_x64):
    """A 0-d bool array with a value (jnp.bool_(True), a torch bool tensor) counts as the bool
    it holds, as np.bool_ does (it was refused). Traced under jax.jit, zero_infinity was refused
    as "must be True or False; got JitTracer(bool[])" although it held True, and log_epsilon
    without a word on static arguments: both now say they must be static there."""
    jnp = jax_x64.numpy
    arrays = (jnp.asarray(GOOD.logits), GOOD.logit_paddings, GOOD.labels, GOOD.label_paddings)
    expected = np.asarray(ctc_multi.ctc_loss(*arrays, zero_infinity=True))
    np.testing.assert_array_equal(np.asarray(ctc_multi.ctc_loss(*arrays, zero_infinity=jnp.bool_(True))), expected)
    with pytest.raises(ValueError, match="^zero_infinity must be True or False"):
        ctc_multi.ctc_loss(*arrays, zero_infinity=jnp.array([True, False]))
    with pytest.raises(ValueError, match="^zero_infinity must be a static True or False"):
        jax_x64.jit(ctc_multi.ctc_loss)(*arrays, zero_infinity=True)
    with pytest.raises(ValueError, match=r"^log_epsilon must be a Python number \(a static one under jax.jit\)"):
        jax_x64.jit(ctc_multi.ctc_loss)(*arrays, log_epsilon=-1e5)


# --- dtypes -------------------------------------------------------------------------------------


def test_labels_not_integers(xp):
    check_raises(xp, GOOD._replace(labels=GOOD.labels.astype(np.float64)), "labels", "float")
    check_raises(xp, GOOD._replace(labels=GOOD.labels != 0), "labels", "bool")


def test_logits_not_floating(xp):
    check_raises(xp, GOOD._replace(logits=np.zeros((B, T, K), dtype=np.int64)), "logits", "int")
    check_raises(xp, GOOD._replace(logits=np.zeros((B, T, K), dtype=bool)), "logits", "bool")


# --- values, checked whenever they are concrete ---------------------------------------------------


@pytest.mark.parametrize("bad_label", [-1, K, 100])
def test_labels_outside_the_classes_where_not_padded(xp, bad_label):
    labels = GOOD.labels.copy()
    labels[1, 0] = bad_label
    check_raises(xp, GOOD._replace(labels=labels), "labels", f"[0, {K})", f"got {bad_label} at labels[1, 0]")


def test_label_paddings_not_right_padded(xp):
    check_raises(xp, GOOD._replace(label_paddings=np.array([[1, 0], [0, 0.0]])), "label_paddings", "right", "a 0 after a 1 at label_paddings[0, 1]")
    check_raises(xp, GOOD._replace(label_paddings=np.array([[0, 0], [1, 0.0]])), "label_paddings", "right", "at label_paddings[1, 1]")


@pytest.mark.parametrize("argument", ["logit_paddings", "label_paddings"])
@pytest.mark.parametrize("bad_value", [0.5, 2.0, -1.0, float("nan")])
def test_paddings_not_zero_or_one(xp, argument, bad_value):
    paddings = getattr(GOOD, argument).copy()
    paddings[1, 0] = bad_value
    check_raises(xp, GOOD._replace(**{argument: paddings}), argument, f"got {bad_value!r} at {argument}[1, 0]")


@pytest.mark.parametrize("argument", ["logit_paddings", "label_paddings"])
def test_integer_paddings_not_zero_or_one(xp, argument):
    paddings = getattr(GOOD, argument).astype(np.int64)
    paddings[0, 1] = 2
    check_raises(xp, GOOD._replace(**{argument: paddings}), argument, f"got 2 at {argument}[0, 1]")


# --- under jax.jit ------------------------------------------------------------------------------


def test_traced_blank_id_under_jit(jax_x64):
    """blank_id picks lattice states, so it must be static under jit: a traced one is refused."""
    jax = jax_x64
    arrays = [jax.numpy.asarray(a) for a in GOOD]
    with pytest.raises(ValueError, match=r"^blank_id\b"):
        jax.jit(lambda blank_id: ctc_multi.ctc_loss(*arrays, blank_id=blank_id))(0)


def test_shape_checks_still_run_under_jit(jax_x64):
    jax = jax_x64
    bad = GOOD._replace(logit_paddings=np.zeros((B, T + 1)))
    with pytest.raises(ValueError, match=r"^logit_paddings\b"):
        jax.jit(ctc_multi.ctc_loss)(*[jax.numpy.asarray(a) for a in bad])


@pytest.mark.parametrize(
    "bad",
    [
        GOOD._replace(label_paddings=np.array([[1, 0], [0, 2.0]])),
        GOOD._replace(logit_paddings=np.array([[0, 0.5, 0, 1], [0, 0, 0, 0.0]])),
        GOOD._replace(labels=np.array([[1, 7], [2, 0]])),
    ],
    ids=["label_paddings", "logit_paddings", "labels"],
)
def test_value_checks_cannot_run_under_jit(jax_x64, bad):
    """Documented limitation: traced values cannot be inspected, so jit runs without raising.

    The same input raises outside jit (the tests above); inside, the result is whatever the
    recursion makes of it, never an exception.
    """
    jax = jax_x64
    arrays = [jax.numpy.asarray(a) for a in bad]
    with pytest.raises(ValueError):
        ctc_multi.ctc_loss(*arrays)
    loss = jax.jit(ctc_multi.ctc_loss)(*arrays)
    assert loss.shape == (B,)


@pytest.mark.parametrize("label", [7, -1])
def test_an_out_of_range_label_under_jit_is_impossible_everywhere(jax_x64, label):
    """Under jit an unpadded label outside [0, K) cannot be refused; it makes its sequence
    impossible, and every function says so alike: a loss about -log_epsilon (0 with
    zero_infinity), no alignment (token -1, score -inf on valid frames), posteriors 0. The other sequence is
    untouched."""
    jax = jax_x64
    labels = GOOD.labels.copy()
    labels[0, 0] = label
    arrays = [jax.numpy.asarray(a) for a in GOOD._replace(labels=labels)]
    good = [jax.numpy.asarray(a) for a in GOOD]
    loss = np.asarray(jax.jit(ctc_multi.ctc_loss)(*arrays))
    assert loss[0] > 1e4 and loss[1] == pytest.approx(float(ctc_multi.ctc_loss(*good)[1]))
    assert np.asarray(jax.jit(functools.partial(ctc_multi.ctc_loss, zero_infinity=True))(*arrays))[0] == 0
    tokens, scores = jax.jit(ctc_multi.forced_align)(*arrays)
    valid = GOOD.logit_paddings[0] == 0
    assert np.all(np.asarray(tokens)[0] == -1) and np.all(np.asarray(scores)[0][valid] == -np.inf)
    np.testing.assert_array_equal(np.asarray(tokens)[1], np.asarray(ctc_multi.forced_align(*good)[0])[1])
    posteriors = np.asarray(jax.jit(ctc_multi.ctc_posteriors)(*arrays))
    assert np.all(posteriors[0] == 0) and posteriors[1].sum() > 0
    # Clipped into [0, K), -1 lands on the blank's class 0: still impossible, not a label equal
    # to the blank (whose loss may be negative), even where a log_epsilon near 0 makes the
    # impossible sequence's sum pass one.
    near_zero = jax.jit(functools.partial(ctc_multi.ctc_loss, log_epsilon=-0.1))(*arrays)
    assert np.asarray(near_zero)[0] >= 0


WIDE_INTEGERS_CHILD = """
import jax.numpy as jnp, numpy as np, torch, ctc_multi
assert not jax.config.jax_enable_x64
logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 3)).astype(np.float32))
pads, label_pads = np.zeros((1, 4)), np.zeros((1, 1))
calls = {
    "numpy labels 2**32 + 1": lambda: ctc_multi.ctc_loss(logits, pads, np.array([[2**32 + 1]]), label_pads),
    "torch labels 2**32 + 1": lambda: ctc_multi.ctc_loss(logits, pads, torch.tensor([[2**32 + 1]]), label_pads),
    "numpy labels 2**32": lambda: ctc_multi.ctc_loss(logits, pads, np.array([[2**32]]), label_pads),
    "uint64 labels 2**63 + 1": lambda: ctc_multi.ctc_loss(logits, pads, np.array([[2**63 + 1]], dtype=np.uint64), label_pads),
    "logit_paddings 2**32": lambda: ctc_multi.ctc_loss(logits, np.array([[0, 0, 0, 2**32]]), np.array([[1]]), label_pads),
    "target_lengths 2**32 + 1": lambda: ctc_multi.torch_ctc_loss(jnp.swapaxes(logits, 0, 1), np.array([[1]]), [4], np.array([2**32 + 1])),
}
for name, call in calls.items():
    try:
        print(name, "->", call())
    except ValueError as error:
        print(name, "-> ValueError:", error)
print("int64 label 1 ->", ctc_multi.ctc_loss(logits, pads, np.array([[1]], dtype=np.int64), label_pads))
"""


def test_wide_integers_beside_jax_logits_without_x64_are_checked_not_wrapped():
    """Without jax_enable_x64, JAX holds integers in int32: int64 labels, paddings or lengths
    of 2**32 + 1 beside JAX logits were read as 1, a valid label (the loss of label 1, no
    error), and 2**32 as the blank. Now they are refused as out of range, as NumPy's path
    refuses them. (A fresh process: the test session enables x64.)"""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-c", "import jax\n" + WIDE_INTEGERS_CHILD], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    for line in lines[:-1]:
        assert "-> ValueError:" in line, line
    assert "labels must lie in [0, K)" in lines[0] and "logit_paddings must contain only 0" in lines[4]
    # Refused as a length, not quoted clipped ("narrower than the longest target_lengths, 2147483647"):
    # the clipped value is quoted as a bound
    assert "target_lengths must be non-negative" in lines[5] and "got 2147483647 or beyond (int32's limit)" in lines[5], lines[5]
    assert lines[-1].startswith("int64 label 1 -> [")  # an int64 array in range is taken as it is


def test_the_first_offending_label_is_the_one_quoted(xp):
    """Two labels outside [0, K): the message quotes the first in row-major order, as
    first_offender's docstring says (mutation N15: first_true returned the last, 'got 9 at
    labels[1, 1]')."""
    labels = np.array([[5, 1], [2, 9]])
    check_raises(xp, GOOD._replace(labels=labels, label_paddings=np.zeros((2, 2))), "labels", "got 5 at labels[0, 0]")


def test_a_label_at_its_dtypes_lowest_value_is_quoted_as_a_bound(xp):
    """first_offender writes an integer at either limit of its dtype as a bound (it may stand for
    a wider one clipped on the way in): int8 -128 is 'got -128 or beyond (int8's limit)'
    (mutation N17: only the largest value was written so, 'got -128 at labels[0, 0]')."""
    labels = np.array([[-128, 1], [2, 0]], dtype=np.int8)
    check_raises(xp, GOOD._replace(labels=labels), "labels", "got -128 or beyond (int8's limit) at labels[0, 0]")


def test_a_label_past_int64s_largest_is_quoted_as_given(xp):
    """A uint64 label of 2**63 + 1 turns negative in int64 and is refused; the message quotes the
    value given (mutation N18: the converted one, 'got -9223372036854775807')."""
    labels = np.array([[2**63 + 1, 1], [2, 0]], dtype=np.uint64)  # a NumPy array beside any backend's logits
    with pytest.raises(ValueError, match=re.escape("got 9223372036854775809 at labels[0, 0]")):
        ctc_multi.ctc_loss(xp.asarray(GOOD.logits), xp.asarray(GOOD.logit_paddings), labels, xp.asarray(GOOD.label_paddings))


def test_the_first_argument_at_fault_is_the_one_named(xp):
    """Every value wrong at once: the message names logit_paddings, then (with those right)
    label_paddings' values, then labels, then label_paddings' order, in that order, as the checks
    one by one did before one compiled call found whether any fails; and a dtype that
    label_paddings may not have comes after logit_paddings' values (a review found it first)."""
    bad_logit_paddings = np.array([[0, 0, 2, 1], [0, 0, 0, 0.0]])
    bad_label_paddings = np.array([[0, 0.5], [0, 1.0]])
    bad_labels = np.array([[1, 7], [2, 0]])
    not_right_padded = np.array([[1, 0], [0, 0.0]])
    every = GOOD._replace(logit_paddings=bad_logit_paddings, label_paddings=bad_label_paddings, labels=bad_labels)
    check_raises(xp, every, "logit_paddings", "got 2.0 at logit_paddings[0, 2]")
    check_raises(xp, every._replace(logit_paddings=GOOD.logit_paddings), "label_paddings", "got 0.5 at label_paddings[0, 1]")
    check_raises(xp, GOOD._replace(labels=bad_labels, label_paddings=not_right_padded), "labels", "got 7 at labels[0, 1]")
    # a dtype that paddings may not have comes after the values of the paddings before them
    complex_paddings = np.zeros((B, N), dtype=np.complex128)
    check_raises(xp, GOOD._replace(logit_paddings=bad_logit_paddings, label_paddings=complex_paddings), "logit_paddings", "got 2.0")
    check_raises(xp, GOOD._replace(label_paddings=complex_paddings), "label_paddings", "dtype")


def test_valid_values_are_read_once(xp, monkeypatch):
    """On valid inputs (0/1 paddings as numbers, more than one label) the value checks read one
    value, whether anything is wrong, not one per check (four: both paddings, the labels' range,
    the right padding): on CUDA each read waits for the device, and under JAX outside jit each
    check dispatched its ops one by one (0.67 ms of a 1.1 ms call on `small`)."""
    from ctc_multi import inputs

    reads = []

    class BoolType(type):
        def __instancecheck__(cls, value):  # isinstance(x, bool) in the module stays as it was
            return isinstance(value, builtins.bool)

    class CountedBool(metaclass=BoolType):
        def __new__(cls, value):
            reads.append(value)
            return builtins.bool(value)

    monkeypatch.setattr(inputs, "bool", CountedBool, raising=False)  # found before the builtin
    arrays = (xp.asarray(GOOD.logits), xp.asarray(GOOD.logit_paddings), xp.asarray(GOOD.labels), xp.asarray(GOOD.label_paddings))
    checked = inputs.check_inputs(*arrays, blank_id=0, log_epsilon=-1e5)
    assert len(reads) == 1
    np.testing.assert_array_equal(np.asarray(inputs.as_numpy(checked.logit_padded)), GOOD.logit_paddings != 0)
    np.testing.assert_array_equal(np.asarray(inputs.as_numpy(checked.label_padded)), GOOD.label_paddings != 0)
