"""The JAX path under jax.jit, jax.vmap and jax.grad; torch autograd through the torch path.

Gradients are checked against the reference's alpha-beta gradient (float64). Each test skips
cleanly when its framework is not installed.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from conftest import TOLERANCE, installed
from helpers import assert_impossible, assert_log_probs_close, poison_padded_frames, random_problem, reference_forward_probs, run_in_fresh_python
from reference import ctc_reference

import ctc_multi

PROBLEM_OPTIONS = dict(frame_layout="middle", pad_label=-1, repeat_probability=0.5, blank_id=2)
BLANK_ID = PROBLEM_OPTIONS["blank_id"]


def problem_for(seed: int, B: int = 3, T: int = 7, K: int = 4, N: int = 3):
    return random_problem(np.random.default_rng(seed), B, T, K, N, **PROBLEM_OPTIONS)


def loss_of(function):
    """ctc_loss, or the loss out of ctc_loss_with_forward_probs."""
    if function is ctc_multi.ctc_loss:
        return function
    return lambda *args, **options: function(*args, **options)[0]


FUNCTIONS = [ctc_multi.ctc_loss, ctc_multi.ctc_loss_with_forward_probs]
FUNCTION_IDS = ["ctc_loss", "ctc_loss_with_forward_probs"]


def test_jit(jax_x64):
    jax = jax_x64
    problem = problem_for(200)
    arrays = [jax.numpy.asarray(a) for a in problem]
    loss, blank, nonblank = jax.jit(lambda *a: ctc_multi.ctc_loss_with_forward_probs(*a, blank_id=BLANK_ID))(*arrays)
    loss_only = jax.jit(lambda *a: ctc_multi.ctc_loss(*a, blank_id=BLANK_ID))(*arrays)
    for result in (loss, blank, nonblank, loss_only):
        assert isinstance(result, jax.Array) and result.dtype == np.float64
    expected = ctc_reference(*problem, blank_id=BLANK_ID)[0]
    np.testing.assert_allclose(np.asarray(loss), expected, **TOLERANCE["float64"])
    np.testing.assert_allclose(np.asarray(loss_only), expected, **TOLERANCE["float64"])
    expected_blank, expected_nonblank = reference_forward_probs(*problem, blank_id=BLANK_ID)
    assert_log_probs_close(np.asarray(blank), expected_blank, **TOLERANCE["float64"])
    assert_log_probs_close(np.asarray(nonblank), expected_nonblank, **TOLERANCE["float64"])


def test_jit_with_static_options(jax_x64):
    """blank_id and log_epsilon as static arguments of jax.jit, float32 logits."""
    jax = jax_x64
    problem = problem_for(201)
    function = jax.jit(ctc_multi.ctc_loss, static_argnames=("blank_id", "log_epsilon"))
    logits = jax.numpy.asarray(problem.logits, dtype=jax.numpy.float32)
    loss = function(logits, *problem[1:], blank_id=BLANK_ID, log_epsilon=-1e4)
    assert loss.dtype == np.float32
    held = problem._replace(logits=np.asarray(logits, dtype=np.float64))
    np.testing.assert_allclose(np.asarray(loss), ctc_reference(*held, blank_id=BLANK_ID)[0], **TOLERANCE["float32"])


def test_vmap_over_a_leading_axis(jax_x64):
    jax = jax_x64
    problems = [problem_for(seed) for seed in (202, 203)]
    stacked = [jax.numpy.asarray(np.stack(parts)) for parts in zip(*problems)]
    loss, blank, nonblank = jax.vmap(lambda *a: ctc_multi.ctc_loss_with_forward_probs(*a, blank_id=BLANK_ID))(*stacked)
    loss_only = jax.vmap(lambda *a: ctc_multi.ctc_loss(*a, blank_id=BLANK_ID))(*stacked)
    B, T, _, N = (3, 7, 4, 3)
    assert loss.shape == (2, B) and loss_only.shape == (2, B)
    assert blank.shape == (2, T, B, N + 1) and nonblank.shape == (2, T, B, N)
    for v, problem in enumerate(problems):
        expected = ctc_reference(*problem, blank_id=BLANK_ID)[0]
        np.testing.assert_allclose(np.asarray(loss[v]), expected, **TOLERANCE["float64"])
        np.testing.assert_allclose(np.asarray(loss_only[v]), expected, **TOLERANCE["float64"])
        expected_blank, expected_nonblank = reference_forward_probs(*problem, blank_id=BLANK_ID)
        assert_log_probs_close(np.asarray(blank[v]), expected_blank, **TOLERANCE["float64"])
        assert_log_probs_close(np.asarray(nonblank[v]), expected_nonblank, **TOLERANCE["float64"])


def test_vmap_over_labels_or_paddings_beside_unbatched_logits(jax_x64):
    """One utterance's logits scored against several candidate transcripts: vmap over the
    labels (or the paddings) alone crashed outside jit (the vmapped argument's device is
    unknown, and it was moved through NumPy)."""
    jax = jax_x64
    problem = problem_for(204)
    candidates = [np.where(problem_for(seed).labels < 0, 1, problem_for(seed).labels) for seed in (205, 206)]  # valid where 204 reads them
    logits = jax.numpy.asarray(problem.logits)
    over_labels = jax.vmap(lambda labels: ctc_multi.ctc_loss(logits, problem.logit_paddings, labels, problem.label_paddings, blank_id=BLANK_ID))
    losses = over_labels(jax.numpy.asarray(np.stack(candidates)))
    for v, labels in enumerate(candidates):
        expected = ctc_reference(*problem._replace(labels=labels), blank_id=BLANK_ID)[0]
        possible = np.isfinite(expected)  # too few frames for a candidate: about -log_epsilon
        np.testing.assert_allclose(np.asarray(losses[v])[possible], expected[possible], **TOLERANCE["float64"])
        assert_impossible(np.asarray(losses[v])[~possible])
    tokens, _ = jax.vmap(lambda labels: ctc_multi.forced_align(logits, problem.logit_paddings, labels, problem.label_paddings, blank_id=BLANK_ID))(jax.numpy.asarray(np.stack(candidates)))
    np.testing.assert_array_equal(np.asarray(tokens[1]), np.asarray(ctc_multi.forced_align(logits, problem.logit_paddings, candidates[1], problem.label_paddings, blank_id=BLANK_ID)[0]))
    paddings = np.stack([problem.logit_paddings, np.zeros_like(problem.logit_paddings)])
    losses = jax.vmap(lambda padded: ctc_multi.ctc_loss(logits, padded, problem.labels, problem.label_paddings, blank_id=BLANK_ID))(jax.numpy.asarray(paddings))
    for v, padded in enumerate(paddings):
        expected = ctc_reference(*problem._replace(logit_paddings=padded), blank_id=BLANK_ID)[0]
        np.testing.assert_allclose(np.asarray(losses[v]), expected, **TOLERANCE["float64"])


def test_numpy_arguments_beside_uncommitted_logits_stay_uncommitted(jax_x64):
    """NumPy labels and paddings were converted committed to the logits' device, so that the
    same shapes compiled once more than with plain jnp ones (jit caches by committedness: 1 to 2 s
    a shape, reported by a review). Beside uncommitted logits they are uncommitted; beside
    committed ones, committed to the same device."""
    jax = jax_x64
    from ctc_multi.inputs import in_namespace_of

    xp = jax.numpy
    labels = np.array([[1, 2]])
    plain = xp.zeros((1, 3, 4))
    committed = jax.device_put(plain, jax.devices()[0])
    assert not in_namespace_of(xp, plain, "labels", labels).committed
    converted = in_namespace_of(xp, committed, "labels", labels)
    assert converted.committed and converted.devices() == committed.devices()


@pytest.mark.parametrize("function", FUNCTIONS, ids=FUNCTION_IDS)
def test_grad(jax_x64, function):
    jax = jax_x64
    problem = poison_padded_frames(problem_for(204))
    loss = loss_of(function)
    gradient = jax.grad(lambda x: loss(x, *problem[1:], blank_id=BLANK_ID).sum())(jax.numpy.asarray(problem.logits))
    assert isinstance(gradient, jax.Array)
    expected = ctc_reference(*problem, blank_id=BLANK_ID)[1]
    np.testing.assert_allclose(np.asarray(gradient), expected, **TOLERANCE["gradient_float64"])


def test_the_gradient_of_weakly_typed_logits_is_weakly_typed(jax_x64):
    """Logits made from a Python float (``jnp.full(shape, 0.3)``) are weakly typed; their
    gradient is too, as JAX's own functions' and optax's is, eager and under jit, so that it
    takes a narrower array's dtype when added to one (a review found it strongly typed when
    check_inputs skipped its astype for logits of the right dtype)."""
    jax = jax_x64
    problem = problem_for(205)
    logits = jax.numpy.full(problem.logits.shape, 0.3)
    assert jax.typeof(logits).weak_type
    grad = jax.grad(lambda x: ctc_multi.ctc_loss(x, *problem[1:], blank_id=BLANK_ID).sum())
    for gradient in (grad(logits), jax.jit(grad)(logits)):
        assert jax.typeof(gradient).weak_type
        assert (gradient + jax.numpy.ones(problem.logits.shape[-1], jax.numpy.bfloat16)).dtype == jax.numpy.bfloat16
    expected = ctc_reference(np.full(problem.logits.shape, 0.3), *problem[1:], blank_id=BLANK_ID)[1]
    np.testing.assert_allclose(np.asarray(gradient), expected, **TOLERANCE["gradient_float64"])


def test_a_new_number_of_classes_compiles_no_new_input_check(jax_x64, monkeypatch):
    """The value checks of eager calls are one compiled function of the labels and paddings;
    the number of classes is traced, not static, so that logits with another K (same B, T and
    N) compile no new check."""
    jax = jax_x64
    from ctc_multi import inputs

    traced = []
    check = inputs._masks_and_any_invalid_value

    def counted(*arguments):
        traced.append(1)  # runs once per compilation
        return check(*arguments)

    problem = problem_for(206)
    monkeypatch.setattr(inputs, "_masks_and_any_invalid_value", counted)
    for num_classes in (4, 5, 6):
        logits = jax.numpy.zeros(problem.logits.shape[:2] + (num_classes,))
        inputs.check_inputs(logits, *problem[1:], blank_id=BLANK_ID, log_epsilon=-1e5)
    assert len(traced) == 1


def test_jit_of_grad_and_vmap_of_grad(jax_x64):
    jax = jax_x64
    problems = [problem_for(seed) for seed in (205, 206)]
    rest = [jax.numpy.asarray(np.stack(parts)) for parts in zip(*problems)][1:]

    def gradient(logits, *others):
        return jax.grad(lambda x: ctc_multi.ctc_loss(x, *others, blank_id=BLANK_ID).sum())(logits)

    logits = jax.numpy.asarray(np.stack([p.logits for p in problems]))
    jitted = jax.jit(gradient)(logits[0], *[r[0] for r in rest])
    mapped = jax.vmap(gradient)(logits, *rest)
    np.testing.assert_allclose(np.asarray(jitted), ctc_reference(*problems[0], blank_id=BLANK_ID)[1], **TOLERANCE["gradient_float64"])
    for v, problem in enumerate(problems):
        np.testing.assert_allclose(np.asarray(mapped[v]), ctc_reference(*problem, blank_id=BLANK_ID)[1], **TOLERANCE["gradient_float64"])


@pytest.mark.parametrize("function", FUNCTIONS, ids=FUNCTION_IDS)
def test_torch_autograd(function):
    torch = pytest.importorskip("torch", reason="torch is not installed: no autograd check")
    problem = poison_padded_frames(problem_for(208))
    logits = torch.tensor(problem.logits, requires_grad=True)
    others = [torch.as_tensor(a) for a in problem[1:]]
    loss = loss_of(function)(logits, *others, blank_id=BLANK_ID)
    loss.sum().backward()
    expected_loss, expected_gradient = ctc_reference(*problem, blank_id=BLANK_ID)
    np.testing.assert_allclose(loss.detach().numpy(), expected_loss, **TOLERANCE["float64"])
    np.testing.assert_allclose(logits.grad.numpy(), expected_gradient, **TOLERANCE["gradient_float64"])


def test_torch_autograd_float32():
    torch = pytest.importorskip("torch", reason="torch is not installed: no autograd check")
    problem = problem_for(209)
    logits = torch.tensor(problem.logits, dtype=torch.float32, requires_grad=True)
    loss = ctc_multi.ctc_loss(logits, *[torch.as_tensor(a) for a in problem[1:]], blank_id=BLANK_ID)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.dtype == torch.float32
    held = problem._replace(logits=logits.detach().double().numpy())
    np.testing.assert_allclose(logits.grad.numpy(), ctc_reference(*held, blank_id=BLANK_ID)[1], **TOLERANCE["gradient_float32"])


def test_float32_without_x64():
    """Without jax_enable_x64 (the JAX default; the fixtures here turn it on), float32 and int32 work.

    Runs in a subprocess because jax_enable_x64 cannot be switched off for arrays already made.
    """
    if not installed("jax"):
        pytest.skip("jax is not installed in this environment")
    script = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp, ctc_multi
        assert not jax.config.jax_enable_x64
        logits = jnp.zeros((1, 3, 2), dtype=jnp.float32)
        labels = jnp.asarray([[1]], dtype=jnp.int32)
        loss, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(logits, jnp.zeros((1, 3)), labels, jnp.zeros((1, 1)))
        assert isinstance(loss, jax.Array) and loss.dtype == jnp.float32 and blank.dtype == jnp.float32, loss.dtype
        grad = jax.jit(jax.grad(lambda x: ctc_multi.ctc_loss(x, jnp.zeros((1, 3)), labels, jnp.zeros((1, 1))).sum()))(logits)
        assert grad.dtype == jnp.float32
        print(float(loss[0]))
        """
    )
    result = run_in_fresh_python(script, JAX_ENABLE_X64="0")
    assert result.returncode == 0, result.stderr
    # Six of the eight paths over three uniform frames read "1".
    np.testing.assert_allclose(float(result.stdout), np.log(8 / 6), **TOLERANCE["float32"])


def test_differentiating_ctc_loss_and_grad_raises(jax_x64):
    """Its loss and gradient come from stop_gradient's logits: jax.grad through either gave
    zeros without a word (torch refuses, its results not requiring grad). Now a TypeError that
    says what to differentiate instead; under jit and vmap the results stay what they were."""
    jax, jnp = jax_x64, jax_x64.numpy
    problem = problem_for(31)
    logits, others = jnp.asarray(problem.logits), tuple(jnp.asarray(a) for a in problem[1:])
    for output in (0, 1):
        with pytest.raises(TypeError, match="differentiate ctc_multi.ctc_loss instead"):
            jax.grad(lambda x: jnp.sum(ctc_multi.ctc_loss_and_grad(x, *others)[output]))(logits)
    loss, gradient = jax.jit(ctc_multi.ctc_loss_and_grad)(logits, *others)
    expected_loss = ctc_multi.ctc_loss(logits, *others)
    expected_gradient = jax.grad(lambda x: jnp.sum(ctc_multi.ctc_loss(x, *others)))(logits)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(expected_loss), **TOLERANCE["float64"])
    np.testing.assert_allclose(np.asarray(gradient), np.asarray(expected_gradient), **TOLERANCE["gradient_float64"])
    mapped = jax.vmap(lambda x: ctc_multi.ctc_loss_and_grad(x[None], *(a[:1] for a in others))[0])(logits[:1])
    np.testing.assert_allclose(np.asarray(mapped)[:, 0], np.asarray(expected_loss)[:1], **TOLERANCE["float64"])


@pytest.mark.parametrize(("platform", "cells"), [("cpu", "small"), ("cpu", "gathered_in_scan"), ("gpu", "small")])
def test_every_entry_point_under_rank_promotion_raise(jax_x64, monkeypatch, platform, cells):
    """``jax_numpy_rank_promotion="raise"`` (optax runs under it): every entry point broadcasts
    explicitly (each raised "Operands could not be broadcast together"), on the CPU's paths and
    the GPU's (``jax.default_backend()`` patched, caches cleared), below and above the size
    from which the scan gathers its emissions; the loss as without the option."""
    jax = jax_x64
    import jax.numpy as jnp

    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    jax.clear_caches()
    B, T, K, N = (3, 7, 4, 3) if cells == "small" else (8, 200, 40, 80)
    problem = random_problem(np.random.default_rng(210), B, T, K, N, **PROBLEM_OPTIONS)
    logits, *rest = (jnp.asarray(array) for array in problem)
    expected, expected_gradient = ctc_reference(*problem, blank_id=BLANK_ID)
    lengths = (jnp.full((B,), T), jnp.asarray((problem.label_paddings == 0).sum(axis=1)))
    try:
        with jax.numpy_rank_promotion("raise"):
            loss = ctc_multi.ctc_loss(logits, *rest, blank_id=BLANK_ID)
            gradient = jax.jit(jax.grad(lambda x: ctc_multi.ctc_loss(x, *rest, blank_id=BLANK_ID, reduction="mean", zero_infinity=True).sum()))(logits)
            _, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(logits, *rest, blank_id=BLANK_ID)
            jax.grad(lambda x: ctc_multi.ctc_loss_with_forward_probs(x, *rest, blank_id=BLANK_ID)[0].sum())(logits)
            _, numpy_gradient = ctc_multi.ctc_loss_and_grad(logits, *rest, blank_id=BLANK_ID)
            tokens, scores = ctc_multi.forced_align(logits, *rest, blank_id=BLANK_ID)
            ctc_multi.merge_tokens(tokens, scores, blank_id=BLANK_ID)
            jax.grad(lambda x: ctc_multi.ctc_posteriors(x, *rest, blank_id=BLANK_ID).sum())(logits)
            ctc_multi.torch_ctc_loss(jax.nn.log_softmax(jnp.swapaxes(logits, 0, 1)), rest[1], *lengths, blank=BLANK_ID)
            ctc_multi.paddings_to_lengths(rest[0])
            ctc_multi.lengths_to_paddings(lengths[1], N)
    finally:
        jax.clear_caches()
    np.testing.assert_allclose(np.asarray(loss), expected, **TOLERANCE["float64"])
    np.testing.assert_allclose(np.asarray(numpy_gradient), expected_gradient, **TOLERANCE["gradient_float64"])
    assert np.all(np.isfinite(np.asarray(gradient))) and blank.shape == (T, B, N + 1) and nonblank.shape == (T, B, N)


def test_jax_export_for_any_batch_and_number_of_frames(jax_x64):
    """``jax.export`` with symbolic batch, frames and labels (shape polymorphism, as optax's
    loss exports): the exported programs give, for each concrete shape, what a direct call
    gives. A symbolic size failed every entry point ("Symbolic dimension comparison '108*b' >=
    '262144' is inconclusive": whether the scan gathers its emissions; the scan's unroll;
    forced_align's log 0, which depends on T; a branch on N > 1)."""
    jax = jax_x64
    import jax.numpy as jnp
    from jax import export

    K = 5
    batch, frames, labels = export.symbolic_shape("b, t, n")
    spec = [
        jax.ShapeDtypeStruct((batch, frames, K), jnp.float64),
        jax.ShapeDtypeStruct((batch, frames), jnp.float64),
        jax.ShapeDtypeStruct((batch, labels), jnp.int32),
        jax.ShapeDtypeStruct((batch, labels), jnp.float64),
    ]
    functions = {
        "ctc_loss": ctc_multi.ctc_loss,
        "grad": jax.grad(lambda x, *rest: ctc_multi.ctc_loss(x, *rest).sum()),
        "ctc_loss_with_forward_probs": ctc_multi.ctc_loss_with_forward_probs,
        "forced_align": ctc_multi.forced_align,
        "ctc_posteriors": ctc_multi.ctc_posteriors,
    }
    # the second shape has more than 2**18 lattice cells, from which a direct call on a CPU
    # gathers the emissions in the scan
    problems = [random_problem(np.random.default_rng(seed), B, T, K, N) for seed, (B, T, N) in enumerate([(3, 12, 4), (2, 5, 1), (64, 500, 6)])]
    for name, function in functions.items():
        exported = export.export(jax.jit(function))(*spec)
        for problem in problems:
            arrays = [jnp.asarray(array, dtype=jnp.int32 if array.dtype.kind == "i" else jnp.float64) for array in problem]
            for got, want in zip(jax.tree_util.tree_leaves(exported.call(*arrays)), jax.tree_util.tree_leaves(function(*arrays))):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12, err_msg=name)
