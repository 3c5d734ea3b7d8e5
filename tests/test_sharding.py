"""JAX-specific: ctc_loss and its gradient on a batch-sharded mesh of 4 simulated CPU devices.

JAX fixes its device count when it is first imported, and the test session has imported it
already, so the checks run in a fresh Python process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; it prints its findings as JSON and the
assertions are made here. float64 (``jax_enable_x64`` in that process) so that sharded and
unsharded results can be compared at the float64 tolerance.

Two kinds of mesh: ``Mesh(devices, ("batch",))``, whose axis is "auto" (XLA propagates the
sharding), and ``jax.make_mesh``'s default since JAX 0.7, an "explicit" axis, where every
intermediate array's sharding is part of its type and an op that mixes a batch-sharded operand
with an unsharded one of the same batch size is an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TOLERANCE, installed

pytestmark = pytest.mark.skipif(not installed("jax"), reason="jax is not installed in this environment")

DEVICES = 4

CHILD = textwrap.dedent(
    """
    import contextlib, json, re
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    import ctc_multi
    from ctc_multi.shapes import Shape, random_problem
    WAY_SETUP

    problem = random_problem(Shape("sharded", B=8, T=60, K=NUM_CLASSES, N=15), seed=3, dtype="float64")
    unsharded = [jnp.asarray(a) for a in problem]
    loss = jax.jit(ctc_multi.ctc_loss)
    grad = jax.jit(jax.grad(lambda logits, *others: jnp.sum(ctc_multi.ctc_loss(logits, *others))))
    expected = dict(loss=np.asarray(loss(*unsharded)).tolist(), grad=np.asarray(grad(*unsharded)).tolist())

    def check(mesh, context):
        batch = lambda ndim: NamedSharding(mesh, P("batch", *(None,) * (ndim - 1)))

        def describe(x):
            return dict(
                value=np.asarray(x).tolist(),
                spec=str(x.sharding.spec) if hasattr(x.sharding, "spec") else repr(x.sharding),
                batch_sharded=x.sharding.is_equivalent_to(batch(x.ndim), x.ndim),
                shard_shapes=[list(shard.data.shape) for shard in x.addressable_shards],
                shard_devices=sorted(shard.device.id for shard in x.addressable_shards),
            )

        with context:
            sharded = [jax.device_put(a, batch(a.ndim)) for a in problem]
            result = dict(inputs_sharded=[describe(a)["batch_sharded"] for a in sharded])
            for name, function in (("loss", loss), ("grad", grad)):
                try:
                    hlo = function.lower(*sharded).compile().as_text()
                    collectives = re.findall(r"\\b(all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)(?:-start)?\\(", hlo)
                    result[name] = dict(describe(function(*sharded)), collectives=sorted(set(collectives)))
                except Exception as error:
                    result[name] = dict(error=f"{type(error).__name__}: {str(error).splitlines()[0]}")
        return result

    devices = jax.devices()[:DEVICES]
    print(json.dumps(dict(
        devices=len(jax.devices()),
        expected=expected,
        auto=check(Mesh(np.array(devices), ("batch",)), contextlib.nullcontext()),
        explicit=(lambda mesh: check(mesh, jax.set_mesh(mesh)))(
            jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Explicit,), devices=devices)),
    )))
    """
)

MESHES = ["auto", "explicit"]


# The gradient's per-class sum is a one-hot matmul for few classes and a scatter-add for many
# (ctc_multi.backends.jax.ONE_HOT_MAX_CLASSES = 128): both must keep the batch on its devices.
CLASS_COUNTS = {"few classes (one-hot matmul)": 12, "many classes (scatter-add)": 200}


# The gradient's occupancies: this CPU's way (the shares), with the scatter of many classes'
# sums at flat indices (as a CPU does for K = 1024, ctc_multi.backends.jax.FLAT_SCATTER_STRIDES,
# forced here in the child process); the mirror image that the JAX adapter takes on GPUs
# (OCCUPANCY), with the GPUs' scatter down each class's column; and the shares with the
# lattice's emissions gathered frame by frame in the scan (the columns, as for K = 200 on a CPU).
WAYS = {
    "shares, scatter at flat indices": "import ctc_multi.backends.jax; ctc_multi.backends.jax.FLAT_SCATTER_STRIDES['cpu'] = 1",
    "mirror image and column scatter, as on GPUs": "import ctc_multi.backends.jax, ctc_multi.lattice; "
    "ctc_multi.backends.jax.OCCUPANCY['cpu'] = ctc_multi.lattice.forward_and_occupancy_by_mirror; "
    "ctc_multi.backends.jax.FLAT_SCATTER_STRIDES.clear()",
    # Each frame's emissions gathered in the scan, as on a CPU from 2**18 lattice cells
    # (ctc_multi.backends.jax.GATHER_IN_SCAN_MIN_CELLS), forced here for this small problem.
    "shares, emissions gathered in the scan": "import ctc_multi.backends.jax; ctc_multi.backends.jax.GATHER_IN_SCAN_MIN_CELLS['cpu'] = 0",
}


@pytest.fixture(
    scope="module",
    params=[(classes, way) for classes in CLASS_COUNTS.values() for way in WAYS],
    ids=[f"{name}, {way}" for name in CLASS_COUNTS for way in WAYS],
)
def sharded_run(request) -> dict:
    num_classes, way = request.param
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")
    child = CHILD.replace("DEVICES", str(DEVICES)).replace("NUM_CLASSES", str(num_classes)).replace("WAY_SETUP", WAYS[way])
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, f"the sharded run failed:\n{done.stderr[-4000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] >= DEVICES, f"XLA_FLAGS gave {result['devices']} devices, not {DEVICES}"
    return result


def _result(sharded_run: dict, mesh: str, output: str) -> dict:
    assert all(sharded_run[mesh]["inputs_sharded"]), "the inputs were not batch-sharded"
    result = sharded_run[mesh][output]
    assert "error" not in result, f"{output} on the {mesh} mesh: {result['error']}"
    return result


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("output", ["loss", "grad"])
def test_sharded_equals_unsharded(sharded_run, mesh, output):
    """jax.jit(ctc_loss) and jax.jit(jax.grad(sum ctc_loss)) give the same numbers with the batch sharded."""
    result = _result(sharded_run, mesh, output)
    tolerance = TOLERANCE["float64"] if output == "loss" else TOLERANCE["gradient_float64"]
    np.testing.assert_allclose(np.array(result["value"]), np.array(sharded_run["expected"][output]), **tolerance)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("output", ["loss", "grad"])
def test_outputs_stay_sharded_along_the_batch(sharded_run, mesh, output):
    """Each device holds its B/4 rows of the result; nothing was gathered onto one device."""
    result = _result(sharded_run, mesh, output)
    batch = len(result["value"])
    assert result["batch_sharded"], f"{output} has sharding spec {result['spec']}, not batch-sharded"
    assert result["shard_devices"] == sorted(set(result["shard_devices"])) and len(result["shard_devices"]) == DEVICES
    assert [shape[0] for shape in result["shard_shapes"]] == [batch // DEVICES] * DEVICES, result["shard_shapes"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("output", ["loss", "grad"])
def test_no_cross_device_traffic(sharded_run, mesh, output):
    """Each sequence's loss needs only its own rows: the compiled program has no all-gather or any other collective."""
    assert _result(sharded_run, mesh, output)["collectives"] == []


MIXED_DEVICES_CHILD = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import ctc_multi
    from ctc_multi.shapes import Shape, random_problem

    logits, logit_paddings, labels, label_paddings = random_problem(Shape("mixed", B=8, T=20, K=6, N=5), seed=4)
    expected = ctc_multi.ctc_loss(logits, logit_paddings, labels, label_paddings)
    first, second = jax.devices()[:2]
    results = {}
    # JAX labels and paddings committed to another device than the logits
    on_first = jax.device_put(jnp.asarray(logits), first)
    loss = ctc_multi.ctc_loss(on_first, jax.device_put(jnp.asarray(logit_paddings), second), jax.device_put(jnp.asarray(labels), second), label_paddings)
    results["committed elsewhere"] = dict(value=np.asarray(loss).tolist(), devices=sorted(d.id for d in loss.devices()))
    # NumPy and other-device arguments beside logits sharded over each kind of mesh
    for kind in ("Auto", "Explicit"):
        mesh = jax.make_mesh((4,), ("batch",), axis_types=(getattr(AxisType, kind),))
        sharded = jax.device_put(jnp.asarray(logits), NamedSharding(mesh, P("batch")))
        loss = ctc_multi.ctc_loss(sharded, logit_paddings, jax.device_put(jnp.asarray(labels), first), label_paddings)
        results[kind] = dict(value=np.asarray(loss).tolist(), batch_sharded=loss.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), 1))
    # The gradient, with NumPy, torch-free and unplaced JAX arguments beside explicit-axes
    # logits: ops refused to mix them with the batch-sharded logits ("Incompatible types for
    # matmul", "All operands should have the same sharding") under jax.grad and jax.jit.
    expected_gradient = jax.grad(lambda x: ctc_multi.ctc_loss(x, logit_paddings, labels, label_paddings).sum())(jnp.asarray(logits))
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Explicit,))
    sharded = jax.device_put(jnp.asarray(logits), NamedSharding(mesh, P("batch")))
    gradients = {}
    for form, convert in (("numpy", np.asarray), ("unplaced jax", jnp.asarray)):
        others = [convert(a) for a in (logit_paddings, labels, label_paddings)]
        summed = lambda x: ctc_multi.ctc_loss(x, *others).sum()
        with jax.set_mesh(mesh):
            for way, function in (("grad", jax.grad(summed)), ("jit of grad", jax.jit(jax.grad(summed)))):
                gradient = function(sharded)
                gradients[f"{form}, {way}"] = dict(
                    difference=float(np.abs(np.asarray(gradient) - np.asarray(expected_gradient)).max()),
                    batch_sharded=jax.typeof(gradient).sharding.spec[0] == "batch",
                )
        try:  # traced without the mesh that resharding needs: an error that says what to do
            jax.jit(jax.grad(summed))(sharded)
            gradients[f"{form}, no mesh"] = "no error"
        except ValueError as error:
            gradients[f"{form}, no mesh"] = str(error)
    # lengths_to_paddings of batch-sharded lengths, eagerly: its positions were sharded over the
    # batch's devices (refused for 21 positions on 4 devices; a (B, T) result sharded along T)
    lengths = np.array([3, 1, 21, 0, 5, 7, 9, 2], np.int32)
    paddings = {}
    for kind in ("Auto", "Explicit"):
        mesh = jax.make_mesh((4,), ("batch",), axis_types=(getattr(AxisType, kind),))
        made = ctc_multi.lengths_to_paddings(jax.device_put(lengths, NamedSharding(mesh, P("batch"))), 21)
        paddings[kind] = dict(valid=np.asarray(made == 0).sum(axis=1).tolist(), batch_sharded=made.sharding.is_equivalent_to(NamedSharding(mesh, P("batch")), 2))
    print(json.dumps(dict(expected=np.asarray(expected).tolist(), results=results, gradients=gradients, paddings=paddings)))
    """
)


def test_arguments_on_other_devices_than_the_logits():
    """Labels and paddings committed to another JAX device than the logits crashed (JAX's
    "incompatible devices", naming no argument), and NumPy paddings beside logits sharded over a
    mesh with explicit axes were refused as "must hold numbers". Both are converted by value
    (README, Examples): the same losses, and the logits' batch sharding kept. Beside explicit-axes
    logits they are also sharded like them, so that their gradient works (under jax.set_mesh,
    which JAX requires there; without it, an error saying so); and lengths_to_paddings keeps the
    lengths' batch sharding."""
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", MIXED_DEVICES_CHILD], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, f"the run failed:\n{done.stderr[-4000:]}"
    output = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in output["results"].items():
        np.testing.assert_allclose(result["value"], output["expected"], **TOLERANCE["float32"], err_msg=name)
    assert output["results"]["committed elsewhere"]["devices"] == [0]
    assert output["results"]["Auto"]["batch_sharded"] and output["results"]["Explicit"]["batch_sharded"]
    for name, result in output["gradients"].items():
        if name.endswith("no mesh"):
            assert result.startswith("logit_paddings must be sharded along its batch axis as the logits are"), (name, result)
            assert "jax.set_mesh" in result
        else:
            assert result["difference"] < 1e-6 and result["batch_sharded"], (name, result)
    for kind, result in output["paddings"].items():
        assert result["valid"] == [3, 1, 21, 0, 5, 7, 9, 2] and result["batch_sharded"], (kind, result)


def readme_block(containing: str) -> str:
    """The README's ```python block that contains ``containing``."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} README blocks contain {containing!r}"
    return found[0]


def test_the_readmes_data_parallel_training_step_runs_on_four_devices():
    """The README's JAX training step used a model, parameters and features it never defined;
    it now runs as written. Here on 4 simulated devices: the loss is finite and falls, and the
    step's loss came from a batch sharded over all four."""
    pytest.importorskip("optax")
    script = readme_block("def train_step") + textwrap.dedent(
        """
        import json
        print(json.dumps(dict(devices=jax.device_count(), sharded=batch[0].sharding.is_equivalent_to(data, 3), batch=B)))
        """
    )
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, f"the README's block failed:\n{done.stderr[-4000:]}"
    *steps, last = done.stdout.strip().splitlines()
    losses = [float(line.split()[1]) for line in steps]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > losses[1] > losses[2], losses
    assert json.loads(last) == dict(devices=DEVICES, sharded=True, batch=8 * DEVICES)
