"""Third-party model code: wrapkit.summary and WeightNorm on transformers' and flaxmodels' models.

Every model is built from a small config with random initialisation and summarised abstractly
(nothing is downloaded). The packages come with the ``compat`` extra (``pip install -e
".[compat]"``, part of ``dev``); without them this file is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import wrapkit
from wrapkit._summary import segments
from wrapkit.linen import WeightNorm

transformers = pytest.importorskip(
    "transformers", reason="the compatibility suite needs transformers: pip install -e '.[compat]'"
)
flaxmodels = pytest.importorskip(
    "flaxmodels", reason="the compatibility suite needs flaxmodels: pip install -e '.[compat]'"
)
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip(
        f"transformers {transformers.__version__} has no Flax models (removed in 5.0); "
        "the compat extra pins the last 4.x release",
        allow_module_level=True,
    )

# Imported once the packages are known to be there (hence E402).
from transformers import BertConfig, GPT2Config, ResNetConfig, ViTConfig  # noqa: E402
from transformers.models.bert.modeling_flax_bert import (  # noqa: E402
    FlaxBertEmbeddings,
    FlaxBertEncoder,
    FlaxBertModule,
    FlaxBertPooler,
)
from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule  # noqa: E402
from transformers.models.resnet.modeling_flax_resnet import FlaxResNetModule  # noqa: E402
from transformers.models.vit.modeling_flax_vit import FlaxViTModule  # noqa: E402

KEY = jax.random.key(0)
TOKENS = jax.ShapeDtypeStruct((2, 8), jnp.int32)
IMAGES = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)

# Modules that hold no variables, so their rows' paths are not nodes of the variable tree:
# flax's Dropout, and transformers' ResNet ``Identity`` (the activation of a block's last
# convolution, and the classifier of a headless model).
CALL_ONLY_TYPES = {"Dropout", "Identity"}

# XLA's HloCostAnalysis keeps its counts in 32-bit floats: its sum is exact while it stays
# below 2**24 and rounded above, each addition by at most 2**-25 of the sum (1e-5 allows
# some 300 such roundings). flaxmodels' ResNets and VGG have fixed ImageNet widths, so their
# counts are above 2**24 (ResNet-18 on 32x32: 43,598,730 FLOPs, XLA 43,598,728).
FLOAT32_EXACT = 2**24
ROUNDED_REL = 1e-5


def bert_config() -> BertConfig:
    return BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=16,
    )


class BertWithWeightNormPooler(FlaxBertModule):
    """transformers' BERT with its pooler (a transformers layer) wrapped in WeightNorm.

    ``setup`` is FlaxBertModule's, the pooler line wrapped; flax does not let a subclass
    reassign a submodule name after ``super().setup()``.
    """

    def setup(self):
        self.embeddings = FlaxBertEmbeddings(self.config, dtype=self.dtype)
        self.encoder = FlaxBertEncoder(
            self.config, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing
        )
        self.pooler = WeightNorm(FlaxBertPooler(self.config, dtype=self.dtype))


@dataclasses.dataclass(frozen=True)
class Case:
    """A model, its abstract inputs and keyword arguments, and its variable-free call paths."""

    make: Callable[[], nn.Module]
    args: tuple[jax.ShapeDtypeStruct, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    call_only_paths: Mapping[str, str] = dataclasses.field(default_factory=dict)


def flaxmodels_gpt2() -> nn.Module:
    # GPT2Model, not GPT2LMHeadModel: flaxmodels 0.1.3's GPT2LMHeadModel reads
    # self.param_dict, which its setup only sets for pretrained weights, so it cannot be
    # built with pretrained=None on any jax.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16)
    return flaxmodels.gpt2.GPT2Model(config=config, pretrained=None)


CASES = {
    "hf-gpt2": Case(
        lambda: FlaxGPT2LMHeadModule(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16)
        ),
        (TOKENS, TOKENS, TOKENS),  # input_ids, attention_mask, position_ids
        call_only_paths={
            # Tied embeddings: the head is self.lm_head.apply({"params": {"kernel": wte.T}}),
            # so lm_head is called but owns no variables.
            "lm_head": "the tied head, applied with wte's embedding",
        },
    ),
    "hf-bert": Case(lambda: FlaxBertModule(bert_config()), (TOKENS, TOKENS)),
    "hf-bert-remat": Case(  # gradient checkpointing: nn.remat around each layer
        lambda: FlaxBertModule(bert_config(), gradient_checkpointing=True), (TOKENS, TOKENS)
    ),
    "hf-bert-weightnorm": Case(lambda: BertWithWeightNormPooler(bert_config()), (TOKENS, TOKENS)),
    "hf-vit": Case(
        lambda: FlaxViTModule(
            ViTConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=16,
                patch_size=4,
            )
        ),
        (IMAGES,),
    ),
    "hf-resnet": Case(
        lambda: FlaxResNetModule(
            ResNetConfig(
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"
            )
        ),
        (IMAGES,),  # deterministic=True by default: BatchNorm uses its running averages
    ),
    "hf-resnet-bottleneck": Case(
        lambda: FlaxResNetModule(
            ResNetConfig(
                embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck"
            )
        ),
        (IMAGES,),
    ),
    # flaxmodels' ResNets and VGG have fixed ImageNet widths; abstract, they cost nothing.
    "fm-resnet18": Case(
        lambda: flaxmodels.ResNet18(pretrained=None, num_classes=10, output="logits"),
        (jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),),
        {"train": False},
    ),
    "fm-resnet50": Case(
        lambda: flaxmodels.ResNet50(pretrained=None, num_classes=10, output="logits"),
        (jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),),
        {"train": False},
    ),
    "fm-vgg16": Case(
        lambda: flaxmodels.VGG16(pretrained=None, include_head=False, output="logits"),
        (jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),),
        {"train": False},
    ),
    "fm-gpt2": Case(flaxmodels_gpt2, (), {"input_ids": TOKENS}),
}

# flaxmodels 0.1.3, the latest release, calls jnp.reshape(x, newshape=...): jax deprecated the
# keyword in 0.4.28 and removed it in 0.4.36. Skipped only while that exact failure occurs, so
# a fixed flaxmodels runs every check.
FLAXMODELS_GPT2_SKIP = (
    "flaxmodels 0.1.3's GPT-2 calls jnp.reshape(..., newshape=...), a keyword jax removed in "
    "0.4.36 (flaxmodels/gpt2/gpt2.py, GPT2Model.__call__)"
)


@dataclasses.dataclass(frozen=True)
class Summarised:
    module: nn.Module
    case: Case
    variables: Any
    table: wrapkit.Summary

    def forward(self, variables, *args):
        return self.module.apply(variables, *args, **self.case.kwargs)


@functools.cache
def build(name: str) -> Summarised:
    case = CASES[name]
    module = case.make()

    def init(key, *args):
        return module.init(key, *args, **case.kwargs)

    try:
        variables = jax.eval_shape(init, KEY, *case.args)
    except TypeError as error:
        if name == "fm-gpt2" and "newshape" in str(error):
            pytest.skip(FLAXMODELS_GPT2_SKIP)
        raise
    table = wrapkit.summary(module, *case.args, vjp=True, **case.kwargs)
    return Summarised(module, case, variables, table)


@pytest.fixture(scope="module", params=sorted(CASES), ids=str)
def summarised(request) -> Summarised:
    return build(request.param)


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


def tree_nodes(variables) -> set[tuple[str, ...]]:
    """Every module path of the variable tree: the prefixes of each variable's path."""
    nodes = {()}
    for tree in variables.values():
        for path in flatten_dict(tree):
            nodes.update(path[:end] for end in range(len(path)))
    return nodes


# --- the summary of each model --------------------------------------------------------------


def test_every_primitive_has_a_flop_rule(summarised):
    assert summarised.table.unsupported == ()
    assert not summarised.table.lower_bound


def test_own_flops_add_up_and_no_child_exceeds_its_parent(summarised):
    table = summarised.table
    assert sum(row.own_flops for row in table) == table.root.flops == table.flops > 0
    assert sum(row.own_vjp_flops for row in table) == table.root.vjp_flops == table.vjp_flops
    assert sum(row.own_transcendentals for row in table) == table.transcendentals
    for row in table:
        for child in (table.rows[index] for index in row.children):
            assert child.parent == row.index and child.depth == row.depth + 1
            assert child.flops <= row.flops, (child.name, row.name)
            assert child.vjp_flops <= row.vjp_flops, (child.name, row.name)
            assert child.transcendentals <= row.transcendentals, (child.name, row.name)


def test_rows_are_attributed_to_real_paths(summarised):
    table, case = summarised.table, summarised.case
    nodes = tree_nodes(summarised.variables)
    assert [row.index for row in table if row.path == ()] == [0], [
        (row.name, row.module_type, row.method) for row in table if row.path == ()
    ]
    strays = [
        (row.name, row.module_type)
        for row in table
        if row.path not in nodes
        and not (
            (row.module_type in CALL_ONLY_TYPES or row.name in case.call_only_paths)
            and row.path[:-1] in nodes
        )
    ]
    assert strays == []
    for name in case.call_only_paths:  # documented, so it must be there
        assert table.find(name), f"no row for the call-only module {name!r}"


def test_forward_flops_equal_xla_cost_analysis(summarised):
    table = summarised.table
    expected = xla_flops(summarised.forward, summarised.variables, *summarised.case.args)
    if expected < FLOAT32_EXACT:
        assert table.flops == expected
    else:
        assert table.flops == pytest.approx(expected, rel=ROUNDED_REL)


def test_vjp_flops_within_a_thousandth_of_xla_cost_analysis(summarised):
    """XLA counts forward and pullback, the cotangent an argument (a constant would fold)."""
    args = summarised.case.args
    differentiated = [jnp.issubdtype(arg.dtype, jnp.inexact) for arg in args]

    def vjp(variables, cotangent, *args):
        def forward(variables, *inexact):
            values = iter(inexact)
            full = [
                next(values) if keep else arg
                for arg, keep in zip(args, differentiated, strict=True)
            ]
            return summarised.forward(variables, *full)

        inexact = [arg for arg, keep in zip(args, differentiated, strict=True) if keep]
        out, pullback = jax.vjp(forward, variables, *inexact)
        return out, pullback(cotangent)

    cotangent = jax.eval_shape(summarised.forward, summarised.variables, *args)
    expected = xla_flops(vjp, summarised.variables, cotangent, *args)
    assert summarised.table.vjp_flops > summarised.table.flops
    assert summarised.table.vjp_flops == pytest.approx(expected, rel=1e-3)


def _costs(table: wrapkit.Summary) -> list[tuple[Any, ...]]:
    return [
        (row.path, row.method, row.own_flops, row.own_vjp_flops, row.own_transcendentals)
        for row in table
    ]


def test_sharing_the_program_of_repeated_calls_changes_no_row(summarised, monkeypatch):
    """The summary linearises each group of repeated calls once (``segments.py``); without
    that, every row costs the same."""
    monkeypatch.setattr(segments, "_MIN_EQUATIONS", 10**9)
    case = summarised.case
    flat = wrapkit.summary(summarised.module, *case.args, vjp=True, **case.kwargs)
    assert _costs(flat) == _costs(summarised.table)
    assert (flat.flops, flat.vjp_flops) == (summarised.table.flops, summarised.table.vjp_flops)


def test_variable_totals_equal_flax_init(summarised):
    table = summarised.table
    assert set(table.variables) == set(summarised.variables)
    for collection, tree in summarised.variables.items():
        count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
        assert table.variables[collection].count == count, collection
    assert table.variables["params"].count > 0


def test_gradient_checkpointing_recomputes_in_the_vjp_only():
    plain, remat = build("hf-bert").table, build("hf-bert-remat").table
    assert remat.flops == plain.flops
    assert remat.vjp_flops > plain.vjp_flops
    assert [row.name for row in remat] == [row.name for row in plain]


# --- WeightNorm around a transformers layer -------------------------------------------------


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


def test_weight_norm_pooler_matches_normalising_the_kernel_by_hand(variant):
    config = bert_config()
    wrapped, plain = BertWithWeightNormPooler(config), FlaxBertModule(config)
    ids = jax.random.randint(jax.random.key(1), TOKENS.shape, 0, config.vocab_size)
    mask = jnp.ones(TOKENS.shape, jnp.int32).at[1, 5:].set(0)
    params = wrapped.init(KEY, ids, mask)["params"]
    pooler = params["pooler"]
    kernel = pooler["layer_instance"]["dense"]["kernel"]  # (in, out): features on the last axis
    # A scale that is not ones, so the test sees g as well as v / ||v||.
    scale = jax.random.uniform(jax.random.key(2), kernel.shape[-1:], minval=0.5, maxval=2.0)
    params = {**params, "pooler": {**pooler, "layer_instance/dense/kernel/scale": scale}}

    def by_hand(params, ids, mask):
        v = params["pooler"]["layer_instance"]["dense"]["kernel"]
        g = params["pooler"]["layer_instance/dense/kernel/scale"]
        w = v * g / jnp.linalg.norm(v, axis=0, keepdims=True)
        dense = {**params["pooler"]["layer_instance"]["dense"], "kernel": w}
        plain_params = {**params, "pooler": {"dense": dense}}
        return plain.apply({"params": plain_params}, ids, mask)

    got = variant(lambda p, i, m: wrapped.apply({"params": p}, i, m))(params, ids, mask)
    want = variant(by_hand)(params, ids, mask)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    # The pooled output depends on the normalisation: the raw kernel gives something else.
    raw = {**params, "pooler": {"dense": params["pooler"]["layer_instance"]["dense"]}}
    unnormalised = plain.apply({"params": raw}, ids, mask)
    assert not np.allclose(unnormalised.pooler_output, got.pooler_output, atol=1e-3)
    np.testing.assert_allclose(unnormalised.last_hidden_state, got.last_hidden_state, rtol=1e-5)


def test_weight_norm_pooler_row_holds_the_normalisation():
    table = build("hf-bert-weightnorm").table
    (wrapper,) = table.find("pooler")
    assert wrapper.wrapper and wrapper.module_type == "WeightNorm"
    assert [table.rows[index].name for index in wrapper.children] == ["pooler/layer_instance"]
    (dense,) = table.find("pooler/layer_instance/dense")
    hidden = bert_config().hidden_size
    assert dense.own_flops == 2 * 2 * hidden * hidden + 2 * hidden  # batch 2, first token
    kernel = jax.ShapeDtypeStruct((hidden, hidden), jnp.float32)
    scale = jax.ShapeDtypeStruct((hidden,), jnp.float32)

    def normalise(kernel, scale):
        return kernel * jax.lax.rsqrt(jnp.sum(kernel * kernel, axis=0) + 1e-12) * scale

    assert wrapper.own_flops == wrapkit.flops.count(normalise, kernel, scale).flops
    plain = build("hf-bert").table
    assert table.flops == plain.flops + wrapper.own_flops


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "gradient-checkpointing"])
def test_weight_norm_around_a_whole_transformers_encoder_normalises_every_kernel(remat):
    """One wrapper around transformers' BERT encoder reaches all twelve kernels of its two
    layers (held in a list, built in ``setup``, under ``nn.remat`` with checkpointing)."""
    config = bert_config()

    class Top(nn.Module):
        wrapped: bool

        @nn.compact
        def __call__(self, hidden, mask):
            encoder = FlaxBertEncoder(config, gradient_checkpointing=remat)
            module = WeightNorm(encoder) if self.wrapped else encoder
            return module(hidden, mask, None, deterministic=True).last_hidden_state

    hidden = jax.random.normal(jax.random.key(1), (2, 8, config.hidden_size))
    mask = jnp.ones((2, 8)).at[1, 5:].set(0)
    params = dict(Top(True).init(KEY, hidden, mask)["params"])
    scales = params.pop("WeightNorm_0")
    kernels = {"/".join(path[:-1]) for path in flatten_dict(params) if path[-1] == "kernel"}
    assert {name.removesuffix("/kernel/scale") for name in scales} == kernels
    assert len(kernels) == 6 * config.num_hidden_layers
    keys = jax.random.split(jax.random.key(2), len(scales))
    scales = {
        name: jax.random.uniform(k, scale.shape, minval=0.5, maxval=2.0)
        for k, (name, scale) in zip(keys, sorted(scales.items()), strict=True)
    }

    normalised = flatten_dict(params)
    for name, scale in scales.items():
        path = tuple(name.removesuffix("/scale").split("/"))
        v = normalised[path]
        normalised[path] = v * scale / jnp.linalg.norm(v, axis=0, keepdims=True)
    want = Top(False).apply({"params": unflatten_dict(normalised)}, hidden, mask)
    got = Top(True).apply({"params": {**params, "WeightNorm_0": scales}}, hidden, mask)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def _lora_injected(module: nn.Module, patterns: list[str]) -> nn.Module:
    from wrapkit.linen import LoRA, inject

    adapter = functools.partial(LoRA, rank=2, b_init=nn.initializers.normal(1.0))
    return inject(module, adapter, patterns)


@pytest.mark.parametrize("model", ["bert", "vit"])
def test_lora_injected_into_transformers_models_runs_unmerged_and_folds(model):
    """BERT: attention Dense layers and the word-embedding lookup; ViT: the patch
    convolution and the queries. Fold gives the plain module the merged weights."""
    from transformers import FlaxBertModel, FlaxViTModel

    if model == "bert":
        config = BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
        )
        plain = FlaxBertModel(config, seed=0).module
        ids = jnp.arange(16).reshape(2, 8) % 100
        args = (
            ids,
            jnp.ones_like(ids),
            jnp.zeros_like(ids),
            jnp.broadcast_to(jnp.arange(8), (2, 8)),
        )
        patterns = ["query", "value", "word_embeddings"]
    else:
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=8,
        )
        plain = FlaxViTModel(config, seed=0).module
        args = (jax.random.normal(jax.random.key(1), (2, 16, 16, 3)),)
        patterns = ["projection", "query"]
    injected = _lora_injected(plain, patterns)
    variables = injected.init(jax.random.key(0), *args)
    out = injected.apply(variables, *args).last_hidden_state
    folded = wrapkit.linen.fold(injected, variables, *args)
    chex.assert_trees_all_close(
        plain.apply(folded, *args).last_hidden_state, out, rtol=1e-5, atol=1e-5
    )
    summary = wrapkit.summary(injected, *args)
    assert summary.unsupported == ()
    assert summary.flops == xla_flops(injected.apply, variables, *args)
