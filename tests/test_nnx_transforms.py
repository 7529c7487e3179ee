"""wrapkit.nnx wrappers under NNX's and JAX's transforms, in graph and in tree mode.

Every test checks the two promises of a wrapkit.nnx wrapper: a forward pass leaves every
raw Param bit-identical, and outputs (and gradients) equal a forward pass written by hand
with the effective weight. flax 0.12.8 selects tree mode in two ways, and both are tested:
``nnx.set_graph_mode(False)`` around the code, or ``graph=False`` passed to a transform
(the wrapper's own split then still runs in graph mode); a plain ``jax.jit`` takes the module
as a pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wrapkit import _numerics
from wrapkit._family import spectral_norm
from wrapkit.nnx import FakeQuant, LoRA, SpectralNorm, WeightNorm, WeightStandardization, Wrapper

X = jax.random.normal(jax.random.key(7), (2, 3))
NORMAL = nnx.initializers.normal(1.0)


class Doubled(Wrapper):
    """Doubles each kernel; no variables of its own."""

    default_filter = ("kernel",)

    def transform(self, leaf):
        return 2 * leaf.value


class Counted(Wrapper):
    """Doubles each kernel and counts, in a BatchStat of its own, how often it did."""

    default_filter = ("kernel",)

    def create(self, leaf, rngs):
        return {"calls": nnx.BatchStat(jnp.zeros((), jnp.int32))}

    def transform(self, leaf):
        calls = self.own("calls", leaf)
        calls[...] = calls[...] + 1
        return 2 * leaf.value


class Scaled(Wrapper):
    """Multiplies each kernel by a call option."""

    default_filter = ("kernel",)

    def transform(self, leaf, *, factor=1.0):
        return factor * leaf.value


class Shifted(Wrapper):
    """Adds a required call option to each kernel, and takes ``factor`` too."""

    default_filter = ("kernel",)

    def transform(self, leaf, *, shift, factor=1.0):
        return leaf.value + shift * factor


def linear(features_in=3, features_out=4, seed=0, **kwargs):
    return nnx.Linear(features_in, features_out, bias_init=NORMAL, rngs=nnx.Rngs(seed), **kwargs)


def normalised(v, scale, axis=0):
    return v / jnp.sqrt(jnp.sum(v * v, axis=axis, keepdims=True) + 1e-12) * scale


@dataclasses.dataclass(frozen=True)
class Case:
    """A wrapper, and the effective kernel of a wrapped Linear written by hand from the
    pure dict of its Params (with ``_numerics``'s functions, whose maths their own tests
    check: here it is the wiring through the transforms that is tested)."""

    wrap: Callable[[nnx.Module, nnx.Rngs], nnx.Module]
    # (pure dict of the Params, pure dict of the BatchStats before the call) -> kernel
    kernel: Callable[[dict[str, Any], dict[str, Any]], jax.Array]
    counts: bool = False

    def build(self) -> nnx.Module:
        """The wrapped ``Linear(3, 4)``."""
        return self.wrap(linear(), nnx.Rngs(1))


CASES = {
    "WeightNorm": Case(
        lambda layer, rngs: WeightNorm(layer, scale_init=NORMAL, rngs=rngs),
        lambda p, s: normalised(p["layer_instance"]["kernel"], p["scale"]["kernel"]),
    ),
    "Counted": Case(
        lambda layer, rngs: Counted(layer),
        lambda p, s: 2 * p["layer_instance"]["kernel"],
        counts=True,
    ),
    "LoRA": Case(
        # B starts random rather than at zero, so that the delta is not zero.
        lambda layer, rngs: LoRA(layer, rank=2, alpha=4.0, b_init=NORMAL, rngs=rngs),
        lambda p, s: (
            jax.lax.stop_gradient(p["layer_instance"]["kernel"])
            + 2.0 * p["lora_a"]["kernel"] @ p["lora_b"]["kernel"]
        ),
    ),
    "SpectralNorm": Case(
        lambda layer, rngs: SpectralNorm(layer, rngs=rngs),
        lambda p, s: spectral_norm.normalized(
            p["layer_instance"]["kernel"], s["u"]["kernel"], 1, 1e-12, None
        )[0],
    ),
    "WeightStandardization": Case(
        lambda layer, rngs: WeightStandardization(layer),
        lambda p, s: _numerics.standardize(p["layer_instance"]["kernel"], axis=(0,), eps=1e-10),
    ),
    "FakeQuant": Case(
        lambda layer, rngs: FakeQuant(layer, bits=4),
        lambda p, s: _numerics.fake_quantize(
            p["layer_instance"]["kernel"], 4, symmetric=True, axis=(0,)
        ),
    ),
}


def bias(params):
    while "layer_instance" in params:
        params = params["layer_instance"]
    return params["bias"]


def hand(case, params, x, stats=None):
    return x @ case.kernel(params, stats) + bias(params)


def params_of(module):
    """The pure dict of the module's Params."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def stats_of(module):
    """The pure dict of the module's BatchStats (SpectralNorm's ``u``)."""
    return nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))


def assert_untouched(module, params):
    """Every Param of ``module`` is bit-identical to ``params`` (taken before the calls)."""
    jax.tree.map(np.testing.assert_array_equal, params_of(module), params)


def assert_close(actual, expected):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), actual, expected
    )


def assert_counted(case, module, calls):
    if case.counts:
        np.testing.assert_array_equal(module.calls["kernel"][...], calls)


# (graph mode around the test, keyword arguments of every NNX transform)
MODES = {
    "graph": (True, {}),
    "tree-set_graph_mode": (False, {}),
    "tree-graph=False": (True, {"graph": False}),
}


@pytest.fixture(params=list(MODES))
def mode(request):
    graph, kwargs = MODES[request.param]
    with nnx.set_graph_mode(graph):
        yield kwargs


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


@pytest.fixture(params=["WeightNorm", "Counted", "LoRA"])
def core_case(request):
    """The cases of the tests that need not run every wrapper: one with a learned scale,
    one with a statistic of its own, and the unmerged low-rank path."""
    return CASES[request.param]


def grads_of(transform, model, loss, mode):
    """``transform`` (nnx.grad or nnx.value_and_grad) of ``loss(model)`` with respect to the
    model's Params, as tree mode wants it: split, the Params differentiated, the rest (the
    integer count) passed along."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    found = transform(lambda p, r: loss(nnx.merge(graphdef, p, r)), **mode)(params, rest)
    if transform is nnx.value_and_grad:
        return found[0], nnx.to_pure_dict(found[1])
    return nnx.to_pure_dict(found)


# --- each transform: raw Params untouched, the hand-written forward's outputs ----------


def test_eager(mode, case):
    model = case.build()
    params, stats = params_of(model), stats_of(model)
    assert_close(model(X), hand(case, params, X, stats))
    assert_untouched(model, params)
    assert_counted(case, model, 1)


def test_nnx_jit(mode, case):
    model = case.build()
    params, stats = params_of(model), stats_of(model)
    out = nnx.jit(lambda m, x: m(x), **mode)(model, X)
    assert_close(out, hand(case, params, X, stats))
    assert_untouched(model, params)
    assert_counted(case, model, 1)


def test_nnx_grad(mode, case):
    model = case.build()
    params, stats = params_of(model), stats_of(model)
    grads = grads_of(nnx.grad, model, lambda m: jnp.sum(m(X) ** 2), mode)
    expected = jax.grad(lambda p: jnp.sum(hand(case, p, X, stats) ** 2))(params)
    assert_close(grads, expected)
    assert_untouched(model, params)
    assert_counted(case, model, 1)


def test_nnx_value_and_grad(mode, core_case):
    model = core_case.build()
    params = params_of(model)
    value, grads = grads_of(nnx.value_and_grad, model, lambda m: jnp.sum(m(X) ** 2), mode)
    expected_value, expected = jax.value_and_grad(lambda p: jnp.sum(hand(core_case, p, X) ** 2))(
        params
    )
    assert_close((value, grads), (expected_value, expected))
    assert_untouched(model, params)
    assert_counted(core_case, model, 1)


def test_nnx_grad_of_the_module_itself(mode):
    """The graph-mode idiom, nnx.grad of the module: the raw kernel's and the scale's
    gradients are jax.grad's of the hand-written forward."""
    case = CASES["WeightNorm"]
    model = case.build()
    params = params_of(model)
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2), **mode)(model)
    grads = grads if isinstance(grads, nnx.State) else nnx.state(grads, nnx.Param)
    expected = jax.grad(lambda p: jnp.sum(hand(case, p, X) ** 2))(params)
    assert_close(nnx.to_pure_dict(grads), expected)
    assert float(jnp.abs(expected["scale"]["kernel"]).min()) > 0  # the scale is learned
    assert_untouched(model, params)


def test_nnx_vmap_over_inputs(mode, core_case):
    model = core_case.build()
    params = params_of(model)
    xs = jax.random.normal(jax.random.key(3), (5, 2, 3))
    out = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), **mode)(model, xs)
    assert_close(out, jax.vmap(lambda x: hand(core_case, params, x))(xs))
    assert_untouched(model, params)
    assert_counted(core_case, model, 1)


def test_nnx_remat(mode, core_case):
    model = core_case.build()
    params = params_of(model)
    out = nnx.remat(lambda m, x: m(x), **mode)(model, X)
    assert_close(out, hand(core_case, params, X))
    grads = grads_of(
        nnx.grad, model, lambda m: jnp.sum(nnx.remat(lambda m, x: m(x), **mode)(m, X)), mode
    )
    assert_close(grads, jax.grad(lambda p: jnp.sum(hand(core_case, p, X)))(params))
    assert_untouched(model, params)
    assert_counted(core_case, model, 2)


def test_nnx_cond(mode, core_case):
    model = core_case.build()
    params = params_of(model)
    run = nnx.jit(
        lambda m, x, b: nnx.cond(b, lambda m, x: m(x), lambda m, x: -m(2 * x), m, x, **mode),
        **mode,
    )
    assert_close(run(model, X, jnp.asarray(True)), hand(core_case, params, X))
    assert_counted(core_case, model, 1)  # both branches traced, one taken
    assert_close(run(model, X, jnp.asarray(False)), -hand(core_case, params, 2 * X))
    assert_untouched(model, params)
    assert_counted(core_case, model, 2)


def stacked(case, layers=3):
    """``layers`` wrapped Linear(4, 4)s made by nnx.vmap of a constructor: Params stacked."""

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return case.wrap(nnx.Linear(4, 4, bias_init=NORMAL, rngs=rngs), rngs)

    return make(nnx.Rngs(0))


def test_nnx_scan_over_a_stack_made_with_nnx_vmap(mode, core_case):
    layers = stacked(core_case)
    params = params_of(layers)
    assert bias(params).shape == (3, 4)
    x = jax.random.normal(jax.random.key(4), (2, 4))

    def run(layers, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, **mode)
        def step(x, layer):
            return jnp.tanh(layer(x))

        return step(x, layers)

    def by_hand(params, x):
        for layer in range(3):
            x = jnp.tanh(hand(core_case, jax.tree.map(lambda leaf, i=layer: leaf[i], params), x))
        return x

    assert_close(run(layers, x), by_hand(params, x))
    grads = grads_of(nnx.grad, layers, lambda m: jnp.sum(run(m, x) ** 2), mode)
    assert_close(grads, jax.grad(lambda p: jnp.sum(by_hand(p, x) ** 2))(params))
    assert_untouched(layers, params)
    if core_case.counts:  # each layer's own count, updated through the scan
        np.testing.assert_array_equal(layers.calls["kernel"][...], [2, 2, 2])


def test_plain_jax_jit_and_grad_take_the_module_as_a_pytree(case):
    model = case.build()
    params, stats = params_of(model), stats_of(model)
    out = jax.jit(lambda m, x: m(x))(model, X)
    assert_close(out, hand(case, params, X, stats))
    if not case.counts:  # jax.grad differentiates every leaf: floating-point ones only
        grads = jax.grad(lambda m: jnp.sum(m(X) ** 2))(model)
        expected = jax.grad(lambda p: jnp.sum(hand(case, p, X, stats) ** 2))(params)
        assert_close(params_of(grads), expected)
    assert_untouched(model, params)
    # Under plain jax.jit the module inside is a copy: its count's update stays there.
    assert_counted(case, model, 0)


def test_a_stack_under_nnx_jit_and_grad(mode):
    layer = linear()
    model = Counted(WeightNorm(layer, scale_init=NORMAL, rngs=nnx.Rngs(1)))
    params = params_of(model)

    def by_hand(p, x):
        inner = p["layer_instance"]
        return (
            x @ (2 * normalised(inner["layer_instance"]["kernel"], inner["scale"]["kernel"]))
            + (inner["layer_instance"]["bias"])
        )

    out = nnx.jit(lambda m, x: m(x), **mode)(model, X)
    assert_close(out, by_hand(params, X))
    grads = grads_of(nnx.grad, model, lambda m: jnp.sum(m(X) ** 2), mode)
    assert_close(grads, jax.grad(lambda p: jnp.sum(by_hand(p, X) ** 2))(params))
    assert_untouched(model, params)
    np.testing.assert_array_equal(model.calls["kernel"][...], 2)


# --- every way an NNX module holds submodules -------------------------------------------


class Attributes(nnx.Module):
    def __init__(self):
        self.a = linear(3, 4, seed=0)
        self.b = linear(4, 2, seed=1)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


class InList(nnx.Module):
    def __init__(self, holder):
        self.layers = holder([linear(3, 4, seed=0), linear(4, 2, seed=1)])

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


class InDict(nnx.Module):
    def __init__(self, holder):
        self.layers = holder({"a": linear(3, 4, seed=0), "b": linear(4, 2, seed=1)})

    def __call__(self, x):
        return self.layers["b"](jnp.tanh(self.layers["a"](x)))


CONTAINERS = {
    "attributes": (Attributes, ("a", "b")),
    "nnx.List": (lambda: InList(nnx.List), ("layers/0", "layers/1")),
    "list": (lambda: InList(nnx.data), ("layers/0", "layers/1")),
    "nnx.Dict": (lambda: InDict(nnx.Dict), ("layers/a", "layers/b")),
    "dict": (lambda: InDict(nnx.data), ("layers/a", "layers/b")),
    "nnx.Sequential": (
        lambda: nnx.Sequential(linear(3, 4, seed=0), jnp.tanh, linear(4, 2, seed=1)),
        ("layers/0", "layers/2"),
    ),
}


def lookup(params, path):
    for key in path.split("/"):
        params = params[int(key) if key.isdigit() else key]  # list indices are ints
    return params


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_every_way_of_holding_submodules_is_transformed(mode, container):
    make, paths = CONTAINERS[container]
    model = WeightNorm(make(), scale_init=NORMAL, rngs=nnx.Rngs(2))
    assert sorted(model.scale) == [f"{path}/kernel" for path in paths]
    params = params_of(model)

    def layer(p, path):
        kernel = lookup(p["layer_instance"], f"{path}/kernel")
        return normalised(kernel, p["scale"][f"{path}/kernel"]), lookup(
            p["layer_instance"], f"{path}/bias"
        )

    def by_hand(p, x):
        (k1, b1), (k2, b2) = (layer(p, path) for path in paths)
        return jnp.tanh(x @ k1 + b1) @ k2 + b2

    assert_close(model(X), by_hand(params, X))
    assert_close(nnx.jit(lambda m, x: m(x), **mode)(model, X), by_hand(params, X))
    grads = grads_of(nnx.grad, model, lambda m: jnp.sum(m(X) ** 2), mode)
    assert_close(grads, jax.grad(lambda p: jnp.sum(by_hand(p, X) ** 2))(params))
    assert_untouched(model, params)


class Twice(nnx.Module):
    """One Linear held under two names and called twice."""

    def __init__(self):
        self.lin = linear(3, 3)
        self.alias = self.lin

    def __call__(self, x):
        return self.alias(jnp.tanh(self.lin(x)))


class Tied(nnx.Module):
    """Two Linears holding one kernel Variable."""

    def __init__(self):
        self.a = linear(3, 3, seed=0)
        self.b = linear(3, 3, seed=1)
        self.b.kernel = self.a.kernel

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def test_a_shared_module_is_transformed_once_per_call_and_both_uses_see_the_same_weight():
    model = Counted(Twice())
    assert list(model.calls) == ["alias/kernel"]  # the one Variable, at its first path
    params = params_of(model)
    kernel = 2 * params["layer_instance"]["alias"]["kernel"]
    b = params["layer_instance"]["alias"]["bias"]
    expected = jnp.tanh(X @ kernel + b) @ kernel + b
    assert_close(model(X), expected)
    assert_close(nnx.jit(lambda m, x: m(x))(model, X), expected)
    assert_untouched(model, params)
    np.testing.assert_array_equal(model.calls["alias/kernel"][...], 2)  # once per call
    assert model.layer_instance.lin is model.layer_instance.alias


def test_a_tied_variable_gets_one_effective_value_and_both_uses_gradients():
    model = WeightNorm(Tied(), scale_init=NORMAL, rngs=nnx.Rngs(2))
    assert list(model.scale) == ["a/kernel"]
    params = params_of(model)

    def by_hand(p, x):
        inner = p["layer_instance"]
        kernel = normalised(inner["a"]["kernel"], p["scale"]["a/kernel"])
        return jnp.tanh(x @ kernel + inner["a"]["bias"]) @ kernel + inner["b"]["bias"]

    assert_close(model(X), by_hand(params, X))
    grads = nnx.grad(lambda m: jnp.sum(nnx.jit(lambda m, x: m(x))(m, X) ** 2))(model)
    assert_close(nnx.to_pure_dict(grads), jax.grad(lambda p: jnp.sum(by_hand(p, X) ** 2))(params))
    assert_untouched(model, params)
    assert model.layer_instance.b.kernel is model.layer_instance.a.kernel


@pytest.mark.parametrize("make", [Twice, Tied], ids=["shared module", "tied variable"])
def test_tree_mode_refuses_shared_references_as_flax_does(make):
    with (
        nnx.set_graph_mode(False),
        pytest.raises(
            ValueError, match=r"Tree mode \(graph=False\) does not support shared references"
        ),
    ):
        WeightNorm(make())


class Apply(nnx.Module):
    def __init__(self):
        self.lin = linear(3, 3)

    def __call__(self, x, other):
        return other(self.lin(x))


def test_a_module_passed_to_the_call_that_holds_selected_variables_is_refused():
    model = WeightNorm(Apply())
    with pytest.raises(
        TypeError,
        match=r"WeightNorm\(Apply\)\.__call__ was passed a Linear whose kernel the wrapper "
        r"would transform, but a wrapper transforms only the module it wraps\. Make it part "
        r"of the wrapped module \(an attribute\) or wrap it itself\.",
    ):
        model(X, linear(3, 3, seed=1))
    # One whose variables the wrapper would not select is fine.
    norm = nnx.LayerNorm(3, rngs=nnx.Rngs(0))
    params = params_of(model)
    kernel = normalised(params["layer_instance"]["lin"]["kernel"], params["scale"]["lin/kernel"])
    assert_close(model(X, norm), norm(X @ kernel + params["layer_instance"]["lin"]["bias"]))


# --- stateful inner modules: the view shares their Variables ------------------------------


class Normalised(nnx.Module):
    def __init__(self):
        self.lin = linear(3, 4)
        self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.bn(self.lin(x))


def test_an_inner_batch_norms_running_statistics_update_through_the_wrapper(mode):
    model = WeightNorm(Normalised(), scale_init=NORMAL, rngs=nnx.Rngs(2))
    params = params_of(model)
    kernel = normalised(params["layer_instance"]["lin"]["kernel"], params["scale"]["lin/kernel"])
    x = jax.random.normal(jax.random.key(6), (16, 3))
    hidden = x @ kernel + params["layer_instance"]["lin"]["bias"]
    mean, var = hidden.mean(axis=0), hidden.var(axis=0)
    out = nnx.jit(lambda m, x: m(x), **mode)(model, x)
    assert_close(out, (hidden - mean) / jnp.sqrt(var + 1e-5))
    bn = model.layer_instance.bn
    assert_close((bn.mean[...], bn.var[...]), (0.01 * mean, 0.99 + 0.01 * var))
    model(x)  # eagerly too: a second update
    assert_close((bn.mean[...], bn.var[...]), (0.0199 * mean, 0.9801 + 0.0199 * var))
    assert_untouched(model, params)


class Dropped(nnx.Module):
    def __init__(self):
        self.lin = linear(3, 4)
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=5))

    def __call__(self, x):
        return self.drop(self.lin(x))


def test_an_inner_dropouts_rng_count_advances_through_the_wrapper(mode):
    model = Doubled(Dropped())
    params = params_of(model)
    hidden = (
        X @ (2 * params["layer_instance"]["lin"]["kernel"])
        + (params["layer_instance"]["lin"]["bias"])
    )
    twin = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=5))  # the same stream, by hand
    count = model.layer_instance.drop.rngs.count
    assert_close(nnx.jit(lambda m, x: m(x), **mode)(model, X), twin(hidden))
    assert int(count[...]) == 1
    assert_close(model(X), twin(hidden))  # a new mask, the twin's second
    assert int(count[...]) == 2
    assert_untouched(model, params)


# --- an RNN -------------------------------------------------------------------------------


def lstm_by_hand(p, scale, xs):
    """flax's LSTMCell written out, each kernel normalised: gates from ``i*`` (input, no
    bias) and ``h*`` (hidden, with bias) Linears."""

    def kernel(name):
        return normalised(p[name]["kernel"], scale[f"{name}/kernel"])

    h = c = jnp.zeros((xs.shape[0], 4))
    outputs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]

        def gate(i, hidden, x=x, h=h):
            return x @ kernel(i) + h @ kernel(hidden) + p[hidden]["bias"]

        i = jax.nn.sigmoid(gate("ii", "hi"))
        f = jax.nn.sigmoid(gate("if_", "hf"))
        g = jnp.tanh(gate("ig", "hg"))
        o = jax.nn.sigmoid(gate("io", "ho"))
        c = f * c + i * g
        h = o * jnp.tanh(c)
        outputs.append(h)
    return jnp.stack(outputs, axis=1)


def test_an_rnn_of_a_wrapped_lstm_cell(mode):
    cell = WeightNorm(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)), scale_init=NORMAL, rngs=nnx.Rngs(1))
    assert len(cell.scale) == 8  # the kernels of the four input and four hidden Linears
    rnn = nnx.RNN(cell)
    params = params_of(cell)
    xs = jax.random.normal(jax.random.key(5), (2, 5, 3))
    # initialize_carry is not delegated: it reads none of the kernels, so it runs.
    carry = cell.initialize_carry((2, 3), nnx.Rngs(0))
    assert_close(carry, cell.layer_instance.initialize_carry((2, 3), nnx.Rngs(0)))
    out = rnn(xs)
    assert bool(jnp.isfinite(out).all())
    expected = lstm_by_hand(params["layer_instance"], params["scale"], xs)
    assert_close(out, expected)
    assert_close(nnx.jit(lambda r, x: r(x), **mode)(rnn, xs), expected)
    # The same as running the cell with the normalised kernels folded in by hand.
    folded = nnx.clone(cell.layer_instance)
    for path, scale in cell.scale.items():
        variable = getattr(folded, path.split("/")[0]).kernel
        variable[...] = normalised(variable[...], scale[...])
    assert_close(nnx.RNN(folded)(xs), out)
    assert_untouched(cell, params)


# --- call options, attributes, methods that are not delegated -----------------------------


def test_call_options_reach_every_wrapper_of_a_stack_and_not_the_inner_module(mode):
    model = Scaled(Shifted(linear()))
    params = params_of(model)
    raw_kernel, b = params["layer_instance"]["layer_instance"]["kernel"], bias(params)

    def expected(factor, shift):
        return X @ (factor * (raw_kernel + shift * factor)) + b

    assert_close(model(X, factor=3.0, shift=0.5), expected(3.0, 0.5))
    assert_close(model(X, shift=0.5), expected(1.0, 0.5))  # factor's default, in both
    jitted = nnx.jit(lambda m, x, factor: m(x, factor=factor, shift=0.25), **mode)
    assert_close(jitted(model, X, 2.0), expected(2.0, 0.25))
    assert_untouched(model, params)
    with pytest.raises(
        TypeError,
        match=r"Shifted\(Linear\)\.__call__\(\) needs the keyword argument 'shift': Shifted "
        r"takes it on every delegated call \(it is not passed to Linear\)\.",
    ):
        model(X, factor=2.0)


def test_attribute_reads_are_forwarded_and_submodules_are_not():
    model = WeightNorm(linear())
    assert (model.in_features, model.out_features, model.use_bias) == (3, 4, True)
    with pytest.raises(
        AttributeError,
        match=r"WeightNorm\(Linear\): 'kernel' holds a submodule or variable of the Linear it "
        r"wraps; used through the wrapper it would run on untransformed weights\.",
    ):
        model.kernel  # noqa: B018
    sequential = WeightNorm(nnx.Sequential(linear(), jnp.tanh))
    with pytest.raises(
        AttributeError,
        match=r"'layers' holds a submodule or variable of the Sequential it wraps; .* Delegate "
        r"a method of Sequential that uses it \(delegates=\.\.\.\), or wrap it itself\.",
    ):
        sequential.layers  # noqa: B018
    with pytest.raises(
        AttributeError,
        match=r"WeightNorm\(Linear\) has no attribute 'nope', and neither has the Linear it wraps",
    ):
        model.nope  # noqa: B018


class Coder(nnx.Module):
    def __init__(self):
        self.enc = linear(3, 2)
        self.dec = linear(2, 3, seed=1)

    def encode(self, x):
        return self.enc(x)

    def code_size(self):
        return self.enc.out_features

    def __call__(self, x):
        return self.dec(self.encode(x))


def test_a_method_that_is_not_delegated_cannot_read_selected_variables():
    model = WeightNorm(Coder())
    assert model.code_size() == 2  # reads no selected variable: runs
    with pytest.raises(
        TypeError,
        match=r"WeightNorm\(Coder\) does not delegate 'encode', and Coder\.encode reads "
        r"enc/kernel, which WeightNorm transforms: run on the raw value it would skip the "
        r"wrapper\. Build the wrapper with delegates=\('__call__', 'encode'\)\.",
    ):
        model.encode(X)
    delegating = WeightNorm(Coder(), delegates=("__call__", "encode"))
    params = params_of(delegating)
    kernel = normalised(params["layer_instance"]["enc"]["kernel"], params["scale"]["enc/kernel"])
    assert_close(delegating.encode(X), X @ kernel + params["layer_instance"]["enc"]["bias"])
    assert_untouched(delegating, params)
