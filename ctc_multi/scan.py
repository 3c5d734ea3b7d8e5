"""The scan protocol that drives every recursion in ctc_multi.

A scan mirrors ``jax.lax.scan(f, init, xs, reverse=False)``::

    carry = init
    for x in xs (first axis, in reverse order when ``reverse``):
        carry, y = f(carry, x)
    return carry, stack(all y)   # in the order of xs, whatever the direction

Contract every adapter keeps (and every step function may rely on):

* ``init``, ``xs`` and the outputs ``y`` are arrays, ``None`` or tuples of them;
* the carry keeps a fixed structure, shape and dtype from one step to the next;
* ``xs`` all share their leading length, which must be at least one.

The JAX adapter hands this to ``jax.lax.scan``; the torch and NumPy adapters use
:func:`python_loop_scan` below.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

Tree = Any  # an array, None, or a (nested) tuple of them
Step = Callable[[Tree, Tree], "tuple[Tree, Tree]"]


class Scan(Protocol):
    """The signature every backend adapter implements."""

    def __call__(self, step: Step, init: Tree, xs: Tree, *, reverse: bool = False) -> tuple[Tree, Tree]: ...


def tree_map(fn: Callable[..., Any], *trees: Tree) -> Tree:
    """Apply ``fn`` leaf by leaf over trees of tuples, keeping ``None`` leaves."""
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(tree_map(fn, *parts) for parts in zip(*trees))
    return fn(*trees)


def tree_leaves(tree: Tree) -> list[Any]:
    if tree is None:
        return []
    if isinstance(tree, tuple):
        return [leaf for part in tree for leaf in tree_leaves(part)]
    return [tree]


def python_loop_scan(
    step: Step, init: Tree, xs: Tree, *, reverse: bool = False, stack: Callable, output_buffer: Callable | None = None
) -> tuple[Tree, Tree]:
    """A scan as a plain Python loop; ``stack(list_of_arrays)`` joins the outputs on a new axis 0.

    ``output_buffer(y, length)``, if given, is used instead: it returns an array of shape
    ``(length,) + y.shape`` (y's dtype and device) that each step's output is written into, one
    allocation for all steps rather than one per step and a copy at the end. Each new page of
    memory costs a fault (about 3 us on the VM that measured it), so keeping the (T, B, S)
    outputs of the loop step by step costs about as much as the arithmetic.
    """
    leaves = tree_leaves(xs)
    if not leaves:
        raise ValueError("python_loop_scan needs at least one array in xs to know its length")
    length = leaves[0].shape[0]
    order = range(length - 1, -1, -1) if reverse else range(length)
    if isinstance(xs, tuple) and all(x is not None and not isinstance(x, tuple) for x in xs):  # flat: no tree_map
        step_xs = lambda index: tuple([x[index, ...] for x in xs])  # noqa: E731
    else:
        step_xs = lambda index: tree_map(lambda x: x[index, ...], xs)  # noqa: E731
    carry, outputs, first_y, buffers = init, [], None, None
    for index in order:
        carry, y = step(carry, step_xs(index))
        if output_buffer is None:
            outputs.append(y)
            continue
        if buffers is None:  # the first step: its outputs give the buffers' shapes
            first_y, buffers = y, [output_buffer(output, length) for output in tree_leaves(y)]
        for buffer, output in zip(buffers, tree_leaves(y)):
            buffer[index, ...] = output
    if buffers is not None:
        filled = iter(buffers)
        return carry, tree_map(lambda _: next(filled), first_y)
    if reverse:
        outputs.reverse()
    if not outputs or outputs[0] is None:
        return carry, None
    return carry, tree_map(lambda *ys: stack(list(ys)), *outputs)
