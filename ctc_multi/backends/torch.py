"""PyTorch: the scan is a Python loop over torch ops (CPU or CUDA); autograd records it."""

from __future__ import annotations

import functools

import torch
from torch.autograd import forward_ad

from . import torch_hand_off
from ..lattice import forward_and_occupancy_by_mirror, log_softmax_parts_by_where, replace_and_floor
from ..scan import python_loop_scan

NAME = "torch"
INDEX_DTYPE_NAME = "int64"  # torch gathers take int64 indices only


def _stack(tensors):
    return torch.stack(tensors, dim=0)


# Whether the log-softmax comes before the lattice's gather (see ctc_multi.lattice.build_lattice).
NORMALISE_BEFORE_GATHER = True

# Lattice frames per scan step (see ctc_multi.lattice.run_recursion).
FRAMES_PER_STEP = 8


def gather_in_scan(num_cells: int) -> bool:
    return False  # normalised before the gather, which takes a block of frames at a time


def scan(step, init, xs, *, reverse=False):
    return python_loop_scan(step, init, xs, reverse=reverse, stack=_stack)


def is_concrete(x) -> bool:
    """False under torch.compile, while a CUDA stream captures a graph (``torch.cuda.graph``),
    where reading a value would break the trace or the capture, and on the meta device, which
    holds shapes without values: the input checks are skipped."""
    if torch.compiler.is_compiling() or getattr(x, "is_meta", False):
        return False
    return not (getattr(x, "is_cuda", False) and torch.cuda.is_current_stream_capturing())


SECOND_DERIVATIVE_REFUSED = (
    "ctc_multi's torch gradient of the CTC loss cannot be differentiated again: its backward is "
    "explicit, not recorded by autograd (second derivatives: the JAX backend)"
)


class _SecondDerivativeRefused(torch.autograd.Function):
    """A zero tied to the logits: differentiating it, with respect to them, raises."""

    @staticmethod
    def forward(ctx, anchor):
        return torch.zeros_like(anchor)

    @staticmethod
    def backward(ctx, unused):
        raise RuntimeError(SECOND_DERIVATIVE_REFUSED)


class _ExplicitGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, functions, logits, anchor, *others):
        forward_with_residuals, backward = functions
        value, residuals = forward_with_residuals(logits, *others)
        ctx.backward_function = backward
        ctx.num_others = len(others)
        # A view of a leaf (x.view(...), torch_ctc_loss's transpose of x) hands its gradient to
        # the leaf as a view of what it gets, which autograd may keep as x.grad and add the
        # next backward's into in place: a saved gradient handed back itself would change
        # under the graph, and a third backward over it (retain_graph) raise.
        # (Under torch.compile's tracing a view's base is not known: a copy then too.)
        ctx.hand_back_saved = not (torch.compiler.is_compiling() or (logits._is_view() and logits._base.is_leaf))
        ctx.save_for_backward(anchor, *residuals)
        return value

    @staticmethod
    def backward(ctx, cotangent):
        anchor, *residuals = ctx.saved_tensors
        _refuse_a_changed_hand_back(ctx, residuals[0])
        gradient = ctx.backward_function(tuple(residuals), cotangent)
        if gradient is residuals[0]:  # is_all_ones's shortcut
            if not ctx.hand_back_saved:
                gradient = gradient.clone()
            else:
                ctx.handed_back = (gradient.untyped_storage().data_ptr(), gradient._version)
            # Once only: a second backward over the graph (retain_graph) that handed back the
            # same tensor again made two torch.autograd.grad results one tensor, so that adding
            # one into the other changed both.
            ctx.hand_back_saved = False
        if torch.is_grad_enabled():
            # create_graph=True: an outer derivative with respect to the logits (a gradient
            # penalty, a Hessian) would read this gradient's own derivative, which autograd
            # never recorded: without a tie to the logits it would silently count as zero, so a
            # zero tied to them is added, whose derivative raises. Its derivative with respect to
            # the cotangent (a per-sequence weight's, torch.autograd.functional.jvp) is recorded
            # as it is made, and stays.
            gradient = gradient + _SecondDerivativeRefused.apply(anchor)
        return (None, gradient, None) + (None,) * ctx.num_others


def _refuse_a_changed_hand_back(ctx, saved):
    """Raise where an earlier backward over this graph handed back ``saved``'s memory (the
    tensor itself, or one that an unpack hook made a view of) and the caller has changed it in
    place since. torch's own check of saved tensors raises there, but
    not under saved-tensor hooks (``torch.autograd.graph.save_on_cpu``, any
    ``saved_tensors_hooks``), which hand back what they packed unchecked: the second gradient
    was then the changed tensor, silently."""
    handed_back = getattr(ctx, "handed_back", None)
    # the same memory (an unpack hook may return a new view of it), changed since
    if handed_back is not None and saved.untyped_storage().data_ptr() == handed_back[0] and saved._version != handed_back[1]:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            "operation: the gradient that an earlier backward over this graph returned (ctc_multi "
            "hands back its saved gradient itself), changed in place since; change a clone instead"
        )


def with_explicit_gradient(forward, forward_with_residuals, backward):
    def loss(logits, *others):
        if not (torch.is_grad_enabled() and logits.requires_grad) or forward_ad.unpack_dual(logits).tangent is not None:
            # A dual tensor (forward-mode AD) that also requires grad (a model's output): the
            # Function below has no jvp, so torch raised; torch's own ops carry the tangent, and
            # autograd records them for the reverse mode.
            return forward(logits, *others)
        # A 0-d tensor that depends on the logits without keeping them (no version counter
        # shared with them, so changing them in place later stays allowed; no copy of them
        # either, contiguous or not): the sum of a view of at most their first element.
        anchor = logits.as_strided((min(1, logits.numel()),), (1,)).sum()
        return _ExplicitGradient.apply((forward_with_residuals, backward), logits, anchor, *others)

    return loss


def subtract_per_class(xp, minuend, values, state_classes):
    """(B, T, K) minus the (B, T, C) values summed per class ((B, C) class of each column):
    a scatter-add of their negatives, in place."""
    return minuend.scatter_add_(2, state_classes[:, None, :].expand(values.shape), -values)


def zero_frames(xp, values, frame_zeroed):
    """(B, T, X) values with the (B, T) flagged frames set to zero, in place."""
    return values.masked_fill_(frame_zeroed[:, :, None], 0)


def log_softmax_of_frames(xp, logits, frame_zeroed):
    """(B, T, K), (B, T) -> (B, T, K) log-softmax, the flagged frames taken as zero logits:
    torch's fused kernel, one pass instead of five (2.7x faster on `bpe`)."""
    return torch.log_softmax(logits.masked_fill(frame_zeroed[:, :, None], 0), dim=-1)


log_softmax_parts_of_frames = log_softmax_parts_by_where  # unused: torch normalises, then gathers


def gather_states(xp, values, state_classes, replaced=None, replacement=None, floor=None):
    """(B, T, K), (B, S) -> (T, B, S): torch.gather on the time-major view (torch's
    take_along_dim, which array-api-compat calls, ran 4-8x slower on `char` and `long`), then
    ``replace_and_floor`` with the rest."""
    batch, frames, _ = values.shape
    indices = state_classes[None, :, :].expand(frames, batch, state_classes.shape[1])
    return replace_and_floor(xp, torch.gather(values.permute(1, 0, 2), 2, indices), replaced, replacement, floor)


def scaled_sums(dtype) -> bool:
    """Log space: each op costs a dispatch (on CUDA a launch), and the scaled step has about
    twice as many (not measured here; NumPy's loop ran 1.2x to 1.9x slower with it)."""
    return False


# Each torch op costs a dispatch (on CUDA a kernel launch) whatever its size, so one scan of
# the plain step over the lattice and its mirror image (about 8 ops per frame) beats the shares
# and a reverse scan (about 25): forward+backward with torch's own ops on a CPU 1.0x (char) to
# 1.6x (small) faster (README, Performance).
forward_and_occupancy = forward_and_occupancy_by_mirror


# On a CPU, what autograd does not record (the loss and its explicit gradient; without grad, the
# forward probabilities, alignments and posteriors) runs NumPy's loop on views of the tensors'
# memory: the loop is about thirty small ops per frame, and torch's dispatch costs two to five
# times NumPy's per op there (torch forward+backward 1.4-2.1x faster on `char`, `bpe` and
# `long`; README, Performance). False keeps torch's own ops everywhere.
LOOP_IN_NUMPY_ON_CPU = True

# Opt-in: where the loop would leave torch on a CPU (above; consulted first, whatever
# LOOP_IN_NUMPY_ON_CPU says), it runs under XLA instead (JAX must be installed), on the
# tensors' memory through DLPack, compiled by ``jax.jit`` once per shape (about a second
# each): forward+backward 2.1x to 2.9x torch's own kernel on `long`,
# `char` and `bpe` against NumPy's 0.7x to 1.0x (README, Performance). Off by default because
# it is JAX in a torch program: its import, its threads, a compilation per new shape (each
# compiled program stays in memory: about 6 MB a shape here), and on a machine where JAX sees a
# GPU, JAX's GPU client (which takes most of the GPU's memory when it starts) and the GPU's
# settings for the CPU's program. float64 stays NumPy's unless JAX's float64 is on, and so does
# a process forked after JAX's import (a DataLoader worker under "fork") from one that had
# imported ctc_multi, where XLA would hang (:mod:`.torch_hand_off`).
LOOP_IN_XLA_ON_CPU = False


def numpy_views(arrays):
    """NumPy views of CPU tensors where ``LOOP_IN_NUMPY_ON_CPU`` (:func:`.torch_hand_off.numpy_views`), else None."""
    return torch_hand_off.numpy_views(arrays) if LOOP_IN_NUMPY_ON_CPU else None


def xla_views(arrays):
    """JAX arrays over CPU tensors' memory where ``LOOP_IN_XLA_ON_CPU`` (:func:`.torch_hand_off.xla_views`), else None."""
    return torch_hand_off.xla_views(arrays) if LOOP_IN_XLA_ON_CPU else None


from_numpy = torch_hand_off.from_numpy
from_xla = torch_hand_off.from_xla


def is_all_ones(x) -> bool:
    """Whether a CPU tensor holds only ones (the cotangent of ``loss.sum()``): then the backward
    hands back the saved gradient itself, not a scaled copy (a pass over (B, T, K) and a fresh
    array: 15 of 60 ms of forward+backward on `vocab5k`). Never read on CUDA, where reading a
    value waits for the device. A later in-place change to the returned gradient makes a
    second backward (``retain_graph``) raise, as torch does for any saved tensor changed.
    Never for a cotangent that autograd records (``create_graph=True`` with a cotangent that
    depends on something, a weight say): the gradient must stay a function of it."""
    if x.device.type != "cpu" or not is_concrete(x) or x.requires_grad:
        return False
    try:
        return bool(torch.all(x == 1))
    except RuntimeError:  # a value that cannot be read here (a transform's wrapped tensor)
        return False


def detach(x):
    return x.detach()


def refuse_derivatives(logits, outputs, message):
    return outputs  # they do not require grad: autograd refuses to differentiate them by itself


# Under torch.compile, whether the computation (after the input checks) runs eagerly, a graph
# break, rather than traced: traced, its loop over the frames is unrolled into the graph, which
# is compiled anew for each number of frames (17 to 24 s each for 10 to 17 frames on this
# project's 2-core CPU; after eight torch gave up and ran it eagerly; ``dynamic=True`` did not
# help). False traces it, as ``fullgraph=True`` requires. ``torch.export``, which needs one
# graph, traces it either way.
EAGER_UNDER_TORCH_COMPILE = True


def compiled(function, num_static):
    """``function`` as it is (it runs op by op); under torch.compile, eagerly (above)."""
    if EAGER_UNDER_TORCH_COMPILE and not _is_exporting():
        return functools.partial(_run_eagerly, function)
    return function


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # not in torch 2.4 and before


def _run_eagerly(function, *args):
    return function(*args)


try:  # the reason, which fullgraph=True's refusal quotes: a newer torch only (2025)
    _run_eagerly = torch.compiler.disable(
        _run_eagerly,
        reason="ctc_multi runs eagerly under torch.compile (a graph break), as its loop over the frames would be "
        "compiled anew for each number of frames; ctc_multi.backends.torch.EAGER_UNDER_TORCH_COMPILE = False traces it",
    )
except TypeError:
    _run_eagerly = torch.compiler.disable(_run_eagerly)


def placed_like(x, logits):
    return x  # in_namespace_of put it on the logits' device
