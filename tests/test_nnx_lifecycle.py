"""wrapkit.nnx fold, wrap_pretrained, init_from_data and the Linen-twin converter.

Expected values come from flax's own layers run on weights computed here in float64 numpy
(weight normalisation, power iteration, the top singular pair, batch statistics, W + s A B),
or from the wrapped model itself (a folded model computes what the wrapped one does), or
from the Linen twins (wrapkit.linen) on the converted variables.
"""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wrapkit.linen
from wrapkit.nnx import (
    FakeQuant,
    Inverse,
    LoRA,
    SpectralNorm,
    WeightNorm,
    WeightStandardization,
    Wrapper,
    fold,
    from_linen_variables,
    init_from_data,
    inject,
    to_linen_variables,
    wrap_pretrained,
)

X = jax.random.normal(jax.random.key(1), (5, 4))


@pytest.fixture(params=[lambda f: f, nnx.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


def call(variant, model, *args, **kwargs):
    return variant(lambda m, *a: m(*a, **kwargs))(model, *args)


# -- wrappers of the tests' own, and references by hand -----------------------------------


class Doubled(Wrapper):
    """The wrapped module sees twice its kernel."""

    default_filter = ("kernel",)

    def transform(self, leaf):
        return 2 * leaf.value


class Halved(Doubled):
    def invert(self, leaf):
        return Inverse(leaf.value / 2)


class Gain(Wrapper):
    """A learned scalar gain per kernel, and a count in batch_stats: own variables of both
    kinds, with a Linen twin below."""

    default_filter = ("kernel",)

    def create(self, leaf, rngs):
        return {"gain": nnx.Param(jnp.full((), 1.5)), "count": nnx.BatchStat(jnp.zeros(()))}

    def transform(self, leaf):
        return self.own("gain", leaf)[...] * leaf.value

    def invert(self, leaf):
        return Inverse(leaf.value / 1.5, {"gain": 1.5})


class LinenGain(wrapkit.linen.Wrapper):
    variable_filter = "kernel"

    def transform(self, leaf):
        gain = self.param(f"{leaf.path}/gain", nn.initializers.constant(1.5), ())
        self.variable("batch_stats", f"{leaf.path}/count", jnp.zeros, ())
        return gain * leaf.value


def f64(value):
    return np.asarray(value, np.float64)


def normalised(kernel, scale):
    """Weight normalisation, one norm per output feature (the last axis), float64."""
    kernel = f64(kernel)
    norm = np.sqrt((kernel**2).sum(axis=tuple(range(kernel.ndim - 1)), keepdims=True))
    return kernel / norm * f64(scale)


def spectral(kernel, u):
    """Spectral normalisation with one step of power iteration from u, float64."""
    kernel = f64(kernel)
    matrix, u = kernel.reshape(-1, kernel.shape[-1]), f64(u)
    v = u @ matrix.T
    v /= np.linalg.norm(v)
    u = v @ matrix
    u /= np.linalg.norm(u)
    return kernel / (v @ matrix @ u.T)[0, 0]


def linear(n_in, n_out, seed=0, **kwargs):
    return nnx.Linear(n_in, n_out, rngs=nnx.Rngs(seed), **kwargs)


def scaled(model, seed=3):
    """Every WeightNorm scale drawn in [0.5, 2]: a scale left out of the result shows."""
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, WeightNorm):
            for variable in node.scale.values():
                key, draw = jax.random.split(key)
                variable[...] = jax.random.uniform(draw, variable.shape, minval=0.5, maxval=2.0)
    return model


def raw(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def has_wrappers(model):
    return any(isinstance(node, Wrapper) for _, node in nnx.iter_graph(model))


# -- fold ---------------------------------------------------------------------------------


def test_fold_gives_the_module_with_the_weights_the_wrapper_made(variant):
    model = scaled(WeightNorm(linear(4, 3)))
    before = raw(model)
    folded = fold(model)
    assert type(folded) is nnx.Linear
    np.testing.assert_allclose(
        folded.kernel[...],
        normalised(model.layer_instance.kernel[...], model.scale["kernel"][...]),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(folded.bias[...], model.layer_instance.bias[...])
    chex.assert_trees_all_close(call(variant, folded, X), call(variant, model, X), atol=1e-6)
    chex.assert_trees_all_equal(raw(model), before)  # the model given is left as it is
    assert isinstance(model, WeightNorm)


def test_fold_a_stack_in_one_go():
    layer = linear(4, 3)
    model = scaled(WeightNorm(SpectralNorm(layer, rngs=nnx.Rngs(1))))
    folded = fold(model, update_stats=False)
    u = model.layer_instance.u["kernel"][...]
    expected = normalised(spectral(layer.kernel[...], u), model.scale["kernel"][...])
    np.testing.assert_allclose(folded.kernel[...], expected, rtol=1e-5)
    assert set(nnx.to_pure_dict(nnx.state(folded))) == {"kernel", "bias"}
    chex.assert_trees_all_close(folded(X), model(X, update_stats=False), atol=1e-6)


class Holder(nnx.Module):
    """Wrappers in an attribute, an nnx.List, a Sequential, a dict and an nnx.Dict."""

    def __init__(self, wrap):
        self.first = wrap(linear(4, 4, 0))
        self.blocks = nnx.List([wrap(linear(4, 4, 1)), linear(4, 4, 2)])
        self.seq = nnx.Sequential(wrap(linear(4, 4, 3)), nnx.relu)
        self.table = nnx.data({"a": wrap(linear(4, 4, 4))})
        self.named = nnx.Dict({"b": wrap(linear(4, 3, 5))})

    def __call__(self, x):
        x = self.blocks[1](self.blocks[0](self.first(x)))
        return self.named["b"](self.table["a"](self.seq(x)))


def test_fold_finds_wrappers_wherever_the_model_holds_them(variant):
    model = scaled(Holder(WeightNorm))
    folded = fold(model)
    assert not has_wrappers(folded)
    plain = Holder(lambda module: module)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(folded))) == jax.tree.map(
        jnp.shape, nnx.to_pure_dict(nnx.state(plain))
    )
    chex.assert_trees_all_close(call(variant, folded, X), call(variant, model, X), atol=1e-5)


def test_fold_a_wrapper_inside_a_wrapped_block_applies_both_as_the_calls_nest():
    inner = WeightNorm(linear(4, 3, 0))
    model = Doubled(nnx.Sequential(inner, nnx.relu, linear(3, 2, 1)))
    scaled(model)
    folded = fold(model)
    v, g = inner.layer_instance.kernel[...], inner.scale["kernel"][...]
    # Doubled runs first (its view holds 2 v), WeightNorm then normalises 2 v.
    np.testing.assert_allclose(folded.layers[0].kernel[...], normalised(2 * f64(v), g), rtol=1e-6)
    np.testing.assert_allclose(
        folded.layers[2].kernel[...], 2 * f64(model.layer_instance.layers[2].kernel[...])
    )
    chex.assert_trees_all_close(folded(X), model(X), atol=1e-6)


def test_fold_lora_merges_w_plus_s_a_b():
    model = LoRA(
        linear(4, 3),
        rank=2,
        alpha=3.0,
        b_init=nnx.initializers.normal(1.0),
        rngs=nnx.Rngs(1),
    )
    folded = fold(model)
    a, b = f64(model.lora_a["kernel"][...]), f64(model.lora_b["kernel"][...])
    expected = f64(model.layer_instance.kernel[...]) + 1.5 * a @ b
    np.testing.assert_allclose(folded.kernel[...], expected, rtol=1e-6)
    chex.assert_trees_all_close(folded(X), model(X), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_fold_casts_the_effective_weight_once_to_the_raw_dtype(dtype):
    model = scaled(WeightNorm(linear(4, 3, param_dtype=dtype), dtype=jnp.float32))
    folded = fold(model)
    assert folded.kernel[...].dtype == dtype
    expected = normalised(model.layer_instance.kernel[...], model.scale["kernel"][...])
    # One rounding of the float32 result: within one ulp of the dtype.
    np.testing.assert_allclose(f64(folded.kernel[...]), expected, rtol=float(jnp.finfo(dtype).eps))


def test_fold_keeps_the_statistics_of_a_wrapped_block():
    block = nnx.Sequential(linear(4, 3), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    model = WeightNorm(block)
    model(X)  # training mode: the BatchNorm's statistics move
    stats = np.asarray(block.layers[1].mean[...])
    assert np.abs(stats).max() > 0
    folded = fold(model)
    np.testing.assert_array_equal(folded.layers[1].mean[...], stats)
    folded.eval()
    model.eval()
    chex.assert_trees_all_close(folded(X), model(X), atol=1e-6)


def test_fold_keeps_the_sharding_metadata_of_the_raw_weight():
    init = nnx.with_partitioning(
        nnx.initializers.lecun_normal(), (None, "model"), eager_sharding=False
    )
    model = WeightNorm(linear(4, 3, kernel_init=init))
    folded = fold(model)
    assert folded.kernel.get_metadata()["out_sharding"] == (None, "model")


@pytest.mark.parametrize(
    ("build", "options"),
    [
        (lambda m: WeightNorm(m), {}),
        (lambda m: SpectralNorm(m, rngs=nnx.Rngs(1)), {"update_stats": False}),
        (lambda m: WeightStandardization(m), {}),
        (lambda m: FakeQuant(m, bits=4), {}),
        (lambda m: LoRA(m, rank=2, b_init=nnx.initializers.ones, rngs=nnx.Rngs(1)), {}),
        (lambda m: Doubled(m), {}),
    ],
    ids=["weight-norm", "spectral-norm", "weight-standardization", "fake-quant", "lora", "own"],
)
def test_fold_is_generic_over_wrappers(build, options):
    model = build(linear(4, 3))
    folded = fold(model, **options)
    assert type(folded) is nnx.Linear
    chex.assert_trees_all_close(folded(X), model(X, **options), atol=1e-5)


def test_fold_of_a_model_without_wrappers_is_a_copy():
    layer = linear(4, 3)
    folded = fold(layer)
    assert folded is not layer
    chex.assert_trees_all_equal(raw(folded), raw(layer))


class Needs(Doubled):
    """A wrapper with a call option that has no default."""

    def transform(self, leaf, *, factor):
        return factor * leaf.value


@pytest.mark.parametrize(
    ("model", "options", "error", "message"),
    [
        (
            WeightNorm(linear(4, 3)),
            {"update_stats": False},
            TypeError,
            r"fold\(WeightNorm\): option 'update_stats' is a call option of no wrapper in "
            r"the model: WeightNorm takes none\.",
        ),
        (
            Needs(linear(4, 3)),
            {},
            TypeError,
            r"fold\(Needs\): Needs\(Linear\) takes the call option 'factor' on every call, "
            r"with no default\. Pass it: fold\(model, factor=\.\.\.\)\.",
        ),
        (
            nnx.Sequential(nnx.WeightNorm(linear(4, 3), rngs=nnx.Rngs(0))),
            {},
            ValueError,
            r"fold\(Sequential\): layers/0 is flax's nnx\.WeightNorm, which writes its "
            r"normalised weight into the module it wraps and is no wrapkit wrapper; use "
            r"wrapkit\.nnx\.WeightNorm\.",
        ),
        (
            WeightNorm(LoRA(linear(4, 3), rank=2, rngs=nnx.Rngs(0))),
            {},
            ValueError,
            r"WeightNorm\(LoRA\) transforms kernel after LoRA\(Linear\) has added its "
            r"low-rank delta to it",
        ),
    ],
    ids=["unknown-option", "required-option", "flax-wrapper", "after-low-rank"],
)
def test_fold_says_what_it_cannot_fold(model, options, error, message):
    with pytest.raises(error, match=message):
        fold(model, **options)


class Tied(nnx.Module):
    def __init__(self, wrap_both=False):
        self.layer = linear(4, 4)
        self.wrapped = WeightNorm(self.layer)
        self.other = Doubled(self.layer) if wrap_both else nnx.data(None)

    def __call__(self, x):
        return self.wrapped(self.layer(x))


def test_fold_refuses_a_wrapped_module_the_model_also_uses_directly():
    with pytest.raises(
        ValueError,
        match=r"fold\(Tied\): Linear at 'wrapped/layer_instance', which WeightNorm\(Linear\) "
        r"wraps, is also used directly at 'layer': one module cannot hold both",
    ):
        fold(Tied())


def test_fold_refuses_two_wrappers_around_one_module():
    model = Tied(wrap_both=True)
    del model.layer
    with pytest.raises(
        ValueError,
        match=r"both transform kernel of the module they wrap, so it has no one folded value",
    ):
        fold(model)


def test_fold_needs_concrete_variables():
    abstract = nnx.eval_shape(lambda: WeightNorm(linear(4, 3)))
    with pytest.raises(
        TypeError,
        match=re.escape("fold(WeightNorm): the variables must be arrays, got 1 jax.Shape"),
    ):
        fold(abstract)


def test_fold_refuses_what_is_not_an_nnx_module():
    with pytest.raises(
        TypeError,
        match=r"fold\(Dense\): expected a flax\.nnx\.Module instance, got Dense\. For a Linen "
        r"model, use the function of the same name in wrapkit\.linen\.",
    ):
        fold(nn.Dense(3))


# -- wrap_pretrained ----------------------------------------------------------------------


def test_wrap_pretrained_weight_norm_keeps_v_and_takes_its_norm_as_scale(variant):
    pretrained = linear(4, 3)
    model = WeightNorm(pretrained)
    wrapped = wrap_pretrained(model)
    kernel = f64(pretrained.kernel[...])
    np.testing.assert_array_equal(wrapped.layer_instance.kernel[...], pretrained.kernel[...])
    np.testing.assert_allclose(
        wrapped.scale["kernel"][...], np.linalg.norm(kernel, axis=0), rtol=1e-6
    )
    chex.assert_trees_all_close(call(variant, wrapped, X), call(variant, pretrained, X), atol=1e-6)
    np.testing.assert_array_equal(model.scale["kernel"][...], 1.0)  # left as it was


def test_wrap_pretrained_spectral_norm_needs_sigma_one_to_be_exact():
    model = SpectralNorm(linear(4, 3), rngs=nnx.Rngs(1))
    message = (
        r"wrap_pretrained\(SpectralNorm\): with exact=True the wrapped model must see every "
        r"pretrained weight unchanged, but it would change:\n"
        r"  - layer_instance/kernel \(through SpectralNorm\(Linear\)\) would be off by up to "
        r"[0-9.]+ of its largest magnitude \(norm ratio [0-9.]+\)\. SpectralNorm\(Linear\) "
        r"divides the weight by its largest singular value .*\n"
        r"Pass exact=False to accept"
    )
    with pytest.raises(ValueError, match=message):
        wrap_pretrained(model, update_stats=False)


def test_wrap_pretrained_spectral_norm_stores_the_top_singular_pair():
    pretrained = linear(4, 3)
    kernel = f64(pretrained.kernel[...])
    sigma = np.linalg.svd(kernel, compute_uv=False)[0]
    wrapped = wrap_pretrained(SpectralNorm(pretrained, rngs=nnx.Rngs(1)), exact=False)
    np.testing.assert_allclose(wrapped.sigma["kernel"][...], sigma, rtol=1e-5)
    rescaled = linear(4, 3)
    rescaled.kernel[...] = kernel / sigma
    chex.assert_trees_all_close(wrapped(X, update_stats=False), rescaled(X), atol=1e-6)


def test_wrap_pretrained_spectral_norm_of_a_unit_sigma_weight_is_exact():
    pretrained = linear(4, 3)
    kernel = f64(pretrained.kernel[...])
    pretrained.kernel[...] = kernel / np.linalg.svd(kernel, compute_uv=False)[0]
    wrapped = wrap_pretrained(SpectralNorm(pretrained, rngs=nnx.Rngs(1)), update_stats=False)
    chex.assert_trees_all_close(wrapped(X, update_stats=False), pretrained(X), atol=1e-6)


def test_wrap_pretrained_lora_zeroes_b():
    pretrained = linear(4, 3)
    model = LoRA(pretrained, rank=2, b_init=nnx.initializers.ones, rngs=nnx.Rngs(1))
    wrapped = wrap_pretrained(model)
    np.testing.assert_array_equal(wrapped.lora_b["kernel"][...], 0.0)
    chex.assert_trees_all_close(wrapped(X), pretrained(X), atol=1e-6)


def test_wrap_pretrained_fake_quant_reproduces_only_weights_on_their_grid():
    with pytest.raises(ValueError, match=r"\(through FakeQuant\(Linear\)\) would be off by"):
        wrap_pretrained(FakeQuant(linear(4, 3), bits=3))
    on_grid = fold(FakeQuant(linear(4, 3), bits=3))  # a folded FakeQuant model
    wrapped = wrap_pretrained(FakeQuant(on_grid, bits=3))
    chex.assert_trees_all_close(wrapped(X), on_grid(X), atol=1e-6)


def test_wrap_pretrained_a_wrapper_inside_a_wrapped_block_inverts_the_innermost_first():
    first, second = linear(4, 3, 0), linear(3, 2, 1)
    pretrained = nnx.Sequential(first, nnx.relu, second)
    expected = pretrained(X)
    model = Halved(nnx.Sequential(WeightNorm(first), nnx.relu, Gain(second)))
    wrapped = wrap_pretrained(model)
    chex.assert_trees_all_close(wrapped(X), expected, atol=1e-6)


def test_wrap_pretrained_after_inject():
    pretrained = nnx.Sequential(linear(4, 3, 0), nnx.relu, linear(3, 2, 1))
    expected = pretrained(X)
    inject(pretrained, WeightNorm, nnx.Linear)
    chex.assert_trees_all_close(wrap_pretrained(pretrained)(X), expected, atol=1e-6)


def test_wrap_pretrained_refuses_a_wrapper_without_invert():
    with pytest.raises(
        TypeError,
        match=r"wrap_pretrained\(Sequential\) has 2 problems:\n"
        r"  - WeightStandardization\(Linear\) at 'layers/0': WeightStandardization defines no "
        r"invert\(leaf\), so its transform cannot be inverted\. Leave the weights it "
        r"transforms out of its variable_filter, or give the class an invert hook \(see the "
        r"lifecycle page of the docs\)\.\n"
        r"  - Doubled\(Linear\) at 'layers/1': Doubled defines no invert",
    ):
        wrap_pretrained(nnx.Sequential(WeightStandardization(linear(4, 4)), Doubled(linear(4, 3))))


def test_a_wrong_invert_is_caught_by_the_exact_check():
    class Wrong(Doubled):
        def invert(self, leaf):
            return Inverse(leaf.value)

    with pytest.raises(
        ValueError,
        match=r"layer_instance/kernel \(through Wrong\(Linear\)\) would be off by up to 1 of "
        r"its largest magnitude \(norm ratio 2\)\.\n",
    ):
        wrap_pretrained(Wrong(linear(4, 3)))


def test_an_invert_returning_a_variable_the_wrapper_lacks_is_named():
    class Stray(Halved):
        def invert(self, leaf):
            return Inverse(leaf.value / 2, {"gain": 1.0})

    with pytest.raises(
        ValueError,
        match=r"wrap_pretrained\(Stray\): Stray\(Linear\)\.invert returned the variable 'gain' "
        r"for 'kernel', which it does not have \(it has none\)\.",
    ):
        wrap_pretrained(Stray(linear(4, 3)))


def test_wrap_pretrained_needs_a_wrapper():
    with pytest.raises(
        ValueError,
        match=r"wrap_pretrained\(Linear\): the model holds no wrapkit\.nnx wrapper, so there "
        r"is nothing to invert\.",
    ):
        wrap_pretrained(linear(4, 3))


def test_wrap_pretrained_checks_only_outside_jit():
    with pytest.raises(
        ValueError,
        match=r"exact=True checks the result against the pretrained values, which needs "
        r"them as arrays, not traced under jax.jit",
    ):
        nnx.jit(wrap_pretrained)(WeightNorm(linear(4, 3)))


# -- init_from_data -----------------------------------------------------------------------

BATCH = jax.random.normal(jax.random.key(2), (256, 6)) * 3.0 + 1.0
IMAGES = jax.random.normal(jax.random.key(2), (16, 8, 8, 3)) * 2.0 - 0.5


def mlp():
    return nnx.Sequential(
        WeightNorm(linear(6, 8, 0)),
        nnx.relu,
        WeightNorm(linear(8, 8, 1)),
        nnx.relu,
        WeightNorm(linear(8, 3, 2)),
    )


def pre_activations(model, x):
    """Each WeightNorm's output, layer by layer."""
    outputs = []
    for layer in model.layers:
        x = layer(x)
        if isinstance(layer, WeightNorm):
            outputs.append(f64(x))
    return outputs


def assert_standardised(outputs, atol=1e-4):
    """Zero mean and unit std per feature; the std is sqrt(var / (var + epsilon)), so a
    feature of small variance is a little under one."""
    for out in outputs:
        axes = tuple(range(out.ndim - 1))
        np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=atol)
        np.testing.assert_allclose(out.std(axis=axes), 1.0, atol=max(atol, 1e-3))


def test_init_from_data_an_mlp_by_hand(epsilon=1e-5):
    model = scaled(mlp())
    initialised = init_from_data(model, BATCH)
    x = f64(BATCH)
    for index in (0, 2, 4):
        before, after = model.layers[index], initialised.layers[index]
        v, g = before.layer_instance.kernel[...], before.scale["kernel"][...]
        t = x @ normalised(v, g) + f64(before.layer_instance.bias[...])
        mean, std = t.mean(axis=0), np.sqrt(t.var(axis=0) + epsilon)
        np.testing.assert_allclose(after.scale["kernel"][...], f64(g) / std, rtol=1e-4)
        np.testing.assert_allclose(
            after.layer_instance.bias[...],
            (f64(before.layer_instance.bias[...]) - mean) / std,
            rtol=1e-4,
            atol=1e-5,
        )
        np.testing.assert_array_equal(after.layer_instance.kernel[...], v)
        x = (t - mean) / std
        x = np.maximum(x, 0.0) if index < 4 else x
    assert_standardised(pre_activations(initialised, BATCH))
    np.testing.assert_array_equal(model.layers[0].layer_instance.bias[...], 0.0)  # unchanged


def test_init_from_data_a_cnn_normalises_each_channel_over_batch_and_space():
    model = nnx.Sequential(
        WeightNorm(nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))),
        nnx.relu,
        WeightNorm(nnx.Conv(8, 4, (3, 3), strides=2, rngs=nnx.Rngs(1))),
    )
    outputs = pre_activations(init_from_data(scaled(model), IMAGES), IMAGES)
    assert [out.shape for out in outputs] == [(16, 8, 8, 8), (16, 4, 4, 4)]
    assert_standardised(outputs)


def test_init_from_data_through_a_stack_and_inside_a_wrapped_block():
    stack = WeightNorm(SpectralNorm(linear(6, 4), rngs=nnx.Rngs(1)))
    initialised = init_from_data(stack, BATCH, update_stats=False)
    assert_standardised([f64(initialised(BATCH, update_stats=False))])

    block = Doubled(nnx.Sequential(WeightNorm(linear(6, 4)), nnx.relu, linear(4, 2)))
    initialised = init_from_data(block, BATCH)
    # In the block WeightNorm normalises 2 v, which is what it does to v on its own.
    assert_standardised([f64(initialised.layer_instance.layers[0](BATCH))])


def test_init_from_data_drops_the_state_updates_of_its_forward_pass():
    model = nnx.Sequential(WeightNorm(linear(6, 4)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    initialised = init_from_data(model, BATCH)
    np.testing.assert_array_equal(initialised.layers[1].mean[...], 0.0)


def test_init_from_data_in_bfloat16():
    model = nnx.Sequential(
        WeightNorm(linear(6, 8, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)),
        nnx.relu,
        WeightNorm(linear(8, 3, 1, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)),
    )
    batch = BATCH.astype(jnp.bfloat16)
    assert_standardised(pre_activations(init_from_data(model, batch), batch), atol=0.05)


def test_init_from_data_lists_every_layer_it_cannot_initialise():
    model = nnx.Sequential(
        WeightNorm(linear(6, 4, use_bias=False)), WeightNorm(linear(4, 3), use_scale=False)
    )
    message = (
        r"init_from_data\(Sequential\) has 2 problems:\n"
        r"  - WeightNorm\(Linear\) at 'layers/0': Linear has no bias \(expected "
        r"layers/0/layer_instance/bias of shape \(4,\)\); the data-dependent init sets it "
        r"to -mean / std\. Build the layer with use_bias=True\.\n"
        r"  - WeightNorm\(Linear\) at 'layers/1' has use_scale=False; the data-dependent "
        r"init sets each scale\. Build it with use_scale=True\.$"
    )
    with pytest.raises(ValueError, match=message):
        init_from_data(model, BATCH)


class BuiltInTheCall(nnx.Module):
    def __call__(self, x):
        return WeightNorm(linear(6, 3))(x)


class Twice(nnx.Module):
    def __init__(self):
        self.layer = WeightNorm(linear(6, 6))

    def __call__(self, x):
        return self.layer(self.layer(x))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            WeightNorm(nnx.Sequential(linear(6, 4), nnx.relu, linear(4, 3))),
            r"WeightNorm\(Sequential\) at the top normalises 2 variables "
            r"\(layers/0/kernel, layers/2/kernel\); the data-dependent init needs one kernel "
            r"per WeightNorm\.",
        ),
        (
            SpectralNorm(WeightNorm(linear(6, 3)), update_stats=False),
            r"WeightNorm\(Linear\) at 'layer_instance': SpectralNorm\(WeightNorm\) transforms "
            r"kernel after WeightNorm, so the scale no longer sets the output's scale\. Put "
            r"WeightNorm outermost: WeightNorm\(SpectralNorm\(\.\.\.\)\)\.",
        ),
        (
            WeightNorm(linear(6, 3), feature_axes=0),
            r"expected one scale and one bias per output feature \(the last axis of the "
            r"output, 3\), got a scale of shape \(6,\) and a bias of shape \(3,\)",
        ),
        (
            WeightNorm(linear(6, 3), variable_filter=None),
            r"WeightNorm\(Linear\) at the top normalises 2 variables \(bias, kernel\)",
        ),
        (
            Twice(),
            r"WeightNorm\(Linear\) at 'layer' runs more than once in the call",
        ),
        (
            BuiltInTheCall(),
            r"WeightNorm\(Linear\) runs in the call but is not held by the model \(it is "
            r"built in the call\), so its scale has nowhere to be set\.",
        ),
    ],
    ids=["block", "not-outermost", "feature-axes", "bias-too", "twice", "built-in-the-call"],
)
@pytest.mark.filterwarnings("ignore:.*has no axis to normalise over")
def test_init_from_data_says_what_each_weight_norm_must_be(model, message):
    with pytest.raises(ValueError, match=message):
        init_from_data(model, BATCH)


def test_init_from_data_needs_a_weight_norm():
    with pytest.raises(
        ValueError,
        match=re.escape("init_from_data(Linear): the call ran no wrapkit WeightNorm, so"),
    ):
        init_from_data(linear(6, 3), BATCH)


def test_init_from_data_needs_a_batch_of_values():
    abstract = jax.ShapeDtypeStruct(BATCH.shape, BATCH.dtype)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "init_from_data(WeightNorm): the batch must be arrays, got 1 jax.ShapeDtypeStruct"
        ),
    ):
        init_from_data(WeightNorm(linear(6, 3)), abstract)


# -- the Linen twins ----------------------------------------------------------------------

IDS = jnp.array([[0, 3, 1]])
IMAGE = jax.random.normal(jax.random.key(4), (2, 5, 5, 3))


def twins():
    """(NNX wrapper, its Linen twin, input, call options), one per wrapper."""
    rngs = nnx.Rngs(7)
    dense = nn.Dense(3)
    ones = nnx.initializers.ones
    return [
        (WeightNorm(linear(4, 3)), wrapkit.linen.WeightNorm(dense), X, {}),
        (
            WeightNorm(nnx.Conv(3, 4, (3, 3), rngs=rngs)),
            wrapkit.linen.WeightNorm(nn.Conv(4, (3, 3))),
            IMAGE,
            {},
        ),
        (
            WeightNorm(nnx.Embed(5, 3, rngs=rngs), variable_filter="embedding"),
            wrapkit.linen.WeightNorm(nn.Embed(5, 3), variable_filter={"embedding"}),
            IDS,
            {},
        ),
        (
            SpectralNorm(linear(4, 3), rngs=rngs),
            wrapkit.linen.SpectralNorm(dense),
            X,
            {"update_stats": False},
        ),
        (
            LoRA(linear(4, 3), rank=2, b_init=ones, rngs=rngs),
            wrapkit.linen.LoRA(dense, rank=2),
            X,
            {},
        ),
        (FakeQuant(linear(4, 3), bits=4), wrapkit.linen.FakeQuant(dense, bits=4), X, {}),
        (WeightStandardization(linear(4, 3)), wrapkit.linen.WeightStandardization(dense), X, {}),
        (
            WeightNorm(SpectralNorm(linear(4, 3), rngs=rngs)),
            wrapkit.linen.WeightNorm(wrapkit.linen.SpectralNorm(dense)),
            X,
            {"update_stats": False},
        ),
        (
            WeightNorm(Gain(linear(4, 3))),
            wrapkit.linen.WeightNorm(LinenGain(dense)),
            X,
            {},
        ),
    ]


TWIN_IDS = [
    "weight-norm",
    "conv",
    "embed",
    "spectral-norm",
    "lora",
    "fake-quant",
    "weight-standardization",
    "stack",
    "own-stack",
]


@pytest.mark.parametrize("index", range(len(TWIN_IDS)), ids=TWIN_IDS)
def test_the_linen_twin_on_converted_variables_gives_the_nnx_outputs(index):
    model, twin, x, options = twins()[index]
    scaled(model)
    variables = to_linen_variables(model)
    expected = jax.tree.map(jnp.shape, twin.init(jax.random.key(0), x, **options))
    assert jax.tree.map(jnp.shape, variables) == expected
    chex.assert_trees_all_close(twin.apply(variables, x, **options), model(x, **options), atol=1e-5)


@pytest.mark.parametrize("index", range(len(TWIN_IDS)), ids=TWIN_IDS)
def test_nnx_to_linen_to_nnx_is_lossless(index):
    model, _, x, options = twins()[index]
    scaled(model)
    other = twins()[index][0]  # the same wrapper, other values
    for _, variable in nnx.to_flat_state(nnx.state(other, nnx.Param)):
        variable[...] = variable[...] + 1
    from_linen_variables(other, to_linen_variables(model))
    chex.assert_trees_all_equal(raw(other), raw(model))
    chex.assert_trees_all_equal(other(x, **options), model(x, **options))


def test_linen_variables_come_back_into_the_nnx_twin():
    twin = wrapkit.linen.WeightNorm(wrapkit.linen.SpectralNorm(nn.Dense(3)))
    variables = twin.init(jax.random.key(0), X, update_stats=False)
    model = WeightNorm(SpectralNorm(linear(4, 3), rngs=nnx.Rngs(1)))
    from_linen_variables(model, variables)
    chex.assert_trees_all_close(
        model(X, update_stats=False), twin.apply(variables, X, update_stats=False), atol=1e-6
    )


def test_from_linen_variables_names_what_does_not_fit():
    model = WeightNorm(linear(4, 3))
    variables = to_linen_variables(WeightNorm(linear(4, 5)))
    variables["params"]["extra"] = jnp.zeros(())
    del variables["params"]["layer_instance/kernel/scale"]
    before = raw(model)
    with pytest.raises(
        ValueError,
        match=r"from_linen_variables\(WeightNorm\(Linear\)\): the variables do not fit the "
        r"wrapper: missing params/layer_instance/kernel/scale \(3,\); not in the model: "
        r"params/extra \(\); wrong shapes: params/layer_instance/bias is \(5,\), expected "
        r"\(3,\); params/layer_instance/kernel is \(4, 5\), expected \(4, 3\)\.",
    ):
        from_linen_variables(model, variables)
    chex.assert_trees_all_equal(raw(model), before)


def test_the_converter_takes_a_wrapper_around_one_module():
    with pytest.raises(
        TypeError,
        match=r"to_linen_variables\(Linear\): expected a wrapkit\.nnx wrapper \(or a stack of "
        r"them\) around one module, got flax\.nnx\.nn\.linear\.Linear\.",
    ):
        to_linen_variables(linear(4, 3))
    with pytest.raises(
        ValueError,
        match=r"but Sequential holds wrappers itself \(at 'layers/0'\)\. Convert each stack",
    ):
        to_linen_variables(Doubled(nnx.Sequential(WeightNorm(linear(4, 3)))))
