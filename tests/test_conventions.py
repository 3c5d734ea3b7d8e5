"""torch's conventions on every backend: torch_ctc_loss, lengths_to_paddings, paddings_to_lengths.

``torch_ctc_loss`` is compared with ``torch.nn.functional.ctc_loss`` called with the very same
input form (padded or concatenated targets, lengths as arrays or tuples, batched or not), in
float64, values and gradients with respect to the log probabilities. Those tests skip when
torch is not installed, since torch is the reference; the inputs come from every backend
through the ``xp`` fixture. The length/padding helpers are checked by exact arithmetic.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import TOLERANCE, installed
from helpers import autodiff, compiled
from torch_reference import require_torch

import ctc_multi

# ---------------------------------------------------------------------------------------------
# lengths_to_paddings / paddings_to_lengths
# ---------------------------------------------------------------------------------------------

LENGTHS = np.array([3, 0, 5, 1])
PADDINGS = np.array([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=np.float32)


def test_lengths_and_paddings_round_trip(xp):
    paddings = ctc_multi.lengths_to_paddings(xp.asarray(LENGTHS), 5)
    xp.check_type(paddings)
    assert paddings.dtype == xp.dtype("float32")
    np.testing.assert_array_equal(xp.to_numpy(paddings), PADDINGS)
    lengths = ctc_multi.paddings_to_lengths(paddings)
    xp.check_type(lengths)
    np.testing.assert_array_equal(xp.to_numpy(lengths), LENGTHS)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_narrow_integer_lengths_against_a_longer_max_len(xp, dtype):
    """Lengths in a dtype that cannot hold max_len (int8 against 130 positions): neither the
    positions nor the range check may wrap around in that dtype."""
    paddings = ctc_multi.lengths_to_paddings(xp.asarray(np.array([120, 3, 0]), dtype=xp.dtype(dtype)), 300)
    np.testing.assert_array_equal(xp.to_numpy(paddings).sum(axis=1), [180, 297, 300])
    with pytest.raises(ValueError, match="lengths must lie in \\[0, max_len\\] = \\[0, 100\\]"):
        ctc_multi.lengths_to_paddings(xp.asarray(np.array([101, 3]), dtype=xp.dtype(dtype)), 100)


@pytest.mark.parametrize("dtype", ["float64", "int32", "bool"])
def test_lengths_to_paddings_in_a_chosen_dtype(xp, dtype):
    paddings = ctc_multi.lengths_to_paddings(xp.asarray(LENGTHS), 5, dtype=xp.dtype(dtype))
    assert paddings.dtype == xp.dtype(dtype)
    np.testing.assert_array_equal(xp.to_numpy(paddings), PADDINGS.astype(dtype))
    np.testing.assert_array_equal(xp.to_numpy(ctc_multi.paddings_to_lengths(paddings)), LENGTHS)


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_paddings_to_lengths_counts_valid_entries_anywhere(xp, dtype):
    """Padding in the middle (which ctc_loss allows) still counts as padding."""
    paddings = np.array([[0, 1, 0, 1, 0], [1, 1, 0, 0, 1]]).astype(dtype)
    lengths = ctc_multi.paddings_to_lengths(xp.asarray(paddings))
    xp.check_type(lengths)
    assert xp.to_numpy(lengths).dtype.kind == "i"
    np.testing.assert_array_equal(xp.to_numpy(lengths), [3, 2])


def test_lengths_as_lists_and_tuples_give_numpy():
    for lengths in (list(LENGTHS), tuple(int(n) for n in LENGTHS)):
        paddings = ctc_multi.lengths_to_paddings(lengths, 5)
        assert isinstance(paddings, np.ndarray)
        np.testing.assert_array_equal(paddings, PADDINGS)


def test_lengths_to_paddings_refuses_another_frameworks_dtype():
    """A dtype of another framework than the lengths' (crashed inside astype with torch's or
    NumPy's own message); NumPy's spellings of its dtypes (bool, "f4") are taken."""
    np.testing.assert_array_equal(ctc_multi.lengths_to_paddings(LENGTHS, 5, dtype=bool), PADDINGS.astype(bool))
    assert ctc_multi.lengths_to_paddings(LENGTHS, 5, dtype="f4").dtype == np.float32
    if installed("torch"):
        import torch

        with pytest.raises(ValueError, match="^dtype must be"):
            ctc_multi.lengths_to_paddings(torch.tensor(LENGTHS), 5, dtype=np.float64)
        with pytest.raises(ValueError, match="^dtype must be"):
            ctc_multi.lengths_to_paddings(LENGTHS, 5, dtype=torch.float64)
        for python_type, expected in ((float, torch.float64), (int, torch.int64), (bool, torch.bool)):  # taken before the check
            assert ctc_multi.lengths_to_paddings(torch.tensor(LENGTHS), 5, dtype=python_type).dtype == expected


def test_lengths_and_paddings_under_jax_jit(jax_x64):
    jax = jax_x64
    import jax.numpy as jnp

    to_paddings = jax.jit(lambda lengths: ctc_multi.lengths_to_paddings(lengths, 5))
    np.testing.assert_array_equal(np.asarray(to_paddings(jnp.asarray(LENGTHS))), PADDINGS)
    to_lengths = jax.jit(ctc_multi.paddings_to_lengths)
    np.testing.assert_array_equal(np.asarray(to_lengths(jnp.asarray(PADDINGS))), LENGTHS)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ctc_multi.lengths_to_paddings(np.array([[1, 2]]), 3), "lengths must be a \\(B,\\)-array"),
        (lambda: ctc_multi.lengths_to_paddings(np.array([1.0, 2.0]), 3), "lengths must hold integers"),
        (lambda: ctc_multi.lengths_to_paddings(np.array([1, 4]), 3), "lengths must lie in \\[0, max_len\\] = \\[0, 3\\]; got 4 at lengths\\[1\\]"),
        (lambda: ctc_multi.lengths_to_paddings(np.array([-1, 2]), 3), "lengths must lie in \\[0, max_len\\] = \\[0, 3\\]; got -1 at lengths\\[0\\]"),
        (lambda: ctc_multi.lengths_to_paddings(np.array([1, 2]), -3), "max_len"),
        (lambda: ctc_multi.lengths_to_paddings(np.array([1, 2]), 3.0), "max_len"),
        (lambda: ctc_multi.paddings_to_lengths(np.array([0, 1])), "paddings must be a \\(B, T\\)-array"),
        (lambda: ctc_multi.paddings_to_lengths(np.array([[0, 2]])), "paddings must contain only 0 .*; got 2 at paddings\\[0, 1\\]"),
        # A dtype that is not the namespace's, or not a real one, was passed on to astype:
        # "U3" returned strings ('Fal', 'Tru'), complex64 complex paddings.
        (lambda: ctc_multi.lengths_to_paddings(np.array([1, 2]), 3, dtype="U3"), "^dtype must be a bool, integer or real floating dtype"),
        (lambda: ctc_multi.lengths_to_paddings(np.array([1, 2]), 3, dtype=np.complex64), "^dtype must be"),
        (lambda: ctc_multi.lengths_to_paddings([[1, 2], [3]], 3), "^lengths must be an array, or a list or tuple of numbers nested to a rectangular shape"),
        (lambda: ctc_multi.paddings_to_lengths([[0, 1], [0]]), "^paddings must be an array"),
    ],
)
def test_helper_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# torch_ctc_loss against torch.nn.functional.ctc_loss, with the same input form
# ---------------------------------------------------------------------------------------------


def torch_style_problem(seed: int, *, infeasible: bool, blank: int = 0):
    """(T=9, B=4, C=5) float64 log probabilities, lengths, and targets in both of torch's forms.

    Sequence 1 has an empty target; with ``infeasible`` the last one has targets [c, c] and
    two frames (a blank must separate the repeats: three frames needed).
    """
    rng = np.random.default_rng(seed)
    frames, batch, num_classes, width = 9, 4, 5, 4
    logits = rng.normal(scale=2.0, size=(frames, batch, num_classes))
    log_probs = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    classes = [c for c in range(num_classes) if c != blank]
    padded = rng.choice(classes, size=(batch, width))  # values past each length are ignored
    target_lengths = np.array([3, 0, 4, 2])
    input_lengths = np.array([9, 6, 8, 7])
    padded[2, 1] = padded[2, 2]  # a repeat that needs a blank in between
    if infeasible:
        padded[3, :2] = classes[0]
        input_lengths[3] = 2
    concatenated = np.concatenate([padded[b, : target_lengths[b]] for b in range(batch)])
    return log_probs, padded, concatenated, input_lengths, target_lengths


def torch_expected(log_probs, targets, input_lengths, target_lengths, **options):
    """torch.nn.functional.ctc_loss and d sum(loss) / d log_probs, with the arguments in the same form."""
    torch = require_torch()

    def as_torch(x):
        return torch.as_tensor(x) if isinstance(x, np.ndarray) else x

    leaf = torch.tensor(log_probs, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.ctc_loss(leaf, as_torch(targets), as_torch(input_lengths), as_torch(target_lengths), **options)
    loss.sum().backward()
    return loss.detach().numpy(), leaf.grad.numpy()


def check_against_torch(xp, log_probs, targets, input_lengths, target_lengths, *, lengths_as: str, **options):
    """torch_ctc_loss on ``xp`` inputs against torch on the same form; lengths as arrays or tuples.

    Array lengths are arguments (traced under jax.jit); tuples stay Python values.
    """
    if lengths_as == "tuple":
        lengths = tuple(int(n) for n in np.atleast_1d(input_lengths)), tuple(int(n) for n in np.atleast_1d(target_lengths))
        expected = torch_expected(log_probs, targets, *lengths, **options)
        array_lengths = ()
    else:
        expected = torch_expected(log_probs, targets, np.asarray(input_lengths), np.asarray(target_lengths), **options)
        array_lengths = xp.asarray(np.asarray(input_lengths)), xp.asarray(np.asarray(target_lengths))

    def function(log_probs, targets, *traced_lengths):
        return ctc_multi.torch_ctc_loss(log_probs, targets, *(traced_lengths or lengths), **options)

    arrays = (xp.asarray(log_probs), xp.asarray(targets)) + array_lengths
    loss = compiled(xp, function)(*arrays)
    xp.check_type(loss)
    assert tuple(loss.shape) == np.shape(expected[0])
    np.testing.assert_allclose(xp.to_numpy(loss), expected[0], **TOLERANCE["torch_float64"])
    gradient = autodiff(xp, lambda *args: function(*args).sum(), *arrays)
    if gradient is not None:
        np.testing.assert_allclose(gradient, expected[1], **TOLERANCE["torch_float64"])


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("lengths_as", ["array", "tuple"])
@pytest.mark.parametrize("targets_form", ["padded", "concatenated"])
def test_torch_ctc_loss_input_forms_match_torch(xp, targets_form, lengths_as, zero_infinity):
    require_torch()
    # With zero_infinity=False torch gives inf (and NaN gradients) for an infeasible sequence.
    log_probs, padded, concatenated, input_lengths, target_lengths = torch_style_problem(1, infeasible=zero_infinity)
    targets = padded if targets_form == "padded" else concatenated
    options = dict(reduction="none", zero_infinity=zero_infinity)
    check_against_torch(xp, log_probs, targets, input_lengths, target_lengths, lengths_as=lengths_as, **options)


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize(("reduction", "targets_form"), [("mean", "padded"), ("sum", "padded"), ("mean", "concatenated")])
def test_torch_ctc_loss_reductions_match_torch(xp, reduction, targets_form, zero_infinity):
    """"mean" divides by the target lengths (sequence 1 has none: clamped to 1), then averages."""
    require_torch()
    log_probs, padded, concatenated, input_lengths, target_lengths = torch_style_problem(1, infeasible=zero_infinity)
    targets = padded if targets_form == "padded" else concatenated
    options = dict(reduction=reduction, zero_infinity=zero_infinity)
    check_against_torch(xp, log_probs, targets, input_lengths, target_lengths, lengths_as="array", **options)


def test_torch_ctc_loss_normalises_scores_that_are_not_log_probabilities(xp):
    """Log probabilities with a log prior subtracted: the loss and gradient are torch's for
    their log-softmax (documented), not torch's for the scores as given, which differ."""
    require_torch()
    log_probs, padded, _, input_lengths, target_lengths = torch_style_problem(3, infeasible=False)
    scores = log_probs - np.log([0.5, 0.2, 0.1, 0.1, 0.1])
    normalised = scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))
    expected = torch_expected(normalised, padded, input_lengths, target_lengths, reduction="none")
    as_given = torch_expected(scores, padded, input_lengths, target_lengths, reduction="none")
    assert np.max(np.abs(as_given[0] - expected[0])) > 1.0
    arrays = (xp.asarray(scores), xp.asarray(padded), xp.asarray(input_lengths), xp.asarray(target_lengths))
    loss = ctc_multi.torch_ctc_loss(*arrays, reduction="none")
    np.testing.assert_allclose(xp.to_numpy(loss), expected[0], **TOLERANCE["torch_float64"])
    gradient = autodiff(xp, lambda *args: ctc_multi.torch_ctc_loss(*args, reduction="none").sum(), *arrays)
    if gradient is not None:  # d loss / d scores through the log-softmax: torch's for the normalised scores
        np.testing.assert_allclose(gradient, expected[1], **TOLERANCE["torch_float64"])


@pytest.mark.parametrize("targets_form", ["padded", "concatenated"])
def test_torch_ctc_loss_matches_torch_with_another_blank(xp, targets_form):
    require_torch()
    log_probs, padded, concatenated, input_lengths, target_lengths = torch_style_problem(2, infeasible=False, blank=3)
    targets = padded if targets_form == "padded" else concatenated
    check_against_torch(xp, log_probs, targets, input_lengths, target_lengths, lengths_as="array", blank=3, reduction="none")


@pytest.mark.parametrize(
    ("lengths_as", "targets_shape", "reduction"),
    [
        ("array", "1-D", "none"),
        ("array", "(1, S)", "none"),
        ("tuple", "1-D", "none"),
        ("tuple", "(1, S)", "mean"),
        ("array", "1-D", "sum"),
        ("array", "(1, S)", "mean"),
    ],
)
def test_torch_ctc_loss_unbatched_matches_torch(xp, lengths_as, targets_shape, reduction):
    """(T, C) log probabilities, 0-d array (or one-entry tuple) lengths: a 0-d loss."""
    require_torch()
    log_probs, padded, _, input_lengths, target_lengths = torch_style_problem(3, infeasible=False)
    log_probs, input_length, target_length = log_probs[:, 2], input_lengths[2], target_lengths[2]
    targets = padded[2, :target_length] if targets_shape == "1-D" else padded[2:3]
    check_against_torch(xp, log_probs, targets, input_length, target_length, lengths_as=lengths_as, reduction=reduction)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "uint16"])
def test_torch_ctc_loss_with_narrow_integer_lengths(xp, dtype):
    """int8 input lengths beside T = 130 frames give torch's losses, as int64 ones do."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(130, 2, 5))
    log_probs = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    targets, input_lengths, target_lengths = np.array([[1, 2, 3], [2, 2, 4]]), np.array([120, 100]), np.array([3, 2])
    expected, _ = torch_expected(log_probs, targets, input_lengths, target_lengths, reduction="none")
    narrow = xp.dtype(dtype)
    loss = ctc_multi.torch_ctc_loss(
        xp.asarray(log_probs), xp.asarray(targets), xp.asarray(input_lengths, dtype=narrow), xp.asarray(target_lengths, dtype=narrow), reduction="none"
    )
    np.testing.assert_allclose(xp.to_numpy(loss), expected, **TOLERANCE["torch_float64"])


def test_infeasible_sequences_stay_finite_where_torch_gives_inf(xp):
    """The one documented difference: a large finite loss and a finite gradient instead of inf / NaN."""
    require_torch()
    log_probs, padded, _, input_lengths, target_lengths = torch_style_problem(4, infeasible=True)
    expected_loss, _ = torch_expected(log_probs, padded, input_lengths, target_lengths, reduction="none")
    assert np.isinf(expected_loss[3])
    arrays = xp.asarray(log_probs), xp.asarray(padded), xp.asarray(input_lengths), xp.asarray(target_lengths)
    loss = xp.to_numpy(compiled(xp, functools.partial(ctc_multi.torch_ctc_loss, reduction="none"))(*arrays))
    assert np.isfinite(loss[3]) and loss[3] > 1e4
    np.testing.assert_allclose(loss[:3], expected_loss[:3], **TOLERANCE["torch_float64"])
    gradient = autodiff(xp, lambda *args: ctc_multi.torch_ctc_loss(*args, reduction="none").sum(), *arrays)
    if gradient is not None:
        assert np.all(np.isfinite(gradient))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_torch_ctc_loss_gradcheck(reduction):
    """torch only: autograd.gradcheck in float64; log_probs need not be normalised (the log-softmax is inside)."""
    torch = require_torch()
    log_probs, padded, concatenated, input_lengths, target_lengths = torch_style_problem(5, infeasible=True)
    leaf = torch.tensor(log_probs[:5, :, :4] + 0.3, requires_grad=True)  # T=5, C=4, not normalised
    lengths = torch.as_tensor(np.minimum(input_lengths, 5)), torch.as_tensor(np.minimum(target_lengths, 2))
    targets = torch.as_tensor(padded % 4)
    targets[targets == 0] = 1

    def loss(x):
        return ctc_multi.torch_ctc_loss(x, targets, *lengths, reduction=reduction, zero_infinity=True)

    assert torch.autograd.gradcheck(loss, (leaf,), eps=1e-6, atol=1e-7)


def test_torch_ctc_loss_under_jax_jit_with_traced_lengths(jax_x64):
    """Traced lengths: the concatenated targets are spread over their total length (a static bound)."""
    require_torch()
    jax = jax_x64
    import jax.numpy as jnp

    log_probs, _, concatenated, input_lengths, target_lengths = torch_style_problem(6, infeasible=False)
    expected_loss, expected_grad = torch_expected(log_probs, concatenated, input_lengths, target_lengths)
    arrays = tuple(jnp.asarray(a) for a in (log_probs, concatenated, input_lengths, target_lengths))
    loss, gradient = jax.jit(jax.value_and_grad(ctc_multi.torch_ctc_loss))(*arrays)
    np.testing.assert_allclose(float(loss), expected_loss, **TOLERANCE["torch_float64"])
    np.testing.assert_allclose(np.asarray(gradient), expected_grad, **TOLERANCE["torch_float64"])


# ---------------------------------------------------------------------------------------------
# Errors name the argument
# ---------------------------------------------------------------------------------------------

_LOG_PROBS = np.log(np.full((6, 2, 4), 0.25))
_TARGETS = np.array([[1, 2, 0], [3, 0, 0]])


@pytest.mark.parametrize(
    ("arguments", "options", "message"),
    [
        ((_LOG_PROBS[0, 0], _TARGETS, [6, 6], [2, 1]), {}, "log_probs must be"),
        ((_LOG_PROBS[None], _TARGETS, [6, 6], [2, 1]), {}, "log_probs must be"),
        ((_LOG_PROBS, _TARGETS.astype(float), [6, 6], [2, 1]), {}, "targets must hold integers"),
        ((_LOG_PROBS, _TARGETS[None], [6, 6], [2, 1]), {}, "targets must be"),
        ((_LOG_PROBS, _TARGETS[:1], [6, 6], [2, 1]), {}, "targets must be a \\(B, S\\)-array"),
        ((_LOG_PROBS, _TARGETS, [6, 6], [4, 1]), {}, "targets of shape \\(2, 3\\) are narrower"),
        ((_LOG_PROBS, np.array([1, 2, 3, 3]), [6, 6], [2, 1]), {}, "sum\\(target_lengths\\) = 3"),
        ((_LOG_PROBS, _TARGETS, [6, 6, 6], [2, 1]), {}, "input_lengths must be a \\(B,\\)-array"),
        ((_LOG_PROBS, _TARGETS, [6, 7], [2, 1]), {}, "input_lengths must lie in \\[0, T\\] = \\[0, 6\\]; got 7 at input_lengths\\[1\\]"),
        ((_LOG_PROBS, _TARGETS, [6.0, 6.0], [2, 1]), {}, "input_lengths must hold integers"),
        ((_LOG_PROBS, _TARGETS, [6, 6], [2, -1]), {}, "target_lengths must be non-negative .*; got -1 at target_lengths\\[1\\]"),
        ((_LOG_PROBS, _TARGETS, [6, 6], 2), {}, "target_lengths must be a \\(B,\\)-array"),
        ((_LOG_PROBS, _TARGETS, [6, 6], [2, 1]), dict(blank=4), "blank must be an integer in \\[0, C\\)"),
        ((_LOG_PROBS, _TARGETS, [6, 6], [2, 1]), dict(blank=1.0), "blank must be an integer"),
        ((_LOG_PROBS, _TARGETS, [6, 6], [2, 1]), dict(reduction="avg"), "reduction must be one of"),
    ],
)
def test_torch_ctc_loss_errors_name_the_argument(arguments, options, message):
    with pytest.raises(ValueError, match=message):
        ctc_multi.torch_ctc_loss(*arguments, **options)


def test_torch_ctc_loss_takes_log_epsilon_for_torch_number_beyond_its_default(xp):
    """Two frames whose blank is certain, targets [1, 2]: every valid path costs 1.2e5 nats.
    At the default log_epsilon the loss follows a path only the stand-in for log 0 allows
    (documented, about 1e5); torch_ctc_loss had no log_epsilon, so torch's 120000 was out of
    reach through it."""
    log_probs = np.array([[[0.0, -6e4, -6e4]], [[0.0, -6e4, -6e4]]])
    arguments = (xp.asarray(log_probs), xp.asarray(np.array([[1, 2]])), [2], [2])
    at_default = float(xp.to_numpy(ctc_multi.torch_ctc_loss(*arguments, reduction="sum")))
    assert 99_990 < at_default < 100_000
    lower = ctc_multi.torch_ctc_loss(*arguments, reduction="sum", log_epsilon=-1e7)
    np.testing.assert_allclose(float(xp.to_numpy(lower)), 120_000.0, rtol=1e-12)
    if installed("torch"):
        expected = torch_expected(log_probs, np.array([[1, 2]]), np.array([2]), np.array([2]), reduction="sum")[0]
        np.testing.assert_allclose(float(xp.to_numpy(lower)), expected, rtol=1e-12)


def test_empty_lists_of_lengths_are_integers():
    """B = 0 with lengths as empty lists, which have no dtype (NumPy reads them as float64):
    taken as integers, not refused as "must hold integers"."""
    assert ctc_multi.lengths_to_paddings([], 5).shape == (0, 5)
    loss = ctc_multi.torch_ctc_loss(np.zeros((5, 0, 4), np.float32), np.zeros((0,), np.int64), [], [], reduction="sum")
    assert float(loss) == 0.0


def test_a_length_past_int64s_largest_is_quoted_as_given():
    """uint64 target_lengths of 2**63 + 1 turn negative in int64 and are refused; the message
    quotes the value given (mutation N19: the converted one, -9223372036854775807)."""
    lengths = np.array([2, 2**63 + 1], dtype=np.uint64)
    with pytest.raises(ValueError, match="target_lengths must be non-negative .*; got 9223372036854775809 at target_lengths\\[1\\]"):
        ctc_multi.torch_ctc_loss(_LOG_PROBS, _TARGETS, [6, 6], lengths)
