"""JAX: the scan is ``jax.lax.scan``, so the recursion compiles and runs under jit, vmap and grad."""

from __future__ import annotations

import functools

import jax

from ..lattice import forward_and_occupancy_by_mirror, forward_and_occupancy_by_shares, gather_states_by_take, log_softmax_of_frames_by_where, log_softmax_parts_by_where, per_class_sum_by_matmul, zero_frames_by_where

NAME = "jax"
INDEX_DTYPE_NAME = "int32"  # int64 needs jax_enable_x64


# Lattice steps per loop iteration: (forward scans, reverse scans) by platform. On a CPU the
# forward step ends in a row maximum, which keeps XLA from fusing unrolled steps, and 4 runs
# 1.2-1.4x faster than 1 on `long`; the reverse (occupancy) step has no such break, and unrolled
# copies fuse into one kernel that recomputes each step's shifted neighbours (2.7x slower at 4).
# On a GPU each loop iteration costs a launch and a predicate read, so unrolling pays (H100,
# forward+backward by the shares against optax at 1, 4, 8, 16 both ways: char 1.8, 3.0, 2.0,
# 2.0x; long 2.7, 4.1, 2.8, 2.8x; big 2.1, 4.8, 5.4, 4.8x; benchmarks/gpu_unroll.py). There the
# gradient takes the mirror image (below), a forward scan only, measured at 8.
# A step without that row maximum (a scaled step, ctc_multi.lattice.ScaledSemiring: its
# ``renormalised`` is False) fuses across unrolled copies as the reverse step does, so it is
# unrolled as the reverse step is (on a CPU the forward at 4 ran 8x slower than at 1 on `long`).
UNROLL = {"cpu": (4, 1)}
UNROLL_ELSEWHERE = (8, 8)


# Up to this many classes, subtract_per_class uses a one-hot matmul (B*T*C*K) rather than a scatter-add.
ONE_HOT_MAX_CLASSES = 128

# Whether the log-softmax comes before the lattice's gather (see ctc_multi.lattice.build_lattice).
NORMALISE_BEFORE_GATHER = False

# Lattice frames per scan step (see ctc_multi.lattice.run_recursion).
FRAMES_PER_STEP = 1

# From how many lattice cells (T * B * S) the scan gathers each frame's emissions itself
# (ctc_multi.lattice.build_lattice), by platform. On a CPU that spares each call a new (T, B, S)
# array (every page of it a fault) and a pass over it, and costs a gather per loop step. In
# `benchmarks/ab.py` runs against commit 7662029, the forward on `char` (3.2M cells) ran 1.3x to
# 1.45x faster and on `long` (6.4M) 1.25x to 1.55x (four runs; forward+backward 1.15x, two
# runs); on `bpe` (1.0M) and `vocab5k` (0.3M) the same, on `small` (33k) 0.9x to 0.95x. With
# the scaled sums (commit 0398fa3) and the edge in the carry (8077d74), the forward on `bpe`
# and `vocab5k` ran 1.59x and 1.50x faster with it (ab.py --against 8077d74, 21 rounds;
# forward+backward 1.02x, 1.02x), so the threshold fell from 2**21 to 2**18. Not
# measured on a GPU, which keeps the whole gather (the mirror image reads it all anyway).
GATHER_IN_SCAN_MIN_CELLS = {"cpu": 2**18}


def _is_symbolic(dimension) -> bool:
    """Whether a shape's size is a symbol (``jax.export`` with shape polymorphism), which has no
    answer to ``>=`` and no unrolling."""
    try:
        from jax.export import is_symbolic_dim
    except ImportError:  # a JAX without jax.export has no symbolic sizes to export
        return False
    return is_symbolic_dim(dimension)


def gather_in_scan(num_cells: int) -> bool:
    threshold = GATHER_IN_SCAN_MIN_CELLS.get(jax.default_backend())
    # A symbolic size (an exported program for any batch, say) keeps the whole gather, which
    # serves every size.
    return threshold is not None and not _is_symbolic(num_cells) and num_cells >= threshold


def unroll(*, reverse: bool, renormalised: bool = True) -> int:
    """Lattice steps per loop iteration on this platform (``UNROLL``)."""
    forward, backward = UNROLL.get(jax.default_backend(), UNROLL_ELSEWHERE)
    return backward if reverse or not renormalised else forward


def scan(step, init, xs, *, reverse=False):
    steps = unroll(reverse=reverse, renormalised=getattr(step, "renormalised", True))
    if _is_symbolic(jax.tree_util.tree_leaves(xs)[0].shape[0]):
        steps = 1  # lax.scan cannot unroll a symbolic number of frames
    return jax.lax.scan(step, init, xs, reverse=reverse, unroll=steps)


def is_concrete(x) -> bool:
    # Under jit even operations on constant arrays are traced, so probe a fresh array too.
    return not isinstance(x, jax.core.Tracer) and not isinstance(jax.numpy.zeros(()), jax.core.Tracer)


def with_explicit_gradient(forward, forward_with_residuals, backward):
    @jax.custom_vjp
    def loss(logits, *others):
        return forward(logits, *others)

    def loss_forward(logits, *others):
        value, residuals = forward_with_residuals(logits, *others)
        return value, (residuals, len(others))

    def loss_backward(saved, cotangent):
        residuals, num_others = saved
        return (backward(residuals, cotangent),) + (None,) * num_others

    loss.defvjp(loss_forward, loss_backward)
    return loss


# The scatter of subtract_per_class goes down each class's column of T frames, K elements
# apart; on a CPU, where that stride is a multiple of this many bytes (K = 1024, 2048, 3072,
# 4096, ... in float32), it goes frame by frame at flat indices instead (frame * K + class, as
# NumPy's does). Such a column puts every element in the same few cache sets. The scatter
# alone (scratch script, B = 16, T = 400, C = 81, medians of 33 calls), down the columns and
# at flat indices: K = 1024 8.5 and 4.9 ms, 2048 7.2 and 6.3, 3072 8.8 and 4.3, 4096 11.0 and
# 7.9, 8192 13.0 and 8.9; but K = 1000 3.0 and 4.3, 1280 4.1 and 5.8, 5000 4.8 and 6.4 (where
# the columns stay). JAX forward+backward on `bpe` (K = 1024) 1.05x to 1.11x faster
# (benchmarks/ab.py, 15 and 21 rounds). Not measured on a GPU, which keeps the columns.
FLAT_SCATTER_STRIDES = {"cpu": 4096}


def scatters_at_flat_indices(num_frames: int, num_classes: int, itemsize: int) -> bool:
    """Whether subtract_per_class scatters at flat indices on this platform (``FLAT_SCATTER_STRIDES``):
    a column stride of K * itemsize bytes, and flat indices that fit in int32."""
    multiple = FLAT_SCATTER_STRIDES.get(jax.default_backend())
    return multiple is not None and (num_classes * itemsize) % multiple == 0 and num_frames * num_classes <= 2**31


def subtract_per_class(xp, minuend, values, state_classes):
    """(B, T, K) minus the (B, T, C) values summed per class ((B, C) class of each column).

    For many classes a scatter of their negatives into the minuend, which XLA does in place
    (one (B, T, K) array and pass fewer than a scatter into zeros and a subtraction), batched
    so a batch-sharded input stays sharded (``FLAT_SCATTER_STRIDES`` says in which order); for few
    classes the one-hot matmul, which XLA runs faster on a CPU (K = 32: 5 ms against 28 ms on
    `char`).
    """
    _, num_frames, num_classes = minuend.shape
    if num_classes <= ONE_HOT_MAX_CLASSES:
        # Full float32 products: a GPU's default (TF32) put gradient errors of 3e-4 on an H100.
        with jax.default_matmul_precision("highest"):
            return minuend - per_class_sum_by_matmul(xp, values, state_classes, num_classes)
    if scatters_at_flat_indices(num_frames, num_classes, minuend.dtype.itemsize):
        return jax.vmap(_subtract_at_flat_indices)(minuend, values, state_classes)

    def down_the_columns(sequence_minuend, sequence_values, classes):
        return sequence_minuend.at[:, classes].add(-sequence_values)

    return jax.vmap(down_the_columns)(minuend, values, state_classes)


def _subtract_at_flat_indices(minuend, values, classes):
    """One sequence's (T, K) minus its (T, C) values at the (C,) classes, at flat indices."""
    jnp = jax.numpy
    num_frames, num_classes = minuend.shape
    indices = jnp.arange(num_frames, dtype=classes.dtype)[:, None] * num_classes + classes[None, :]
    flat = jnp.reshape(minuend, (-1,)).at[jnp.reshape(indices, (-1,))].add(-jnp.reshape(values, (-1,)))
    return jnp.reshape(flat, minuend.shape)


zero_frames = zero_frames_by_where  # XLA fuses the select into what computes the values

log_softmax_of_frames = log_softmax_of_frames_by_where  # unused: JAX gathers, then normalises


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def log_softmax_parts_of_frames(xp, logits, frame_zeroed):
    """The lattice's (B, T) peak and log-total of each frame (``log_softmax_parts_by_where``:
    the reductions read the raw logits, and the flagged frames' results are replaced), with a
    derivative that is zero on the flagged frames. Autodiff of the reductions themselves
    multiplied a flagged frame's NaN or inf by zero, and a second derivative (jax.grad of
    jax.grad, through the custom_vjp's traced forward) was NaN there. The values, and so the
    loss and first derivatives, are computed as before: this rule runs only when the lattice
    is differentiated."""
    return log_softmax_parts_by_where(xp, logits, frame_zeroed)


@log_softmax_parts_of_frames.defjvp
def _log_softmax_parts_jvp(xp, primals, tangents):
    logits, frame_zeroed = primals
    logits_tangent, _ = tangents
    peak, log_total = log_softmax_parts_of_frames(xp, logits, frame_zeroed)
    # d(peak + log_total) = softmax . tangent, all of it taken by the log-total: the peak is a
    # shift that the log-softmax does not depend on. exp(-inf) on the flagged frames: zero.
    jnp = jax.numpy
    exponents = jnp.where(frame_zeroed[..., None], -jnp.inf, (logits - peak[..., None]) - log_total[..., None])
    total_tangent = jnp.sum(jnp.exp(exponents) * jnp.where(frame_zeroed[..., None], 0.0, logits_tangent), axis=-1)
    return (peak, log_total), (jnp.zeros_like(peak), total_tangent)

gather_states = gather_states_by_take  # XLA's gather from the time-major view is fast


# The gradient's occupancies by platform (see ctc_multi.lattice). On a CPU XLA is bound by the
# exp and log of each lattice cell, which the mirror image doubles: forward+backward 1.2x to 2x
# slower with it on `char`, `bpe`, `long`. On a GPU each loop step costs launches, and the mirror
# image's one scan replaces the shares' two (H100, forward+backward against optax: 6.9x, 11.2x,
# 6.5x on char, long, big, where the shares gave 1.9x, 1.3x, 2.3x in the same run; README, Performance).
OCCUPANCY = {"cpu": forward_and_occupancy_by_shares}
OCCUPANCY_ELSEWHERE = forward_and_occupancy_by_mirror


def forward_and_occupancy(xp, scan, lattice, *, frames_per_step=1, scaled=False):
    way = OCCUPANCY.get(jax.default_backend(), OCCUPANCY_ELSEWHERE)
    return way(xp, scan, lattice, frames_per_step=frames_per_step, scaled=scaled)


# Platforms where float32 sums over paths run in scaled probabilities (ctc_multi.lattice.ScaledSemiring).
# On a CPU XLA is bound by the log-space step's three exp and one log per lattice cell; the
# scaled step has one exp2 (the emission's) and multiplies and integer ops. Against the log
# space (benchmarks/ab.py --backends jax --rounds 21, old/new): forward 1.03, 1.13, 1.19, 1.06
# on `char`, `bpe`, `long`, `vocab5k`; forward+backward 1.00, 1.16, 1.14, 1.03. Not measured
# on a GPU, where the log-space mirror image runs (and transcendentals are cheap).
SCALED_SUMS = {"cpu"}


def scaled_sums(dtype) -> bool:
    return jax.default_backend() in SCALED_SUMS and dtype == jax.numpy.float32


def numpy_views(arrays):
    return None  # XLA runs the loop


def from_numpy(x):
    raise NotImplementedError("the JAX adapter never hands its loop to NumPy")


def xla_views(arrays):
    return None  # XLA runs the loop


def from_xla(x):
    raise NotImplementedError("the JAX adapter never hands its loop to XLA (it is XLA)")


def is_all_ones(x) -> bool:
    """Never read: the cotangent is traced, and where it is the ones of d sum(loss), XLA drops
    the multiply by them (no (B, T, K) multiply in the compiled value_and_grad of the sum)."""
    return False


def detach(x):
    return jax.lax.stop_gradient(x)


def refuse_derivatives(logits, outputs, message):
    """``outputs`` tied to ``logits`` by an identity whose derivative raises: computed from
    stop_gradient's logits, they would otherwise differentiate to zeros without a word."""

    @jax.custom_vjp
    def tied(logits, outputs):
        return outputs

    def tied_forward(logits, outputs):
        return outputs, None

    def tied_backward(unused, cotangent):
        raise TypeError(message)

    tied.defvjp(tied_forward, tied_backward)
    return tied(logits, outputs)


@functools.lru_cache(maxsize=None)
def compiled(function, num_static):
    """``function`` compiled once per static setting, so eager calls don't dispatch op by op."""
    return jax.jit(function, static_argnums=tuple(range(num_static)))


def placed_like(x, logits):
    """``x`` sharded along its first axis as the logits' batch axis is, where that axis is
    sharded over a mesh axis of type Explicit (only those are part of an array's type): NumPy,
    torch or unplaced JAX labels beside such logits made ``jax.grad`` and, under
    ``jax.set_mesh``, ``jax.jit`` refuse to mix them ("All operands should have the same
    sharding"). Eagerly with the logits' concrete mesh; traced, with the mesh of the caller's
    ``jax.set_mesh``, which JAX requires there (without one, its error says so)."""
    batch = getattr(getattr(jax.typeof(logits), "sharding", None), "spec", None)
    batch = batch[0] if batch else None
    if batch is None or x.ndim == 0:
        return x
    own = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if own and own[0] == batch:
        return x
    spec = jax.sharding.PartitionSpec(batch)
    if isinstance(logits, jax.core.Tracer):
        return jax.sharding.reshard(x, spec)
    return jax.device_put(x, jax.sharding.NamedSharding(logits.sharding.mesh, spec))
