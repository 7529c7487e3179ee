"""A wrapper transforms every variable its inner call reaches, however the module holds it.

Each test builds a wrapped model and checks its output against a hand-written forward: the
same model without the wrapper, run on variables normalised by hand in numpy.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrapkit.linen import SpectralNorm, WeightNorm, Wrapper, _wrapper

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
SEQ = jnp.linspace(-1.0, 1.0, 2 * 3 * 3).reshape(2, 3, 3)  # (batch, time, features)


def normalised(kernel, scale):
    """Weight normalisation by hand: one norm per output feature (the last axis)."""
    kernel = np.asarray(kernel, np.float64)
    norm = np.sqrt((kernel**2).sum(axis=tuple(range(kernel.ndim - 1)), keepdims=True))
    return kernel / norm * np.asarray(scale, np.float64)


def randomise_scales(variables, seed=1):
    """Scales drawn at random, so a scale applied to the wrong kernel shows."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 2.0)
        if jax.tree_util.keystr(path).endswith("scale']")
        else leaf
        for k, (path, leaf) in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def by_hand(params, wrapper_name):
    """``params`` with every kernel the wrapper has a scale for normalised, scales removed."""
    params = jax.tree_util.tree_map(np.asarray, dict(params))
    scales = params.pop(wrapper_name)
    for name, scale in scales.items():
        *path, leaf, _ = name.split("/")
        tree = params
        for key in path:
            tree = tree[key]
        tree[leaf] = normalised(tree[leaf], scale)
    return params


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)


class Block(nn.Module):
    """A module with a Dense of its own and one passed in by its parent."""

    sub: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.sub(nn.relu(nn.Dense(4, name="own")(x)))


class SetupEncoder(nn.Module):
    def setup(self):
        self.enc = nn.Dense(4)
        self.dec = nn.Dense(3)

    def __call__(self, x):
        return self.dec(nn.relu(self.enc(x)))


class Layers(nn.Module):
    """Submodules held in a list, a tuple and a dict, one of them twice."""

    listed: list
    paired: tuple
    named: dict

    def __call__(self, x):
        for layer in [*self.listed, *self.paired]:
            x = nn.relu(layer(x))
        return self.named["out"](x) + self.listed[0](x)


def model_pair(build):
    """``build(wrap)`` with and without WeightNorm, as two Top modules."""

    class Top(nn.Module):
        wrapped: bool

        @nn.compact
        def __call__(self, x):
            return build(WeightNorm if self.wrapped else (lambda module: module))(x)

    return Top(wrapped=True), Top(wrapped=False)


CASES = {
    "sequential": lambda wrap: wrap(nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])),
    "own-and-passed-in": lambda wrap: wrap(Block(nn.Dense(2))),
    "setup": lambda wrap: wrap(SetupEncoder()),
    "list-tuple-dict-shared": lambda wrap: wrap(
        (lambda shared: Layers([shared, nn.Dense(3)], (nn.Dense(3),), {"out": nn.Dense(3)}))(
            nn.Dense(3)
        )
    ),
    "bidirectional": lambda wrap: (
        lambda x: wrap(nn.Bidirectional(nn.RNN(nn.LSTMCell(4)), nn.RNN(nn.GRUCell(4))))(
            jnp.tile(x[:, None, :], (1, 2, 1))
        )
    ),
}


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_every_kernel_the_call_reaches_is_normalised_once(build, transform):
    wrapped, plain = model_pair(build)
    variables = randomise_scales(wrapped.init(jax.random.key(0), X))
    scales = variables["params"]["WeightNorm_0"]
    kernels = [
        path
        for path, _ in jax.tree_util.tree_flatten_with_path(plain.init(jax.random.key(0), X))[0]
        if jax.tree_util.keystr(path, simple=True, separator="/").endswith("kernel")
    ]
    # One scale per kernel of the plain model: every kernel is reached, none twice.
    assert len(scales) == len(kernels)
    expected = plain.apply({"params": by_hand(variables["params"], "WeightNorm_0")}, X)
    assert_close(transform(wrapped.apply)(variables, X), expected)


def test_a_wrapped_block_that_holds_a_wrapper_leaves_that_wrappers_scale_alone():
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(nn.Dense(3))(nn.Dense(4)(x))

    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(Inner())(x)

    variables = randomise_scales(Top().init(jax.random.key(0), X))
    params = variables["params"]
    # The outer wrapper has scales for both kernels, and none for the inner wrapper's scale.
    assert set(params["WeightNorm_0"]) == {
        "Inner_0/Dense_0/kernel/scale",
        "Inner_0/Dense_1/kernel/scale",
    }
    # Dense_0 is built first, inside the inner WeightNorm; Dense_1 runs first.
    inner_scale = params["Inner_0"]["WeightNorm_0"]["Dense_0/kernel/scale"]
    first, second = params["Inner_0"]["Dense_1"], params["Inner_0"]["Dense_0"]
    outer = params["WeightNorm_0"]
    k1 = normalised(first["kernel"], outer["Inner_0/Dense_1/kernel/scale"])
    # The outer view normalises the kernel, then the inner wrapper normalises that view.
    k0 = normalised(
        normalised(second["kernel"], outer["Inner_0/Dense_0/kernel/scale"]), inner_scale
    )
    hidden = np.asarray(X) @ k1 + np.asarray(first["bias"])
    assert_close(Top().apply(variables, X), hidden @ k0 + np.asarray(second["bias"]))


def test_modules_passed_as_call_arguments_are_transformed():
    class Apply(nn.Module):
        def __call__(self, x, layer):
            return layer(x)

    class Top(nn.Module):
        wrapped: bool

        @nn.compact
        def __call__(self, x):
            apply = Apply()
            return (WeightNorm(apply) if self.wrapped else apply)(x, nn.Dense(3))

    variables = randomise_scales(Top(True).init(jax.random.key(0), X))
    assert set(variables["params"]["WeightNorm_0"]) == {"Dense_0/kernel/scale"}
    expected = Top(False).apply({"params": by_hand(variables["params"], "WeightNorm_0")}, X)
    assert_close(Top(True).apply(variables, X), expected)


def test_mapped_scope_names_follow_the_scopes_map_variables_maps():
    """Pins flax's get_module_scopes order, which _mapped_scope_names relies on."""
    received = []
    view_call = _wrapper._View.__call__

    def spy(self, variables):
        received.append((self.names[self.mapped % len(self.names)], variables))
        return view_call(self, variables)

    wrapped, _ = model_pair(CASES["own-and-passed-in"])
    variables = wrapped.init(jax.random.key(0), X)
    _wrapper._View.__call__ = spy
    try:
        wrapped.apply(variables, X)
    finally:
        _wrapper._View.__call__ = view_call
    assert [name for name, _ in received] == ["Dense_0", "Block_0"]
    for name, mapped in received:
        assert jax.tree_util.tree_structure(mapped["params"]) == jax.tree_util.tree_structure(
            variables["params"][name]
        )


def test_a_submodule_reached_through_the_wrapper_is_refused():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(SetupEncoder()).enc(x)

    with pytest.raises(
        AttributeError,
        match=r"WeightNorm\(SetupEncoder_0\): 'enc' is a submodule of the SetupEncoder it "
        r"wraps; called through the wrapper it would run on untransformed weights\. Delegate "
        r"a method of SetupEncoder that calls it",
    ):
        Top().init(jax.random.key(0), X)


class WithDecode(SetupEncoder):
    def decode_only(self, x):
        return self.dec(nn.relu(x))

    def hidden_size(self, x):
        return jnp.zeros((x.shape[0], 4))


def test_a_method_that_is_not_delegated_cannot_read_a_transformed_variable():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(WithDecode()).decode_only(jnp.ones((2, 4)))

    with pytest.raises(
        TypeError,
        match=r"WeightNorm\(WithDecode_0\) does not delegate 'decode_only', and "
        r"WithDecode\.decode_only reads params/WithDecode_0/dec/kernel, which WeightNorm "
        r"transforms: run on the raw value it would skip the wrapper\. Build the wrapper "
        r"with delegates=\('__call__', 'decode_only'\)\.",
    ):
        Top().init(jax.random.key(0), X)


def test_a_method_that_reads_no_transformed_variable_passes_through():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            wrapped = WeightNorm(WithDecode())
            return wrapped(x), wrapped.hidden_size(x)

    variables = Top().init(jax.random.key(0), X)
    _, zeros = Top().apply(variables, X)
    assert zeros.shape == (2, 4) and not np.asarray(zeros).any()


def lstm_by_hand(params, scales, xs):
    """flax's LSTMCell over time, kernels normalised by hand."""
    cell = {name: dict(layer) for name, layer in params.items()}
    for name, layer in cell.items():
        layer["kernel"] = normalised(layer["kernel"], scales[f"LSTMCell_0/{name}/kernel/scale"])
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731

    def dense(name, value):
        layer = cell[name]
        return value @ layer["kernel"] + np.asarray(layer.get("bias", 0.0))

    xs = np.asarray(xs, np.float64)
    c = h = np.zeros((xs.shape[0], 4))
    outputs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        i = sigmoid(dense("ii", x) + dense("hi", h))
        f = sigmoid(dense("if", x) + dense("hf", h))
        g = np.tanh(dense("ig", x) + dense("hg", h))
        o = sigmoid(dense("io", x) + dense("ho", h))
        c = f * c + i * g
        h = o * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs, axis=1)


def test_rnn_over_a_weight_normalised_lstm_cell():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, xs):
            return nn.RNN(WeightNorm(nn.LSTMCell(4)))(xs)

    variables = randomise_scales(Top().init(jax.random.key(0), SEQ))
    params = variables["params"]
    assert len(params["WeightNorm_0"]) == 8  # every gate's kernel
    expected = lstm_by_hand(params["LSTMCell_0"], params["WeightNorm_0"], SEQ)
    assert_close(jax.jit(Top().apply)(variables, SEQ), expected)


def test_scan_over_a_weight_normalised_cell():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, xs):
            cell = WeightNorm(nn.LSTMCell(4))
            carry = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
            scan = nn.scan(
                lambda module, carry, x: module(carry, x),
                variable_broadcast="params",
                split_rngs={"params": False},
                in_axes=1,
                out_axes=1,
            )
            return scan(cell, carry, xs)[1]

    variables = randomise_scales(Top().init(jax.random.key(0), SEQ))
    params = variables["params"]
    expected = lstm_by_hand(params["LSTMCell_0"], params["WeightNorm_0"], SEQ)
    assert_close(Top().apply(variables, SEQ), expected)


class Scaled(Wrapper):
    """Multiplies the kernel by 2 when deterministic, by 3 otherwise."""

    variable_filter = "kernel"

    def transform(self, leaf, *, deterministic: bool):  # type: ignore[override]
        return leaf.value * (2.0 if deterministic else 3.0)


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_call_option_reaches_every_wrapper_in_a_stack_that_takes_it(deterministic):
    model = Scaled(Scaled(nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones)))
    variables = model.init(jax.random.key(0), X, deterministic=True)
    factor = 4.0 if deterministic else 9.0
    out = model.apply(variables, X, deterministic=deterministic)
    assert_close(out, np.asarray(X).sum(axis=1, keepdims=True) * factor)


def test_stacked_spectral_norms_both_update_their_statistics():
    model = SpectralNorm(SpectralNorm(nn.Dense(3)))
    variables = model.init(jax.random.key(0), X, update_stats=False)
    _, updates = model.apply(variables, X, update_stats=True, mutable=["batch_stats"])
    before = variables["batch_stats"]
    after = updates["batch_stats"]
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after
    )
    # The outer wrapper's statistics live at the top; the inner one's under layer_instance.
    assert changed == {
        "layer_instance/kernel/u": True,
        "layer_instance/kernel/sigma": True,
        "layer_instance": {"layer_instance/kernel/u": True, "layer_instance/kernel/sigma": True},
    }


def test_a_stack_over_a_sequential_transforms_every_layer_in_order():
    """``Scaled(WeightNorm(nn.Sequential(...)))``: each kernel is normalised, then doubled."""

    class Doubled(Wrapper):
        variable_filter = "kernel"

        def transform(self, leaf):
            return 2.0 * leaf.value

    class Top(nn.Module):
        wrapped: bool

        @nn.compact
        def __call__(self, x):
            layers = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
            return (Doubled(WeightNorm(layers)) if self.wrapped else layers)(x)

    variables = randomise_scales(Top(True).init(jax.random.key(0), X))
    # Doubled has no variables; the WeightNorm, built beside it, holds both layers' scales.
    assert set(variables["params"]["WeightNorm_0"]) == {
        "Dense_0/kernel/scale",
        "Dense_1/kernel/scale",
    }
    by_hand_params = by_hand(variables["params"], "WeightNorm_0")
    for layer in by_hand_params.values():
        layer["kernel"] = 2.0 * layer["kernel"]
    assert_close(Top(True).apply(variables, X), Top(False).apply({"params": by_hand_params}, X))


def test_summary_of_a_wrapped_sequential_puts_both_normalisations_on_the_wrapper_row():
    import wrapkit

    wrapped, _ = model_pair(CASES["sequential"])
    table = wrapkit.summary(wrapped, jax.ShapeDtypeStruct(X.shape, X.dtype), vjp=True)
    (row,) = table.find("WeightNorm_0")
    dense = [r for r in table if r.module_type == "Dense"]
    assert [r.name for r in dense] == ["Dense_0", "Dense_1"]
    parents = [table.rows[r.parent].module_type for r in dense if r.parent is not None]
    assert parents == ["Sequential", "Sequential"]
    # Each kernel's norm is counted on the wrapper's row: for a (k, n) kernel, n*k squares,
    # n*(k-1) additions, n epsilon additions, n*k multiplications by the reciprocal norm
    # and n*k by the scale (rsqrt is a transcendental).
    expected = sum(3 * k * n + n * (k - 1) + n for k, n in [(3, 4), (4, 2)])
    assert row.own_flops == expected
    assert sum(r.own_flops for r in table) == table.flops


def test_statistics_of_a_batch_norm_held_as_a_field_still_update():
    """Only params are mapped: a BatchNorm inside an nn.Sequential keeps training its stats."""
    build = lambda wrap: wrap(  # noqa: E731
        nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False), nn.Dense(2)])
    )
    wrapped, plain = model_pair(build)
    variables = randomise_scales(wrapped.init(jax.random.key(0), X))
    out, updated = wrapped.apply(variables, X, mutable=["batch_stats"])
    params = by_hand(variables["params"], "WeightNorm_0")
    plain_variables = {"params": params, "batch_stats": variables["batch_stats"]}
    expected, expected_updated = plain.apply(plain_variables, X, mutable=["batch_stats"])
    # A batch of two normalised by its own variance amplifies the float32 rounding of the
    # normalised kernel (computed by hand in float64), hence the looser tolerance.
    chex.assert_trees_all_close(out, expected, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(updated, expected_updated, rtol=1e-4, atol=1e-5)
    assert not np.allclose(
        updated["batch_stats"]["BatchNorm_0"]["mean"],
        variables["batch_stats"]["BatchNorm_0"]["mean"],
    )
