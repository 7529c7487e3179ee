"""inject: wrappers put into an existing model by pattern, without editing its code.

Each numeric test compares the injected model with a hand-written one where the same layers
are wrapped explicitly, on the same (randomised) variables, and with the plain model run on
kernels normalised by hand.
"""

import dataclasses
import functools
import re

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from wrapkit.linen import Injected, InjectReport, SpectralNorm, WeightNorm, Wrapper, _inject, inject

X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
EXPERT_X = jnp.linspace(-1.0, 1.0, 4 * 2 * 3).reshape(4, 2, 3)  # (experts, batch, features)
KEY = jax.random.key(0)


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


# -- models, each with a hand-written twin whose target layers are wrapped explicitly ------


class CompactMLP(nn.Module):
    wrapped: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(4)(x))
        dense = nn.Dense(3)
        return (WeightNorm(dense) if self.wrapped else dense)(x)


class SetupMLP(nn.Module):
    def setup(self):
        self.enc = nn.Dense(4)
        self.dec = nn.Dense(3)

    def __call__(self, x):
        return self.dec(nn.relu(self.enc(x))) + self.dec(x[:, ::-1] @ jnp.eye(3, 4))

    def encode(self, x):
        return self.enc(x)


class ExplicitSetupMLP(nn.Module):
    """SetupMLP by hand: the same layers, both wrapped, built in a compact method."""

    @nn.compact
    def __call__(self, x):
        enc = WeightNorm(nn.Dense(4, name="enc"))
        dec = WeightNorm(nn.Dense(3, name="dec"))
        return dec(nn.relu(enc(x))) + dec(x[:, ::-1] @ jnp.eye(3, 4))


class ExplicitSequential(nn.Module):
    """nn.Sequential([Dense(4), relu, Dense(3)]) by hand, its last layer wrapped."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(4, name="layers_0")(x))
        return WeightNorm(nn.Dense(3, name="layers_2"))(x)


class Layer(nn.Module):
    wrapped: bool = False

    @nn.compact
    def __call__(self, x, _):
        dense = nn.Dense(3)
        return nn.tanh((WeightNorm(dense) if self.wrapped else dense)(x)), None


class Scanned(nn.Module):
    """Three layers stacked by nn.scan: each kernel is (3, in, out)."""

    wrapped: bool = False

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(self.wrapped, name="layers")(x, None)[0]


class Expert(nn.Module):
    wrapped: bool = False

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(5, name="proj")
        return (WeightNorm(dense) if self.wrapped else dense)(x)


class VmappedExperts(nn.Module):
    """Four experts made by nn.vmap: the kernel is (4, in, out)."""

    wrapped: bool = False

    @nn.compact
    def __call__(self, x):
        experts = nn.vmap(
            Expert,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=0,
            out_axes=0,
        )
        return experts(self.wrapped, name="experts")(x)


class EinsumExperts(nn.Module):
    """One (experts, in, out) kernel, used by an einsum."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        kernel = self.param("kernel", init, (4, x.shape[-1], 5))
        return jnp.einsum("ebi,eio->ebo", x, kernel)


class MoE(nn.Module):
    wrapped: bool = False

    @nn.compact
    def __call__(self, x):
        experts = EinsumExperts(name="experts")
        if self.wrapped:
            experts = WeightNorm(experts, feature_axes=(0, -1))
        return experts(x)


class Rematted(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.remat(nn.Dense)(4, name="checkpointed")(x))
        return nn.Dense(3)(x)


PER_EXPERT = functools.partial(WeightNorm, feature_axes=(0, -1))

# name: (model, pattern, wrapper, the hand-written twin wrapping the same layers explicitly
# or None, input, the kernels' axis the norm reduces over)
CASES = {
    "compact": (CompactMLP(), "Dense_1", WeightNorm, CompactMLP(True), X, -2),
    "setup": (SetupMLP(), ["enc", "dec"], WeightNorm, ExplicitSetupMLP(), X, -2),
    "sequential": (
        nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)]),
        "layers_2",
        WeightNorm,
        ExplicitSequential(),
        X,
        -2,
    ),
    "scan-per-layer": (Scanned(), "layers/Dense_0", WeightNorm, Scanned(True), X, -2),
    "scan-whole-body": (Scanned(), "/layers", WeightNorm, None, X, -2),
    "vmap-experts": (VmappedExperts(), "proj", WeightNorm, VmappedExperts(True), EXPERT_X, -2),
    "einsum-experts": (MoE(), "experts", PER_EXPERT, MoE(True), EXPERT_X, -2),
    "remat": (Rematted(), "checkpointed", WeightNorm, None, X, -2),
}
ADDED_SHAPES = {
    # Beside the wrapped module, one scope per parent, as a wrapper made in @nn.compact.
    "compact": {"WeightNorm/Dense_1/kernel/scale": (3,)},
    "setup": {"WeightNorm/enc/kernel/scale": (4,), "WeightNorm/dec/kernel/scale": (3,)},
    "sequential": {"WeightNorm/layers_2/kernel/scale": (3,)},
    # Inside the transform, stacked with the body: one scale per layer, one per expert.
    "scan-per-layer": {"layers/WeightNorm/Dense_0/kernel/scale": (3, 3)},
    "vmap-experts": {"experts/WeightNorm/proj/kernel/scale": (4, 5)},
    "einsum-experts": {"WeightNorm/experts/kernel/scale": (4, 5)},
    # The body of a transform itself has no parent there: its wrapper sits inside it.
    "scan-whole-body": {"layers/WeightNorm/layers/Dense_0/kernel/scale": (3, 3)},
    "remat": {"checkpointed/WeightNorm/checkpointed/kernel/scale": (4,)},
}


def flat(tree):
    """The tree's leaves by key tuple (wrapkit's variable names contain "/")."""
    return flatten_dict(jax.tree_util.tree_map(np.asarray, dict(tree)))


def text(key):
    return "/".join(key)


def added_keys(params):
    """The keys of the wrappers' variables: ``(..., "WeightNorm", "<module>/<path>")``."""
    return [key for key in params if len(key) >= 2 and key[-2] == "WeightNorm"]


def randomise(params, keys, seed=1):
    """``params`` with the leaves at ``keys`` drawn at random in [0.5, 2]."""
    params = dict(params)
    keys = sorted(keys)
    for rng, key in zip(jax.random.split(jax.random.key(seed), len(keys)), keys, strict=True):
        params[key] = np.asarray(jax.random.uniform(rng, params[key].shape, minval=0.5, maxval=2))
    return params


def by_hand(params, axis):
    """The plain model's params, each wrapped kernel normalised by hand over ``axis``.

    A scale ``(*parent, "WeightNorm", "<module>/<path>/scale")`` belongs to the kernel
    ``(*parent, <module>, <path>)``; a wrapper inside its module (the body of a transform)
    has ``(*parent, <module>, "WeightNorm", "<module>/<path>/scale")``.
    """
    added = added_keys(params)
    plain = {key: value for key, value in params.items() if key not in added}
    for key in added:
        name = tuple(key[-1].removesuffix("/scale").split("/"))
        parent = key[:-3] if key[-3:-2] == name[:1] else key[:-2]
        v = np.asarray(plain[parent + name], np.float64)
        g = np.expand_dims(np.asarray(params[key], np.float64), axis)
        plain[parent + name] = v / np.sqrt((v**2).sum(axis=axis, keepdims=True)) * g
    return plain


def inject_key(key):
    """A hand-written wrapper's variable under the key inject gives it: the wrapper made
    in @nn.compact is ``WeightNorm_0``, inject's is ``WeightNorm``."""
    return tuple(re.sub(r"^WeightNorm_\d+$", "WeightNorm", element) for element in key)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_models_variables_stay_and_only_the_wrappers_are_added(case):
    model, pattern, wrapper, _, x, _ = CASES[case]
    plain = flat(model.init(KEY, x)["params"])
    injected = flat(inject(model, wrapper, pattern).init(KEY, x)["params"])
    # The same initial values, under the same names: the wrapper takes no random key away
    # from the model.
    chex.assert_trees_all_equal({key: injected[key] for key in plain}, plain)
    added = {text(key): value.shape for key, value in injected.items() if key not in plain}
    assert added == ADDED_SHAPES[case]
    assert set(added) == {text(key) for key in added_keys(injected)}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_outputs_equal_the_hand_written_model_and_the_computation_by_hand(case, variant):
    model, pattern, wrapper, twin, x, axis = CASES[case]
    injected = inject(model, wrapper, pattern)
    params = flat(injected.init(KEY, x)["params"])
    params = randomise(params, added_keys(params))
    got = variant(injected.apply)({"params": unflatten_dict(params)}, x)

    want = model.apply({"params": unflatten_dict(by_hand(params, axis))}, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    if twin is not None:
        twin_keys = list(flat(twin.init(KEY, x)["params"]))
        assert {inject_key(key) for key in twin_keys} == set(params)
        twin_params = {key: params[inject_key(key)] for key in twin_keys}
        want = twin.apply({"params": unflatten_dict(twin_params)}, x)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_einsum_experts_get_one_scale_and_one_norm_per_expert():
    """An (experts, in, out) kernel: feature_axes=(0, -1) keeps the expert axis apart."""
    model, pattern, wrapper, _, x, _ = CASES["einsum-experts"]
    injected = inject(model, wrapper, pattern)
    params = flat(injected.init(KEY, x)["params"])
    params = randomise(params, added_keys(params))
    got = injected.apply({"params": unflatten_dict(params)}, x)
    kernel = params["experts", "kernel"]
    scale = params["WeightNorm", "experts/kernel/scale"]
    for e in range(4):  # each expert alone: a Dense normalised with its own scale
        w = kernel[e] / np.linalg.norm(kernel[e], axis=0) * scale[e]
        np.testing.assert_allclose(got[e], np.asarray(x[e]) @ w, rtol=1e-5, atol=1e-6)


def test_the_original_variables_plus_the_new_wrapper_variables_apply():
    model = SetupMLP()
    original = model.init(jax.random.key(7), X)  # a checkpoint of the plain model
    injected = inject(model, WeightNorm, "dec")
    fresh = injected.init(KEY, X)
    report = injected.report(fresh, X)
    assert report.added == (("params", "WeightNorm", "dec/kernel/scale"),)
    # The checkpoint, plus the wrapper's new variables, named as in flax.traverse_util.
    new = {key: value for key, value in flat(fresh).items() if key in report.added}
    merged = unflatten_dict({**flat(original), **new})
    params = flat(merged["params"])
    kernel, scale = params["dec", "kernel"], params["WeightNorm", "dec/kernel/scale"]
    plain = dict(params)
    del plain["WeightNorm", "dec/kernel/scale"]
    plain["dec", "kernel"] = kernel / np.linalg.norm(kernel, axis=0) * scale
    want = model.apply({"params": unflatten_dict(plain)}, X)
    np.testing.assert_allclose(injected.apply(merged, X), want, rtol=1e-5, atol=1e-6)


def test_a_stack_of_wrappers_with_a_call_option():
    model = CompactMLP()
    stack = inject(
        model,
        lambda m: WeightNorm(SpectralNorm(m)),
        "Dense_1",
        options={"update_stats": False},
    )
    variables = stack.init(KEY, X)
    params = flat(variables["params"])
    assert params["WeightNorm", "Dense_1/kernel/scale"].shape == (3,)
    stats = flat(variables["batch_stats"])
    inner = ("WeightNorm", "layer_instance")
    assert set(stats) == {(*inner, "Dense_1/kernel/u"), (*inner, "Dense_1/kernel/sigma")}
    u = (*inner, "Dense_1/kernel/u")
    _, same = stack.apply(variables, X, mutable=["batch_stats"])
    np.testing.assert_array_equal(flat(same["batch_stats"])[u], stats[u])
    training = stack.clone(options={"update_stats": True})
    assert hash(training) != hash(stack)  # a module's fields stay hashable
    _, updated = training.apply(variables, X, mutable=["batch_stats"])
    assert not np.allclose(flat(updated["batch_stats"])[u], stats[u])


def test_a_public_method_of_the_model_is_called_with_injection():
    injected = inject(SetupMLP(), WeightNorm, "enc")
    variables = injected.init(KEY, X)
    params = flat(variables["params"])
    kernel = params["enc", "kernel"]
    scale = params["WeightNorm", "enc/kernel/scale"]
    expected = X @ (kernel / np.linalg.norm(kernel, axis=0) * scale) + params["enc", "bias"]
    got = injected.apply(variables, X, method="encode")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_model_built_inside_a_parent_keeps_its_place():
    class Parent(nn.Module):
        @nn.compact
        def __call__(self, x):
            return inject(CompactMLP(), WeightNorm, "Dense_1")(x)

    params = {text(key) for key in flat(Parent().init(KEY, X)["params"])}
    assert params == {
        "CompactMLP_0/Dense_0/kernel",
        "CompactMLP_0/Dense_0/bias",
        "CompactMLP_0/Dense_1/kernel",
        "CompactMLP_0/Dense_1/bias",
        "CompactMLP_0/WeightNorm/Dense_1/kernel/scale",
    }


def test_a_module_class_and_a_callable_are_patterns():
    by_type = flat(inject(CompactMLP(), WeightNorm, nn.Dense).init(KEY, X)["params"])
    by_call = flat(
        inject(CompactMLP(), WeightNorm, lambda path, m: path.endswith("_0")).init(KEY, X)["params"]
    )
    assert [key[-1] for key in added_keys(by_type)] == [
        "Dense_0/kernel/scale",
        "Dense_1/kernel/scale",
    ]
    assert [key[-1] for key in added_keys(by_call)] == ["Dense_0/kernel/scale"]


PATTERN_CASES = {
    "last-element": ("c_attn", "h/0/attn/c_attn", True),
    "ends-the-path": ("attn/c_attn", "h/0/attn/c_attn", True),
    "not-a-prefix": ("attn", "h/0/attn/c_attn", False),
    "whole-elements": ("attn", "h/0/c_attn", False),
    "instances": ("Dense", "Block_0/Dense_1", True),
    "glob": ("attn/c_*", "h/0/attn/c_proj", True),
    "anchored": ("/h/0/attn", "h/0/attn", True),
    "anchored-elsewhere": ("/attn", "h/0/attn", False),
}


@pytest.mark.parametrize(("pattern", "path", "expected"), PATTERN_CASES.values(), ids=PATTERN_CASES)
def test_string_patterns_match_the_end_of_a_path_by_whole_elements(pattern, path, expected):
    (compiled,) = _inject._compile([pattern])
    assert compiled.matches(tuple(path.split("/")), nn.Dense(1)) is expected


# -- gpt-2 from transformers --------------------------------------------------------------


def test_weight_norm_on_every_attention_projection_of_transformers_gpt2():
    transformers = pytest.importorskip("transformers", reason="needs the compat extra")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 has no Flax models")
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16)
    gpt2 = FlaxGPT2LMHeadModel(config, seed=0)  # its module and its (random) parameters
    ids = jnp.arange(16).reshape(2, 8) % 128
    inputs = (ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(8), (2, 8)))

    # FlaxConv1D keeps its kernel as (out, in): the output features are axis 0.
    injected = inject(
        gpt2.module, functools.partial(WeightNorm, feature_axes=0), ["attn/c_attn", "attn/c_proj"]
    )
    fresh = flat(injected.init(KEY, *inputs)["params"])
    original = flat(gpt2.params)
    added = {key: value for key, value in fresh.items() if key not in original}
    assert {text(key) for key in added} == {
        f"transformer/h/{layer}/attn/WeightNorm/{proj}/kernel/scale"
        for layer in (0, 1)
        for proj in ("c_attn", "c_proj")
    }
    # The model's own parameters, plus the wrappers' (at random, so a misplaced one shows).
    merged = randomise({**original, **added}, list(added))
    params = unflatten_dict(merged)
    got = jax.jit(injected.apply)({"params": params}, *inputs)

    normalised = unflatten_dict(by_hand(merged, axis=1))
    want = gpt2.module.apply({"params": normalised}, *inputs)
    chex.assert_trees_all_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    raw = gpt2.module.apply({"params": gpt2.params}, *inputs)
    assert not np.allclose(raw.logits, got.logits, atol=1e-3)

    report = injected.report({"params": params}, *inputs)
    assert report.added_params == 2 * (3 * 32 + 32)
    assert str(report).splitlines()[:3] == [
        "inject WeightNorm: 4 modules wrapped",
        "  'attn/c_attn' -> transformer/h/0/attn/c_attn (FlaxConv1D), "
        "transformer/h/1/attn/c_attn (FlaxConv1D)",
        "  'attn/c_proj' -> transformer/h/0/attn/c_proj (FlaxConv1D), "
        "transformer/h/1/attn/c_proj (FlaxConv1D)",
    ]

    # The tied LM head runs in a Module.apply of its own: it is refused, not skipped.
    with pytest.raises(
        ValueError,
        match=r"inject\(WeightNorm\): lm_head \(Dense\) runs in a Module\.apply of its own "
        r"\(as a tied LM head does\), on variables passed to that apply rather than the "
        r"model's, so a wrapper's variables would have nowhere to live\. Leave it out of the "
        r"pattern",
    ):
        inject(gpt2.module, WeightNorm, nn.Dense).init(KEY, *inputs)


# -- strictness ----------------------------------------------------------------------------


def test_a_misspelled_pattern_is_an_error_even_when_another_matches():
    with pytest.raises(
        ValueError,
        match=r"^inject\(WeightNorm\): pattern 'Dens_1' matches none of the 2 submodules this "
        r"call reached: Dense_0 \(Dense\), Dense_1 \(Dense\)\. Did you mean 'Dense_1' or "
        r"'Dense_0'\? Pass strict=False to allow a pattern that matches nothing\.",
    ):
        inject(CompactMLP(), WeightNorm, ["Dense_0", "Dens_1"]).init(KEY, X)


def test_every_pattern_that_matches_nothing_is_listed_once():
    with pytest.raises(ValueError, match=r"inject\(WeightNorm\) has 2 problems:\n  - pattern 'a'"):
        inject(CompactMLP(), WeightNorm, ["a", "Dense_0", "b"]).init(KEY, X)


def test_layers_that_differ_by_index_are_listed_once():
    listed = _inject._listing(
        {"h/0/attn": "Attention", "h/1/attn": "Attention", "h/2/attn": "Attention", "ln": "LN"}
    )
    assert listed == ["h/{0..2}/attn (Attention)", "ln (LN)"]


def test_not_strict_allows_a_pattern_that_matches_nothing_and_the_report_says_so():
    injected = inject(CompactMLP(), WeightNorm, ["Dense_1", "missing"], strict=False)
    variables = injected.init(KEY, X)
    report = injected.report(variables, X)
    assert report.unmatched == ("'missing'",)
    assert "  'missing' -> nothing matched" in str(report).splitlines()


def test_a_submodule_set_up_but_not_called_is_not_a_match():
    class Peeks(nn.Module):
        def setup(self):
            self.unused = SetupMLP()
            self.used = nn.Dense(3)

        def __call__(self, x):
            assert self.unused.enc.features == 4  # runs SetupMLP's setup, calls nothing
            return self.used(x)

    with pytest.raises(ValueError, match=r"pattern 'unused' matches none of the 1 submodules"):
        inject(Peeks(), WeightNorm, "unused").init(KEY, X)


class TiedHead(nn.Module):
    """A head run through a Module.apply of its own, on the embedding's transpose."""

    @nn.compact
    def __call__(self, x):
        embed = nn.Dense(3, name="embed")
        x = embed(x)
        kernel = embed.variables["params"]["kernel"].T
        return nn.Dense(3, use_bias=False, name="head").apply({"params": {"kernel": kernel}}, x)


def test_a_submodule_run_by_its_own_apply_is_refused_even_when_not_strict():
    with pytest.raises(
        ValueError,
        match=r"inject\(WeightNorm\): head \(Dense\) runs in a Module\.apply of its own",
    ):
        inject(TiedHead(), WeightNorm, nn.Dense, strict=False).init(KEY, X)
    # The report lists it; a callable pattern leaves it out.
    injected = inject(TiedHead(), WeightNorm, nn.Dense)
    variables = inject(TiedHead(), WeightNorm, "embed").init(KEY, X)
    report = injected.report(variables, X)
    assert list(report.unwrappable) == ["head"]
    assert report.matched == {"Dense": ("embed", "head")}
    assert "  not wrapped: head (Dense) runs in a Module.apply of its own" in str(report)
    embed_only = inject(TiedHead(), WeightNorm, lambda path, m: path != "head" and m.name)
    assert embed_only.apply(variables, X).shape == (2, 3)


# -- the report ----------------------------------------------------------------------------


def test_the_report_counts_parameters_from_abstract_variables():
    injected = inject(SetupMLP(), WeightNorm, ["enc", "dec"])
    variables = jax.eval_shape(injected.init, KEY, X)
    report = injected.report(variables, jax.ShapeDtypeStruct(X.shape, X.dtype))
    assert isinstance(report, InjectReport)
    assert (report.original_params, report.added_params) == (3 * 4 + 4 + 4 * 3 + 3, 4 + 3)
    assert report.total_params == report.trainable_params == 38
    assert str(report) == "\n".join(
        [
            "inject WeightNorm: 2 modules wrapped",
            "  'enc' -> enc (Dense)",
            "  'dec' -> dec (Dense)",
            "trainable params: 38 || all params: 38 || trainable%: 100.00",
            "  original 31 + WeightNorm's own 7",
        ]
    )
    frozen = injected.report(variables, X, freeze_original=True)
    assert frozen.trainable_params == 7
    assert "trainable params: 7 || all params: 38 || trainable%: 18.42" in str(frozen)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.added_params = 0  # type: ignore[misc]


def test_partitioned_kernels_keep_their_boxes_and_are_counted():
    init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))

    class Sharded(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, kernel_init=init, name="proj")(x)

    injected = inject(Sharded(), WeightNorm, "proj")
    variables = jax.eval_shape(injected.init, KEY, X)
    scale = variables["params"]["WeightNorm"]["proj/kernel/scale"]
    assert isinstance(scale, nn.Partitioned) and scale.names == ("mlp",)
    report = injected.report(variables, X)
    assert (report.original_params, report.added_params) == (3 * 4 + 4, 4)


# -- errors when inject is called ----------------------------------------------------------


def test_a_model_class_and_flax_wrappers_are_refused_with_the_fix():
    with pytest.raises(
        TypeError,
        match=r"inject has 2 problems:\n  - model must be a flax\.linen\.Module instance, got "
        r"the class SetupMLP; build it first: inject\(SetupMLP\(\.\.\.\), \.\.\.\)\.\n  - "
        r"wrapper flax\.linen\.normalization\.WeightNorm is not a wrapkit\.linen\.Wrapper; .* "
        r"Use wrapkit\.linen\.WeightNorm, a drop-in with the same arguments\.",
    ):
        inject(SetupMLP, nn.WeightNorm, "dec")


def test_a_built_wrapper_is_refused():
    with pytest.raises(
        TypeError,
        match=r"inject: wrapper must build a wrapper around the module it is given, got the "
        r"module WeightNorm\(\.\.\.\) itself\. Pass the class or a factory",
    ):
        inject(SetupMLP(), WeightNorm(nn.Dense(3)), "dec")


BAD_PATTERNS = {
    "empty-element": ("attn//c_attn", ValueError, r"pattern 'attn//c_attn' has an empty path"),
    "empty": ("", ValueError, r"pattern '' has an empty path element"),
    "no-pattern": ([], ValueError, r"no pattern was given"),
    "not-a-module-class": (int, TypeError, r"pattern int is a class but not a flax\.linen"),
    "a-number": ([3], TypeError, r"pattern 3 \(int\) is neither a path string"),
}


@pytest.mark.parametrize(("pattern", "error", "message"), BAD_PATTERNS.values(), ids=BAD_PATTERNS)
def test_bad_patterns_are_refused_when_inject_is_called(pattern, error, message):
    with pytest.raises(error, match=r"^inject: " + message):
        inject(SetupMLP(), WeightNorm, pattern)


def test_options_are_checked_against_the_wrapper():
    with pytest.raises(
        TypeError,
        match=r"inject: SpectralNorm needs the call option 'update_stats' on every call, and the "
        r"model's code does not pass it: give it to inject, options=\{'update_stats': \.\.\.\}\.",
    ):
        inject(SetupMLP(), SpectralNorm, "dec")
    with pytest.raises(
        TypeError,
        match=r"inject: option 'train' is a call option of no wrapper: WeightNorm takes none\.",
    ):
        inject(SetupMLP(), WeightNorm, "dec", options={"train": True})


# -- errors when the wrapper is built, in the call ----------------------------------------


def test_a_factory_that_does_not_return_a_wrapper_is_refused():
    with pytest.raises(
        TypeError,
        match=r"inject: the wrapper factory <lambda> returned flax\.linen\.normalization\."
        r"WeightNorm for dec \(Dense\); it must return a wrapkit\.linen\.Wrapper around the "
        r"module it is given\.",
    ):
        inject(SetupMLP(), lambda m: nn.WeightNorm(m), "dec").init(KEY, X)


def test_a_factory_that_wraps_another_module_is_refused():
    with pytest.raises(
        TypeError,
        match=r"inject: the wrapper factory <lambda> returned WeightNorm\(Dense\), which does not "
        r"wrap the Dense at dec it was given",
    ):
        inject(SetupMLP(), lambda m: WeightNorm(nn.Dense(3)), "dec").init(KEY, X)


def test_a_private_method_called_from_outside_is_refused():
    class Helper(nn.Module):
        @nn.compact
        def _project(self, x):
            return nn.Dense(3)(x)

    class Caller(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Helper(name="helper")._project(x)

    with pytest.raises(
        ValueError,
        match=r"helper \(Helper\) has its private method '_project' called from outside it, "
        r"and wrappers delegate only __call__ and public methods",
    ):
        inject(Caller(), WeightNorm, "helper").init(KEY, X)


def test_a_name_taken_by_the_parent_is_refused():
    class Owner(nn.Module):
        def setup(self):
            self.WeightNorm = nn.Dense(3)
            self.owned = nn.Dense(3)

        def __call__(self, x):
            return self.WeightNorm(self.owned(x))

    with pytest.raises(
        ValueError,
        match=r"^inject: the parent of owned \(Dense\) already has a submodule or variable "
        r"named 'WeightNorm', where inject would put the wrapper's variables; pass name=\.\.\. "
        r"to inject\.",
    ):
        inject(Owner(), WeightNorm, "owned").init(KEY, X)
    params = flat(inject(Owner(), WeightNorm, "owned", name="wn").init(KEY, X)["params"])
    assert ("wn", "owned/kernel/scale") in params


def test_statistics_inside_the_body_of_a_transform_are_refused():
    """SpectralNorm's u would be overwritten there: flax's map_variables returns the
    collections it does not map as they were."""

    class ScannedWithStats(nn.Module):
        @nn.compact
        def __call__(self, x):
            axes = {"params": 0, "batch_stats": 0}
            stack = nn.scan(Layer, variable_axes=axes, split_rngs={"params": True}, length=3)
            return stack(name="layers")(x, None)[0]

    model = ScannedWithStats()
    # Beside a module inside the body, the statistics are fine, per layer.
    spectral = inject(model, SpectralNorm, "Dense_0", options={"update_stats": True})
    stats = flat(spectral.init(KEY, X)["batch_stats"])
    assert stats["layers", "SpectralNorm", "Dense_0/kernel/u"].shape == (3, 1, 3)
    with pytest.raises(
        ValueError,
        match=r"inject: layers \(Layer\) is the body of a lifted transform \(nn\.scan, nn\.vmap, "
        r"nn\.remat, \.\.\.\), so SpectralNorm\(layers\) has to sit inside it, and it keeps "
        r"variables in 'batch_stats'.* Match the modules inside layers instead",
    ):
        inject(model, SpectralNorm, "/layers", options={"update_stats": True}).init(KEY, X)


def test_a_custom_wrapper_is_injected_too():
    class Doubled(Wrapper):
        variable_filter = "kernel"

        def transform(self, leaf):
            return 2.0 * leaf.value

    model = CompactMLP()
    variables = model.init(KEY, X)
    injected = inject(model, Doubled, "Dense_1")
    doubled = flat(variables["params"])
    doubled["Dense_1", "kernel"] = 2 * doubled["Dense_1", "kernel"]
    want = model.apply({"params": unflatten_dict(doubled)}, X)
    np.testing.assert_allclose(injected.apply(variables, X), want, rtol=1e-6)


# -- the flax behaviour inject relies on (the "flax internals" section of _inject.py) ------


def test_flax_behaviour_inject_relies_on_building_unbound_inside_an_interceptor():
    parents = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, CompactMLP):
            parents["plain"] = nn.Dense(1).parent
            with _inject._building_unbound():
                parents["unbound"] = nn.Dense(1).parent
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        CompactMLP().init(KEY, X)
    assert isinstance(parents["plain"], CompactMLP)  # a child of the intercepted module
    assert parents["unbound"] is None


def test_flax_behaviour_inject_relies_on_lifted_calls_and_apply_roots():
    seen = []

    class Tied(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Scanned(name="body")(x)
            head = nn.Dense(3, name="head")
            return head.apply({"params": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}}, x)

    roots = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        root = _inject._root(module.scope)
        roots.append(root)
        internal = _inject._is_flax_internal(module, root)
        kind = "model" if root is roots[0] else "apply" if _inject._is_apply_root(root) else "lift"
        seen.append((type(module).__name__, context.method_name, internal, text(module.path), kind))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        Tied().init(KEY, X)
    calls = {call for call in seen if not call[2]}
    # The scanned body is the original class at the module's path, in a root scope of the
    # transform's; the head's Module.apply has a root of its own, at path ().
    assert calls == {
        ("Tied", "__call__", False, "", "model"),
        ("Scanned", "__call__", False, "body", "model"),
        ("Layer", "__call__", False, "body/layers", "lift"),
        ("Dense", "__call__", False, "body/layers/Dense_0", "lift"),
        ("Dense", "__call__", False, "", "apply"),
    }
    # The lifted class is seen only in flax's own checks (setup validation, <lambda>).
    assert {call[:3] for call in seen if call[2]} == {("ScanLayer", "<lambda>", True)}


def test_flax_behaviour_inject_relies_on_map_variables_exporting_the_module_state():
    """Why inject wraps an idle twin: wrapped mid-call, the module's second (lifted) call
    would look for Dense_1, since flax hands its auto-name count to the lifted clone."""
    found = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, Layer) or found.get("busy"):
            return next_fun(*args, **kwargs)
        found["busy"] = True
        for label, target in [("twin", _inject._idle_twin(module)), ("itself", module)]:
            target.__call__(*args)  # the wrapper's init pass
            lifted = nn.map_variables(type(target).__call__, "params", mutable=False)
            try:
                lifted(target, *args)
                found[label] = "ok"
            except flax.errors.ScopeParamNotFoundError as error:
                found[label] = re.search(r"/Dense_\d+", str(error)).group()
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        Layer().init(KEY, X, None)
    assert found == {"busy": True, "twin": "ok", "itself": "/Dense_1"}


def test_flax_behaviour_inject_works_around_share_scope_leaving_field_paths_behind():
    """Why Injected binds the model itself instead of nn.share_scope: in flax 0.12.8 the
    modules a shared model holds in fields keep their old path. If this fails, flax fixed
    it and _Held could go."""
    paths = []

    class Holder(nn.Module):
        inner: nn.Module

        def setup(self):
            nn.share_scope(self, self.inner)

        def __call__(self, x):
            paths.append(self.inner.layers[0].path)
            return self.inner(x)

    variables = Holder(nn.Sequential([nn.Dense(2)])).init(KEY, X)
    assert set(variables["params"]) == {"layers_0"}  # the variables moved up...
    assert paths[0] == ("inner", "layers_0")  # ...but the path did not


def test_injected_is_a_module_with_its_model():
    model = SetupMLP()
    injected = inject(model, WeightNorm, "dec")
    assert isinstance(injected, Injected) and injected.model is model
    with pytest.raises(AttributeError, match=r"Injected\(SetupMLP\) has no attribute 'decode'"):
        injected.decode  # noqa: B018


def test_a_summary_of_an_injected_model_shows_each_wrapper_with_its_layer_below_it():
    import wrapkit
    from wrapkit.linen import LoRA

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))

    injected = inject(Block(), functools.partial(LoRA, rank=2), "hidden")
    x = jax.ShapeDtypeStruct((4, 5), jnp.float32)
    summary = wrapkit.summary(injected, x, vjp=True)
    shown = [(row.path, row.module_type, row.depth, row.repeated) for row in summary.rows]
    assert shown == [
        ((), "Block", 0, False),
        (("LoRA",), "LoRA", 1, False),
        (("hidden",), "Dense", 2, False),
        (("out",), "Dense", 1, False),
    ]

    # The same FLOPs as the block with the LoRA written in its code.
    class ByHand(nn.Module):
        @nn.compact
        def __call__(self, x):
            hidden = LoRA(nn.Dense(6, name="hidden"), rank=2)(x)
            return nn.Dense(3, name="out")(nn.relu(hidden))

    reference = wrapkit.summary(ByHand(), x, vjp=True)
    assert (summary.flops, summary.vjp_flops) == (reference.flops, reference.vjp_flops)
    assert summary.rows[1].own_flops == reference.rows[1].own_flops > 0


def test_lora_on_every_attention_projection_of_transformers_gpt2_in_one_line():
    transformers = pytest.importorskip("transformers", reason="needs the compat extra")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 has no Flax models")
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    import wrapkit
    from wrapkit.linen import LoRA, fold

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16)
    gpt2 = FlaxGPT2LMHeadModel(config, seed=0)
    ids = jnp.arange(16).reshape(2, 8) % 128
    inputs = (ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(8), (2, 8)))

    lora = inject(gpt2.module, functools.partial(LoRA, rank=4), "attn/c_*")
    fresh = flat(lora.init(KEY, *inputs)["params"])
    original = flat(gpt2.params)
    added = {key: value for key, value in fresh.items() if key not in original}
    # FlaxConv1D's kernel is (out, in) and used as x @ kernel.T: A spans the input axis.
    assert {text(key): value.shape for key, value in added.items()} == {
        f"transformer/h/{layer}/attn/LoRA/{proj}/kernel/{factor}": shape
        for layer in (0, 1)
        for proj, out in (("c_attn", 96), ("c_proj", 32))
        for factor, shape in (("lora_a", (32, 4)), ("lora_b", (4, out)))
    }
    merged = randomise({**original, **added}, list(added))
    params = unflatten_dict(merged)
    got = jax.jit(lora.apply)({"params": params}, *inputs)
    # By hand: each kernel (out, in) plus (A @ B).T, through the plain model.
    by_hand = dict(original)
    for layer in (0, 1):
        for proj in ("c_attn", "c_proj"):
            base = ("transformer", "h", str(layer), "attn", proj, "kernel")
            lora_path = ("transformer", "h", str(layer), "attn", "LoRA")
            a = merged[(*lora_path, f"{proj}/kernel/lora_a")]
            b = merged[(*lora_path, f"{proj}/kernel/lora_b")]
            by_hand[base] = merged[base] + (a @ b).T
    want = gpt2.module.apply({"params": unflatten_dict(by_hand)}, *inputs)
    chex.assert_trees_all_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    # Folded, the plain module takes the weights; the summary counts it unmerged.
    folded = fold(lora, {"params": params}, *inputs)
    chex.assert_trees_all_close(
        gpt2.module.apply(folded, *inputs).logits, got.logits, rtol=1e-5, atol=1e-5
    )
    summary = wrapkit.summary(lora, *inputs, vjp=True)
    assert [row.module_type for row in summary.rows].count("LoRA") == 4


def test_gradients_through_an_injected_model_equal_the_hand_written_forward():
    model = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(2)])
    injected = inject(model, WeightNorm, "layers_0")
    x = jax.random.normal(jax.random.key(1), (4, 3))
    params = injected.init(KEY, x)["params"]

    def by_hand(params):
        first, second = params["layers_0"], params["layers_2"]
        scale = params["WeightNorm"]["layers_0/kernel/scale"]
        kernel = scale * first["kernel"] / jnp.linalg.norm(first["kernel"], axis=0)
        hidden = jax.nn.relu(x @ kernel + first["bias"])
        return jnp.sum(jnp.tanh(hidden @ second["kernel"] + second["bias"]))

    def injected_loss(params):
        return jnp.sum(jnp.tanh(injected.apply({"params": params}, x)))

    chex.assert_trees_all_close(
        jax.jit(jax.grad(injected_loss))(params), jax.grad(by_hand)(params), rtol=1e-5, atol=1e-6
    )
