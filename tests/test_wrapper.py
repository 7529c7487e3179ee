"""The Linen Wrapper base class: delegation, stacking, attribute access and its errors."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wrapkit
from wrapkit._numerics import l2_normalize, power_iteration, spectral_normalize
from wrapkit.linen import Leaf, SpectralNorm, WeightNorm, Wrapper

X = jax.random.normal(jax.random.key(1), (2, 4))


class Doubled(Wrapper):
    """Doubles every kernel: the smallest useful wrapper."""

    variable_filter = "kernel"

    def transform(self, leaf: Leaf) -> jax.Array:
        return 2 * leaf.value


class Shifted(Wrapper):
    """Adds a learned per-variable offset and takes a call option."""

    def transform(self, leaf: Leaf, *, amount: float = 1.0) -> jax.Array:
        offset = self.param(f"{leaf.path}/offset", nn.initializers.zeros, leaf.value.shape)
        return leaf.value + offset + amount


class AutoEncoder(nn.Module):
    def setup(self):
        self.encoder = nn.Dense(2)
        self.decoder = nn.Dense(4)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))


def record_calls(fn):
    """Runs ``fn`` and returns the (path, class, method) of every module call it made."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        calls.append(("/".join(context.module.path), type(context.module).__name__))
        calls[-1] += (context.method_name,)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        fn()
    return calls


def test_custom_wrapper_transforms_only_selected_variables():
    model = Doubled(nn.Dense(3))
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]["layer_instance"]
    expected = X @ (2 * params["kernel"]) + params["bias"]
    chex.assert_trees_all_close(model.apply(variables, X), expected, rtol=1e-6)


def test_call_options_reach_the_transform_and_not_the_inner_module():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x, amount):
            return Shifted(nn.Dense(3, use_bias=False))(x, amount=amount)

    variables = Top().init(jax.random.key(0), X, 0.0)
    kernel = variables["params"]["Dense_0"]["kernel"]
    assert set(variables["params"]["Shifted_0"]) == {"Dense_0/kernel/offset"}
    chex.assert_trees_all_close(Top().apply(variables, X, 0.5), X @ (kernel + 0.5), rtol=1e-6)


def test_defaulted_call_option_can_be_omitted():
    model = Shifted(nn.Dense(3, use_bias=False))
    variables = model.init(jax.random.key(0), X)
    kernel = variables["params"]["layer_instance"]["kernel"]
    chex.assert_trees_all_close(model.apply(variables, X), X @ (kernel + 1.0), rtol=1e-6)


def test_per_instance_delegates_normalise_each_delegated_method():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            ae = WeightNorm(AutoEncoder(), delegates=("encode", "decode"))
            return ae.encode(x), ae.decode(ae.encode(x))

    variables = Top().init(jax.random.key(0), X)
    params = variables["params"]
    assert sorted(params["WeightNorm_0"]) == [
        "AutoEncoder_0/decoder/kernel/scale",
        "AutoEncoder_0/encoder/kernel/scale",
    ]

    def dense(name, x):
        layer = params["AutoEncoder_0"][name]
        scale = params["WeightNorm_0"][f"AutoEncoder_0/{name}/kernel/scale"]
        return x @ (scale * l2_normalize(layer["kernel"], axis=0)) + layer["bias"]

    z, reconstruction = Top().apply(variables, X)
    chex.assert_trees_all_close(z, dense("encoder", X), rtol=1e-6)
    chex.assert_trees_all_close(reconstruction, dense("decoder", dense("encoder", X)), rtol=1e-6)


def test_apply_with_method_name_of_a_delegated_method():
    model = WeightNorm(AutoEncoder(), delegates=("__call__", "encode"))
    variables = model.init(jax.random.key(0), X)
    z = model.apply(variables, X, method="encode")
    params = variables["params"]
    scale = params["layer_instance/encoder/kernel/scale"]
    encoder = params["layer_instance"]["encoder"]
    expected = X @ (scale * l2_normalize(encoder["kernel"], axis=0)) + encoder["bias"]
    chex.assert_trees_all_close(z, expected, rtol=1e-6)


def test_calls_are_recorded_under_the_delegated_method_never_layer_forward():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            ae = WeightNorm(AutoEncoder(), delegates=("encode", "decode"))
            return ae.decode(ae.encode(x))

    variables = Top().init(jax.random.key(0), X)
    calls = record_calls(lambda: Top().apply(variables, X))
    named = [call for call in calls if call[0]]  # flax's own unbound setup probes have no path
    assert ("WeightNorm_0", "WeightNorm", "encode") in named
    assert ("AutoEncoder_0", "AutoEncoder", "encode") in named
    assert ("AutoEncoder_0/encoder", "Dense", "__call__") in named
    assert ("WeightNorm_0", "WeightNorm", "decode") in named
    assert not [call for call in calls if call[2] in ("layer_forward", "transform")]


def test_flax_weight_norm_records_layer_forward_which_wrapkit_does_not():
    """Regression for flax issue 3735: the lifted call shows up as Dense.layer_forward."""

    def model(wrapper_class):
        class Top(nn.Module):
            @nn.compact
            def __call__(self, x):
                return wrapper_class(nn.Dense(3))(x)

        return Top()

    methods = {}
    for wrapper_class in (nn.WeightNorm, WeightNorm):
        top = model(wrapper_class)
        variables = top.init(jax.random.key(0), X)
        calls = record_calls(lambda top=top, variables=variables: top.apply(variables, X))
        methods[wrapper_class] = [method for path, _, method in calls if path == "Dense_0"]
    assert methods[nn.WeightNorm] == ["layer_forward", "__call__"]
    assert methods[WeightNorm] == ["__call__"]


def test_read_access_to_inner_attributes():
    wrapped = WeightNorm(nn.Dense(4, use_bias=False))
    assert wrapped.features == 4
    assert wrapped.use_bias is False
    assert WeightNorm(SpectralNorm(nn.Conv(8, (3, 3)))).kernel_size == (3, 3)


def test_undelegated_inner_method_cannot_read_what_the_wrapper_transforms():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(AutoEncoder()).encode(x)

    with pytest.raises(
        TypeError,
        match=r"WeightNorm\(AutoEncoder_0\) does not delegate 'encode', and "
        r"AutoEncoder\.encode reads params/AutoEncoder_0/\w+/kernel, which WeightNorm "
        r"transforms: .* Build the wrapper with delegates=\('__call__', 'encode'\)",
    ):
        Top().init(jax.random.key(0), X)


def test_missing_attribute_is_an_attribute_error():
    with pytest.raises(
        AttributeError,
        match=r"WeightNorm\(Dense\) has no attribute 'nonexistent', and neither has the Dense",
    ):
        WeightNorm(nn.Dense(4)).nonexistent  # noqa: B018


def test_forward_pass_never_writes_params_even_with_mutable_true():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = WeightNorm(nn.Dense(3))(x)
            return SpectralNorm(nn.Dense(3))(x, update_stats=True)

    variables = Top().init(jax.random.key(0), X)
    variables = jax.tree_util.tree_map(lambda v: 3 * v, variables)
    _, updated = Top().apply(variables, X, mutable=True)
    chex.assert_trees_all_equal(updated["params"], variables["params"])


def test_flax_spectral_norm_overwrites_params_under_mutable_true():
    """The flax bug the previous test guards against, shown on flax's class."""

    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.SpectralNorm(nn.Dense(3))(x, update_stats=True)

    variables = jax.tree_util.tree_map(lambda v: 3 * v, Top().init(jax.random.key(0), X))
    _, updated = Top().apply(variables, X, mutable=True)
    kernel = variables["params"]["Dense_0"]["kernel"]
    assert not np.allclose(updated["params"]["Dense_0"]["kernel"], kernel)


def stacked(outer, inner):
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return outer(inner(nn.Dense(3)))(x, update_stats=True)

    return Top()


def spectral(kernel, u):
    u, v = power_iteration(kernel, u, 1, 1e-12)
    return spectral_normalize(kernel, u, v)[0]


@pytest.mark.parametrize("order", ["weight-of-spectral", "spectral-of-weight"])
def test_wrappers_stack_innermost_transform_first(order):
    outer, inner = (
        (WeightNorm, SpectralNorm)
        if order == "weight-of-spectral"
        else (
            SpectralNorm,
            WeightNorm,
        )
    )
    model = stacked(outer, inner)
    variables = model.init(jax.random.key(0), X)
    params, stats = variables["params"], variables["batch_stats"]
    assert set(params) == {"Dense_0", "WeightNorm_0"}
    assert set(params["WeightNorm_0"]) == {"Dense_0/kernel/scale"}
    assert set(stats["SpectralNorm_0"]) == {"Dense_0/kernel/u", "Dense_0/kernel/sigma"}

    kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    scale = params["WeightNorm_0"]["Dense_0/kernel/scale"]
    u = stats["SpectralNorm_0"]["Dense_0/kernel/u"]
    if order == "weight-of-spectral":
        seen = scale * l2_normalize(spectral(kernel, u), axis=0)
    else:
        seen = spectral(scale * l2_normalize(kernel, axis=0), u)
    y, _ = model.apply(variables, X, mutable=["batch_stats"])
    chex.assert_trees_all_close(y, X @ seen + bias, rtol=1e-5)


def test_flax_cannot_stack_weight_norm_over_spectral_norm():
    """Regression: flax's WeightNorm(SpectralNorm(Dense)) crashes at init."""

    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.WeightNorm(nn.SpectralNorm(nn.Dense(3)))(x, update_stats=False)

    with pytest.raises(IndexError):
        Top().init(jax.random.key(0), X)
    stacked(WeightNorm, SpectralNorm).init(jax.random.key(0), X)


def test_three_wrappers_stack():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Doubled(WeightNorm(SpectralNorm(nn.Dense(3))))(x, update_stats=False)

    variables = Top().init(jax.random.key(0), X)
    params = variables["params"]
    kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    scale = params["WeightNorm_0"]["Dense_0/kernel/scale"]
    u = variables["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/u"]
    seen = 2 * scale * l2_normalize(spectral(kernel, u), axis=0)
    chex.assert_trees_all_close(Top().apply(variables, X), X @ seen + bias, rtol=1e-5)


def test_shared_wrapper_called_twice_reuses_its_variables():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            wrapped = WeightNorm(nn.Dense(4))
            return wrapped(wrapped(x))

    variables = Top().init(jax.random.key(0), X)
    assert set(variables["params"]["WeightNorm_0"]) == {"Dense_0/kernel/scale"}
    layer = variables["params"]["Dense_0"]
    kernel = variables["params"]["WeightNorm_0"]["Dense_0/kernel/scale"] * l2_normalize(
        layer["kernel"], axis=0
    )
    once = X @ kernel + layer["bias"]
    chex.assert_trees_all_close(Top().apply(variables, X), once @ kernel + layer["bias"], rtol=1e-5)


def test_wrapper_defined_in_setup_matches_flax_names():
    def model(wrapper_class):
        class Top(nn.Module):
            def setup(self):
                self.wrapped = wrapper_class(nn.Dense(3))

            def __call__(self, x):
                return self.wrapped(x)

        return Top()

    ours = model(WeightNorm).init(jax.random.key(0), X)
    theirs = model(nn.WeightNorm).init(jax.random.key(0), X)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)


def test_protocol_sees_the_wrapper():
    wrapped = Doubled(nn.Dense(3), delegates=("__call__",))
    assert wrapkit.is_wrapper(wrapped)
    assert wrapkit.delegated_methods(wrapped) == ("__call__",)


# -- errors --------------------------------------------------------------------------------


def test_delegating_a_missing_method_fails_when_built():
    with pytest.raises(
        ValueError,
        match=r"WeightNorm\(Conv\) delegates 'encode', but Conv has no method 'encode'\. "
        r"Delegate one of: __call__\.",
    ):
        WeightNorm(nn.Conv(4, (3,)), delegates=("encode",))


def test_several_problems_are_reported_together():
    with pytest.raises(
        ValueError,
        match=r"(?s)WeightNorm\(AutoEncoder\) has 2 problems:\n"
        r"  - delegates 'attend', but AutoEncoder has no method 'attend'\. "
        r"Delegate one of: __call__, decode, encode\.\n"
        r"  - feature_axes must be an int, a tuple of ints or None, got 'last'",
    ):
        WeightNorm(AutoEncoder(), feature_axes="last", delegates=("encode", "attend"))


def test_delegates_given_as_a_string_is_caught():
    with pytest.raises(ValueError, match=r"write delegates=\('encode',\)"):
        WeightNorm(AutoEncoder(), delegates="encode")


def test_delegating_a_name_the_wrapper_owns_is_refused():
    class WithTransformMethod(nn.Module):
        def transform(self, x):
            return x

    with pytest.raises(
        ValueError, match=r"cannot delegate 'transform': WeightNorm has an attribute"
    ):
        WeightNorm(WithTransformMethod(), delegates=("transform",))


def test_calling_a_method_that_is_not_delegated():
    model = WeightNorm(AutoEncoder(), delegates=("encode",))
    with pytest.raises(
        TypeError,
        match=r"WeightNorm\(layer_instance\) does not delegate '__call__', and "
        r"AutoEncoder\.__call__ reads params/layer_instance/\w+/kernel",
    ):
        model.init(jax.random.key(0), X)


@pytest.mark.parametrize(
    ("inner", "message"),
    [
        (
            lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
            r"got flax\.nnx\.nn\.linear\.Linear\. "
            r"wrapkit\.linen wrappers wrap Linen modules; this is an NNX module\.",
        ),
        (lambda: lambda x: x, r"got builtins\.function\."),
    ],
    ids=["nnx-module", "function"],
)
def test_inner_must_be_a_linen_module(inner, message):
    with pytest.raises(
        TypeError, match=r"WeightNorm expects a flax\.linen\.Module to wrap, " + message
    ):
        WeightNorm(inner())


@pytest.mark.parametrize("flax_class", [nn.WeightNorm, nn.SpectralNorm], ids=lambda c: c.__name__)
def test_wrapping_flax_wrappers_points_to_the_wrapkit_class(flax_class):
    with pytest.raises(
        TypeError,
        match=rf"cannot wrap flax\.linen\.{flax_class.__name__}: .* Use "
        rf"wrapkit\.linen\.{flax_class.__name__}, a drop-in",
    ):
        WeightNorm(flax_class(nn.Dense(3)))


def test_required_call_option_missing():
    with pytest.raises(
        TypeError,
        match=r"SpectralNorm\(layer_instance\)\.__call__\(\) needs the keyword argument "
        r"'update_stats': SpectralNorm takes it on every delegated call \(it is not passed to "
        r"Dense\)\.",
    ):
        SpectralNorm(nn.Dense(3)).init(jax.random.key(0), X)


def test_wrapper_without_transform_cannot_be_used():
    class Incomplete(Wrapper):
        pass

    with pytest.raises(NotImplementedError, match=r"Incomplete must define transform"):
        Incomplete(nn.Dense(3)).init(jax.random.key(0), X)


def test_flax_tabulate_with_flops_shows_the_inner_call_as_the_wrappers_child():
    """Regression for flax issue 3735: tabulate(compute_flops=True) crashed on WeightNorm."""

    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = WeightNorm(nn.Conv(4, (3, 3)))(x)
            return SpectralNorm(nn.Dense(3))(x, update_stats=False)

    table = Top().tabulate(
        jax.random.key(0),
        jnp.ones((1, 8, 8, 3)),
        compute_flops=True,
        compute_vjp_flops=True,
        console_kwargs={"width": 240},
    )
    table = re.sub(r"\x1b\[[0-9;]*m", "", table)
    paths = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    rows = [path for path in paths if path]
    assert rows == ["WeightNorm_0", "Conv_0", "SpectralNorm_0", "Dense_0"]
    assert "layer_forward" not in table


def test_stacked_wrappers_delegate_the_same_non_call_method():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            inner = SpectralNorm(AutoEncoder(), delegates=("encode",))
            return WeightNorm(inner, delegates=("encode",)).encode(x, update_stats=False)

    variables = Top().init(jax.random.key(0), X)
    params = variables["params"]
    encoder = params["AutoEncoder_0"]["encoder"]
    scale = params["WeightNorm_0"]["AutoEncoder_0/encoder/kernel/scale"]
    u = variables["batch_stats"]["SpectralNorm_0"]["AutoEncoder_0/encoder/kernel/u"]
    seen = scale * l2_normalize(spectral(encoder["kernel"], u), axis=0)
    chex.assert_trees_all_close(Top().apply(variables, X), X @ seen + encoder["bias"], rtol=1e-5)


def test_outer_wrapper_can_only_delegate_what_the_inner_wrapper_delegates():
    with pytest.raises(
        ValueError,
        match=r"WeightNorm\(SpectralNorm\) delegates 'decode', but SpectralNorm has no method "
        r"'decode'\. Delegate one of: encode\.",
    ):
        WeightNorm(SpectralNorm(AutoEncoder(), delegates=("encode",)), delegates=("decode",))


def test_name_stack_puts_the_transform_in_the_wrapper_and_the_inner_call_below_it():
    """What a jaxpr-level tool sees: the normalisation is the wrapper's own work."""

    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(nn.Dense(3))(x)

    variables = Top().init(jax.random.key(0), X)
    jaxpr = jax.make_jaxpr(lambda v, x: Top().apply(v, x))(variables, X)
    scopes = {}
    for eqn in jaxpr.jaxpr.eqns:
        scopes.setdefault(str(eqn.source_info.name_stack), set()).add(eqn.primitive.name)
    assert set(scopes) == {"Top/WeightNorm_0", "Top/WeightNorm_0/Dense_0"}
    assert {"rsqrt", "reduce_sum"} <= scopes["Top/WeightNorm_0"]
    assert "dot_general" in scopes["Top/WeightNorm_0/Dense_0"]
    assert "dot_general" not in scopes["Top/WeightNorm_0"]


def test_name_stack_puts_each_transform_of_a_stack_in_its_own_wrapper():
    """The innermost wrapper runs the outer transforms under the outer wrappers' names."""

    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(SpectralNorm(nn.Dense(3)))(x, update_stats=False)

    variables = Top().init(jax.random.key(0), X)
    jaxpr = jax.make_jaxpr(lambda v, x: Top().apply(v, x))(variables, X)
    scopes = {}
    for eqn in jaxpr.jaxpr.eqns:
        scopes.setdefault(str(eqn.source_info.name_stack), set()).add(eqn.primitive.name)
    assert set(scopes) == {
        "Top/WeightNorm_0",
        "Top/WeightNorm_0/SpectralNorm_0",
        "Top/WeightNorm_0/SpectralNorm_0/Dense_0",
    }
    assert "rsqrt" in scopes["Top/WeightNorm_0"]  # the weight norm of the kernel
    assert "div" in scopes["Top/WeightNorm_0/SpectralNorm_0"]  # W / sigma
    assert "dot_general" in scopes["Top/WeightNorm_0/SpectralNorm_0/Dense_0"]


def test_lifted_inner_wrapper_error_recommends_what_works():
    """The fix the error names is tested: flax's nn.remat traces keyword arguments, so the
    outermost wrapper is only recommended when no wrapper in the stack takes a call option."""
    dense = nn.Dense(3)
    with pytest.raises(TypeError) as with_options:
        WeightNorm(nn.remat(SpectralNorm)(dense))
    assert "nn.remat(Block), where Block builds WeightNorm(SpectralNorm(...))" in str(
        with_options.value
    )
    assert "the outermost wrapper" not in str(with_options.value)

    with pytest.raises(
        TypeError,
        match=r"or the outermost wrapper: nn\.remat\(WeightNorm\)\(WeightNorm\(\.\.\.\)\)",
    ):
        WeightNorm(nn.remat(WeightNorm)(dense))
    recommended = nn.remat(WeightNorm)(WeightNorm(nn.Dense(3)))
    x = jnp.ones((2, 4))
    variables = recommended.init(jax.random.key(0), x)
    plain = WeightNorm(WeightNorm(nn.Dense(3)))
    np.testing.assert_allclose(
        recommended.apply(variables, x), plain.apply(variables, x), rtol=1e-6
    )


def test_a_module_class_as_inner_module_names_the_fix():
    with pytest.raises(
        TypeError,
        match=r"WeightNorm expects a flax\.linen\.Module instance to wrap, got the class "
        r"flax\.linen\.linear\.Dense\. Build the module first: WeightNorm\(Dense\(\.\.\.\)\)\.",
    ):
        WeightNorm(nn.Dense)


@pytest.mark.parametrize(
    ("delegates", "message"),
    [
        ((3,), r"element 0 of delegates must be a method name \(a string\), got 3 \(int\)\."),
        ("encode", r"got the string 'encode'; write delegates=\('encode',\)\."),
        (7, r"got 7 \(int\); write e\.g\. delegates=\('__call__',\)\."),
    ],
    ids=["not-a-string", "a-string", "not-iterable"],
)
def test_bad_delegates_are_refused_when_built(delegates, message):
    with pytest.raises(ValueError, match=r"WeightNorm\(Dense\) (delegates must be .*)?" + message):
        WeightNorm(nn.Dense(3), delegates=delegates)
