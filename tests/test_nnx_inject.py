"""wrapkit.nnx.inject: wrappers put into an NNX model by pattern, in place.

Expected outputs are the same model with the wrappers put in by hand (or computed by hand
in numpy); the report's counts are the layers' sizes.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import graphlib

import wrapkit.linen
from wrapkit.nnx import LoRA, SpectralNorm, WeightNorm, Wrapper, fold, inject

X = jax.random.normal(jax.random.key(1), (2, 4))


class Encoder(nnx.Module):
    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Linear(4, 8, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(8, 16, rngs=rngs), nnx.gelu, nnx.Linear(16, 8, rngs=rngs)
        )

    def __call__(self, x):
        return self.mlp(nnx.relu(self.embed(x)))


class Doubled(Wrapper):
    default_filter = ("kernel",)

    def transform(self, leaf):
        return 2 * leaf.value


def normalised(kernel):
    kernel = np.asarray(kernel, np.float64)
    return kernel / np.linalg.norm(kernel, axis=0)


def raw(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def structure(model):
    return jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model)))


def wrapped_paths(model):
    return sorted("/".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, Wrapper))


def test_inject_wraps_the_matching_submodules_in_place():
    model = Encoder()
    plain = Encoder()
    report = inject(model, WeightNorm, ["embed", "mlp/layers/*"])
    assert str(report) == "\n".join(
        [
            "inject WeightNorm: 3 modules wrapped",
            "  'embed' -> embed (Linear)",
            "  'mlp/layers/*' -> mlp/layers/0 (Linear), mlp/layers/2 (Linear)",
            "trainable params: 352 || all params: 352 || trainable%: 100.00",
            "  original 320 + WeightNorm's own 32",
        ]
    )
    assert wrapped_paths(model) == ["embed", "mlp/layers/0", "mlp/layers/2"]
    # The model's variables, one layer_instance down; the scales beside them.
    shapes = structure(model)
    assert shapes["embed"] == {
        "layer_instance": {"bias": (8,), "kernel": (4, 8)},
        "scale": {"kernel": (8,)},
    }
    assert report.added == (
        ("embed", "scale", "kernel"),
        ("mlp", "layers", 0, "scale", "kernel"),
        ("mlp", "layers", 2, "scale", "kernel"),
    )
    chex.assert_trees_all_equal(raw(model.embed.layer_instance), raw(plain.embed))
    # The same as normalising every kernel by hand.
    for layer in (plain.embed, plain.mlp.layers[0], plain.mlp.layers[2]):
        layer.kernel[...] = normalised(layer.kernel[...])
    chex.assert_trees_all_close(model(X), plain(X), atol=1e-6)


def test_inject_counts_only_the_adapters_as_trainable_over_a_frozen_model():
    model = Encoder()
    rngs = nnx.Rngs(1)
    report = inject(model, lambda m: LoRA(m, rank=2, rngs=rngs), "embed", freeze_original=True)
    assert (report.original_params, report.added_params) == (320, 4 * 2 + 2 * 8)
    assert report.trainable_params == report.added_params
    assert report.added == (("embed", "lora_a", "kernel"), ("embed", "lora_b", "kernel"))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("layers/0", ["mlp/layers/0"]),
        ("/embed", ["embed"]),
        ("/layers/0", []),
        (nnx.Linear, ["embed", "mlp/layers/0", "mlp/layers/2"]),
        (lambda path, module: path.endswith("2"), ["mlp/layers/2"]),
        (["embed", nnx.Linear], ["embed", "mlp/layers/0", "mlp/layers/2"]),
    ],
    ids=["tail", "anchored", "anchored-miss", "class", "callable", "overlapping"],
)
def test_patterns_match_the_end_of_the_slash_joined_nnx_path(pattern, expected):
    model = Encoder()
    report = inject(model, WeightNorm, pattern, strict=False)
    assert list(report.wrapped) == expected
    assert wrapped_paths(model) == expected


def test_a_pattern_that_matches_nothing_is_an_error_that_lists_the_submodules():
    model = Encoder()
    before = raw(model)
    with pytest.raises(
        ValueError,
        match=r"^inject\(WeightNorm\): pattern 'mlp/layer_0' matches none of the 4 submodules "
        r"of Encoder: embed \(Linear\), mlp \(Sequential\), mlp/layers/\{0,2\} \(Linear\)\. "
        r"Did you mean 'layers'\? Pass strict=False to allow a pattern that matches "
        r"nothing\.$",
    ):
        inject(model, WeightNorm, ["embed", "mlp/layer_0"])
    assert wrapped_paths(model) == []  # nothing was changed
    chex.assert_trees_all_equal(raw(model), before)


def test_strict_false_reports_the_patterns_that_matched_nothing():
    report = inject(Encoder(), WeightNorm, ["embed", "head"], strict=False)
    assert report.unmatched == ("'head'",)
    assert "  'head' -> nothing matched" in str(report)


class Tied(nnx.Module):
    def __init__(self):
        self.encoder = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.decoder = self.encoder

    def __call__(self, x):
        return self.decoder(self.encoder(x))


def test_a_module_held_twice_gets_one_wrapper_in_both_places():
    model = Tied()
    report = inject(model, WeightNorm, "encoder")
    assert model.encoder is model.decoder
    assert isinstance(model.encoder, WeightNorm)
    assert report.added_params == 4
    kernel = normalised(model.encoder.layer_instance.kernel[...])
    expected = (np.asarray(X, np.float64) @ kernel) @ kernel
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-6)


def test_nested_matches_wrap_both_the_inner_first_as_explicit_nesting_would():
    model = Encoder()
    inject(model, Doubled, ["mlp", "mlp/layers/0"])
    assert wrapped_paths(model) == ["mlp", "mlp/layer_instance/layers/0"]
    by_hand = Encoder()
    by_hand.mlp = Doubled(by_hand.mlp)
    by_hand.mlp.layer_instance.layers[0] = Doubled(by_hand.mlp.layer_instance.layers[0])
    chex.assert_trees_all_close(model(X), by_hand(X))
    # The first kernel is doubled twice.
    kernel = Encoder().mlp.layers[0].kernel[...]
    np.testing.assert_allclose(
        fold(model).mlp.layers[0].kernel[...], 4 * np.asarray(kernel), rtol=1e-6
    )


def test_factories_partials_stacks_and_classes():
    rngs = nnx.Rngs(0)
    model = Encoder()
    inject(model, functools.partial(WeightNorm, use_scale=False), "embed")
    inject(model, lambda m: WeightNorm(SpectralNorm(m, rngs=rngs)), "mlp/layers/0")
    assert not hasattr(model.embed, "scale")
    assert isinstance(model.mlp.layers[0].layer_instance, SpectralNorm)
    assert model(X).shape == (2, 8)


def test_inject_into_a_wrapper_inside_a_stack():
    model = nnx.Sequential(WeightNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0))))
    expected = model(X)
    inject(model, Doubled, "layers/0/layer_instance")
    assert isinstance(model.layers[0].layer_instance, Doubled)
    # WeightNorm of 2 v is WeightNorm of v.
    chex.assert_trees_all_close(model(X), expected, atol=1e-6)


def test_inside_a_wrapped_module_whose_variables_would_move_is_refused():
    block = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    model = nnx.Sequential(WeightNorm(block))
    before = raw(model)
    with pytest.raises(
        ValueError,
        match=r"inject\(Doubled\): WeightNorm\(Sequential\) at 'layers/0' selects "
        r"layers/0/kernel of the module it wraps, and wrapping a module inside it would make "
        r"them layers/0/layer_instance/kernel: a wrapper keys its own variables by those "
        r"paths, fixed when it was built\.",
    ):
        inject(model, Doubled, "layer_instance/layers/0")
    assert block.layers[0].__class__ is nnx.Linear  # rolled back
    chex.assert_trees_all_equal(raw(model), before)


class Pair(nnx.Module):
    def __init__(self):
        self.pair = nnx.data((nnx.Linear(4, 4, rngs=nnx.Rngs(0)),))


@pytest.mark.parametrize(
    ("model", "pattern", "message"),
    [
        (
            nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
            nnx.Linear,
            r"inject\(WeightNorm\): the model itself \(Linear\) matches, but inject wraps "
            r"submodules in place and cannot replace the model it is given; wrap it "
            r"directly, Wrapper\(Linear\(\.\.\.\)\)\.",
        ),
        (
            Pair(),
            "pair/0",
            r"inject\(WeightNorm\): pair/0 \(Linear\) is held in a tuple at 'pair', which "
            r"cannot be changed in place; hold it in an nnx\.List or a list\.",
        ),
    ],
    ids=["the-model", "tuple"],
)
def test_what_cannot_be_wrapped_in_place_is_an_error_whatever_strict_says(model, pattern, message):
    with pytest.raises(ValueError, match=message):
        inject(model, WeightNorm, pattern, strict=False)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (
            (Encoder, WeightNorm, "embed"),
            TypeError,
            r"inject: model must be a flax\.nnx\.Module instance, got the class Encoder; build "
            r"it first",
        ),
        (
            (nn.Dense(3), WeightNorm, "embed"),
            TypeError,
            r"model must be a flax\.nnx\.Module, got flax\.linen\.linear\.Dense\. For a Linen "
            r"model, use wrapkit\.linen\.inject\.",
        ),
        (
            (Encoder(), WeightNorm(nnx.Linear(2, 2, rngs=nnx.Rngs(0))), "embed"),
            TypeError,
            r"wrapper must build a wrapper around the module it is given, got the module "
            r"WeightNorm\(\.\.\.\) itself\.",
        ),
        (
            (Encoder(), nnx.WeightNorm, "embed"),
            TypeError,
            r"wrapper flax\.nnx\.nn\.normalization\.WeightNorm is not a wrapkit\.nnx\.Wrapper; "
            r".* Use wrapkit\.nnx\.WeightNorm\.",
        ),
        (
            (Encoder(), wrapkit.linen.LoRA, "embed"),
            TypeError,
            r"wrapper wrapkit\.linen\._lora\.LoRA is not a wrapkit\.nnx\.Wrapper; .* Use "
            r"wrapkit\.nnx\.LoRA\.",
        ),
        (
            (Encoder(), WeightNorm, [nn.Dense, 3]),
            TypeError,
            r"inject has 2 problems:\n  - pattern Dense is a class but not a flax\.nnx\.Module "
            r"subclass; pass an NNX module class such as nnx\.Linear\.\n  - pattern 3 \(int\) "
            r"is neither a path string, an NNX module class nor a callable",
        ),
        (
            (Encoder(), WeightNorm, "mlp//layers"),
            ValueError,
            r"inject: pattern 'mlp//layers' has an empty path element\.",
        ),
        (
            (Encoder(), WeightNorm, []),
            ValueError,
            r"inject: no pattern was given; pass e\.g\. 'linear1', nnx\.Linear or a callable\.",
        ),
    ],
    ids=[
        "class",
        "linen-model",
        "module-as-factory",
        "flax-wrapper",
        "linen-wrapper",
        "pattern-kinds",
        "empty-element",
        "no-pattern",
    ],
)
def test_arguments_of_the_wrong_kind_or_value_are_named(arguments, error, message):
    with pytest.raises(error, match=message):
        inject(*arguments)


def test_inject_checks_strict_is_a_bool():
    with pytest.raises(TypeError, match=r"inject: strict must be True or False, got 'yes'\."):
        inject(Encoder(), WeightNorm, "embed", strict="yes")


class Needs(Doubled):
    def transform(self, leaf, *, factor):
        return factor * leaf.value


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            lambda module: module,
            r"inject\(<lambda>\): the wrapper factory <lambda> returned "
            r"flax\.nnx\.nn\.linear\.Linear for mlp/layers/0 \(Linear\); it must return a "
            r"wrapkit\.nnx\.Wrapper around the module it is given\.",
        ),
        (
            lambda module: WeightNorm(nnx.Linear(8, 16, rngs=nnx.Rngs(0))),
            r"returned WeightNorm\(Linear\), which does not wrap the Linear at mlp/layers/0 it "
            r"was given; build the wrapper around the factory's argument\.",
        ),
        (
            Needs,
            r"inject\(Needs\): Needs\(Linear\) takes the call option 'factor' on every call, "
            r"with no default, and the model's code does not pass it\.",
        ),
    ],
    ids=["not-a-wrapper", "another-module", "call-option"],
)
def test_a_factory_that_builds_the_wrong_thing_is_refused_and_nothing_changes(factory, message):
    model = Encoder()
    before = raw(model)
    with pytest.raises(TypeError, match=message):
        inject(model, factory, ["embed", "mlp/layers/0"])
    assert wrapped_paths(model) == []
    chex.assert_trees_all_equal(raw(model), before)


def test_a_wrapper_that_fails_to_build_names_the_submodule_and_changes_nothing():
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Dropout(0.1))
    with pytest.raises(ValueError, match=r"selects none of the Param variables of Dropout") as info:
        inject(model, WeightNorm, ["layers/0", "layers/1"])
    assert "inject: building the wrapper around layers/1 (Dropout)" in info.value.__notes__
    assert wrapped_paths(model) == []


def test_gradients_through_an_injected_model_equal_those_of_the_model_wrapped_by_hand():
    model, by_hand = Encoder(), Encoder()
    inject(model, WeightNorm, "mlp/layers/2")
    by_hand.mlp.layers[2] = WeightNorm(by_hand.mlp.layers[2])

    def loss(m):
        return jnp.sum(m(X) ** 2)

    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.grad(loss)(model)), nnx.to_pure_dict(nnx.grad(loss)(by_hand))
    )


def test_flax_behaviour_inject_relies_on_node_dict_and_in_place_assignment():
    """flax 0.12.8: a module's graph node lists its attributes, an nnx.List its items by
    index (the keys of nnx.state paths); assigning an attribute or an item replaces it."""
    model = Encoder()
    impl = graphlib.get_node_impl(model.mlp.layers)
    assert impl is not None
    assert impl.node_dict(model.mlp.layers)[0] is model.mlp.layers[0]
    assert graphlib.get_node_impl(model).node_dict(model)["embed"] is model.embed
    replacement = nnx.Linear(8, 16, rngs=nnx.Rngs(1))
    model.mlp.layers[0] = replacement
    assert model.mlp.layers[0] is replacement
    assert ("mlp", "layers", 0, "kernel") in dict(nnx.to_flat_state(nnx.state(model)))
