"""The example models: shapes, parameter counts against the config, and variants that agree."""

import dataclasses
import doctest
import importlib.util
import math
import pathlib
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The examples are a folder of scripts, not an installed package.
sys.path.insert(0, str(ROOT))

from examples import gpt2, llama  # noqa: E402

TINY = {"vocab_size": 512, "n_positions": 128, "d_model": 64, "n_head": 4, "n_layer": 2}


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 16)), "int32")


def random_variables(model, tokens, seed=0):
    """Variables shaped by an abstract init and filled from numpy.

    Compiling ``init`` (its random number generation) costs seconds on CPU; this costs none.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), leaf.dtype), shapes
    )


@pytest.fixture(scope="module")
def plain(tokens):
    model = gpt2.gpt2_tiny()
    variables = random_variables(model, tokens)
    return model, variables, jax.jit(model.apply)(variables, tokens)


def test_gpt2_parameter_count_matches_the_config(plain):
    _, variables, _ = plain
    d, v, p, layers = TINY["d_model"], TINY["vocab_size"], TINY["n_positions"], TINY["n_layer"]
    # qkv and output projections, two MLP matrices, their biases, two LayerNorms.
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    expected = v * d + p * d + layers * block + 2 * d
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables)) == expected


def test_gpt2_output_projection_is_the_tied_token_embedding(variant, plain, tokens):
    model, variables, _ = plain
    assert set(variables["params"]) == {"wte", "wpe", "h_0", "h_1", "ln_f"}

    def logits_and_hidden(variables, tokens):
        logits, state = model.apply(
            variables, tokens, capture_intermediates=lambda module, _: module.name == "ln_f"
        )
        return logits, state["intermediates"]["ln_f"]["__call__"][0]

    logits, hidden = variant(logits_and_hidden)(variables, tokens)
    assert logits.shape == (2, 16, TINY["vocab_size"]) and logits.dtype == jnp.float32
    embedding = variables["params"]["wte"]["embedding"]
    chex.assert_trees_all_close(logits, hidden @ embedding.T, rtol=1e-5, atol=1e-5)


def weight_normalised(params):
    """The plain model's parameters, rearranged for weight_norm=True with the same weights.

    Each block Dense moves under its wrapper's ``layer_instance``, with a scale equal to the
    norm of each kernel column, so that scale * v / ||v|| is the original kernel.
    """
    blocks = {}
    for name, block in params.items():
        if not name.startswith("h_"):
            continue
        blocks[name] = dict(block)
        for branch, denses in (("attn", ("c_attn", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            blocks[name][branch] = {
                dense: {
                    "layer_instance": block[branch][dense],
                    "layer_instance/kernel/scale": jnp.linalg.norm(
                        block[branch][dense]["kernel"], axis=0
                    ),
                }
                for dense in denses
            }
    return {**params, **blocks}


def test_gpt2_weight_norm_wraps_the_block_denses_and_agrees(variant, plain, tokens):
    _, variables, logits = plain
    model = gpt2.gpt2(**TINY, weight_norm=True)
    own = jax.eval_shape(model.init, jax.random.key(0), tokens)
    rearranged = {"params": weight_normalised(variables["params"])}
    chex.assert_trees_all_equal_shapes(own, rearranged)
    assert set(own["params"]["h_0"]["attn"]["c_attn"]) == {
        "layer_instance",
        "layer_instance/kernel/scale",
    }
    chex.assert_trees_all_close(
        variant(model.apply)(rearranged, tokens), logits, rtol=1e-4, atol=1e-4
    )


# jit only: nn.scan compiles its body even when called eagerly, so "eager" would be jit again.
def test_gpt2_scan_layers_agrees_with_the_loop(plain, tokens):
    _, variables, logits = plain
    model = gpt2.gpt2(**TINY, scan_layers=True)
    params = dict(variables["params"])
    layers = [params.pop(f"h_{i}") for i in range(TINY["n_layer"])]
    params["h"] = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *layers)
    own = jax.eval_shape(model.init, jax.random.key(0), tokens)
    chex.assert_trees_all_equal_shapes(own, {"params": params})
    chex.assert_trees_all_close(
        jax.jit(model.apply)({"params": params}, tokens), logits, rtol=1e-5, atol=1e-5
    )


def test_gpt2_dropout_is_applied_only_when_asked(plain, tokens):
    _, variables, logits = plain
    model = gpt2.gpt2(**TINY, dropout=0.5)
    chex.assert_trees_all_close(model.apply(variables, tokens), logits, rtol=1e-5, atol=1e-5)
    # An "rbg" key: threefry's random bits would cost seconds of compilation on CPU.
    key = jax.random.key(2, impl="rbg")
    train = model.apply(variables, tokens, False, rngs={"dropout": key})
    assert not jnp.allclose(train, logits, atol=1e-2)


def test_gpt2_small_parameter_count_abstractly():
    tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    assert gpt2.parameter_count(gpt2.gpt2_small(), tokens) == 124_439_808


def test_llama_tiny_logits_and_parameter_count():
    model = llama.llama_tiny()
    tokens = jnp.zeros((2, 16), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == llama.parameter_formula(model.config)
    k_proj = shapes["params"]["layers_0"]["attn"]["k_proj"]["kernel"]
    assert k_proj.shape == (64, model.config.kv_heads * model.config.head_dim) == (64, 32)
    logits = jax.jit(model.apply)(random_variables(model, tokens), tokens)
    assert logits.shape == (2, 16, model.config.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_llama_bfloat16_parameters_and_logits():
    config = dataclasses.replace(llama.llama_tiny().config, param_dtype=jnp.bfloat16)
    model = llama.Llama(config)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("bfloat16")}
    assert jax.eval_shape(model.apply, shapes, tokens).dtype == jnp.bfloat16


def test_llama_7b_parameter_count_without_allocating():
    model = llama.llama_7b()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2048), "int32"))
    leaves = jax.tree_util.tree_leaves(shapes)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    count = sum(leaf.size for leaf in leaves)
    assert count == llama.parameter_formula(model.config) == 6_738_415_616


def test_rotary_scores_depend_only_on_the_offset():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))

    @jax.jit
    def score(m, n):
        rotated_q = llama.rotary(q, jnp.array([m]), 10000.0)
        rotated_k = llama.rotary(k, jnp.array([n]), 10000.0)
        return jnp.sum(rotated_q * rotated_k), jnp.linalg.norm(rotated_q)

    (near, norm), (far, _) = score(3, 1), score(7, 5)
    assert jnp.allclose(near, far, atol=1e-5)
    assert jnp.allclose(norm, jnp.linalg.norm(q), atol=1e-5)
    assert not jnp.allclose(near, score(3, 2)[0], atol=1e-3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: gpt2.GPT2Config(d_model=10, n_head=3), r"d_model=10 is not divisible by n_head=3"),
        (
            lambda: llama.LlamaConfig(d_model=12, n_head=4),
            r"head width d_model / n_head = 3 is odd",
        ),
        (
            lambda: llama.LlamaConfig(d_model=10, n_head=3, n_kv_head=2),
            r"d_model=10 is not divisible by n_head=3; n_head=3 is not divisible by n_kv_head=2",
        ),
    ],
    ids=["gpt2-heads", "llama-odd-head", "llama-collected"],
)
def test_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (gpt2.gpt2_tiny, r"GPT2: got 129 tokens, but n_positions=128"),
        (llama.llama_tiny, r"Llama: got 129 tokens, but max_seq_len=128"),
    ],
    ids=["gpt2", "llama"],
)
def test_too_many_tokens(factory, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(factory().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 129), "int32"))


@pytest.mark.parametrize("module", [gpt2, llama], ids=["gpt2", "llama"])
def test_docstring_examples(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0


def _load_script(name: str, folder: str, file: str) -> types.ModuleType:
    """A script of examples/ or benchmarks/ (folders of scripts, not packages) as a module.

    It is registered in ``sys.modules`` first: the flax modules it defines are dataclasses,
    which look their module up there.
    """
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_summary_benchmark_quick_smoke():
    benchmark = _load_script("summary_benchmark", "benchmarks", "summary.py")
    figures = benchmark.main(["--quick", "--repeats", "1"])
    for name in ("flax / wrapkit", "wrapkit / make_jaxpr", "depth", "llama peak MB"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name


def test_lora_benchmark_figures_hold():
    """The unmerged form costs what a hand-written one does, and 1.9x less than merged."""
    benchmark = _load_script("lora_benchmark", "benchmarks", "lora.py")
    dense = benchmark.dense_figure()
    ours, hand = dense["wrapkit LoRA (unmerged)"], dense["hand-written unmerged"]
    merged = dense["hand-written materialised"]
    assert ours == hand
    assert merged[0] / ours[0] > 1.9 and merged[1] / ours[1] > 1.9
    tiny = benchmark.gpt2_figure(quick=True)
    assert tiny["wrapkit LoRA"] == tiny["hand-written unmerged"]


def test_a_4_bit_fake_quant_mlp_tracks_the_float_one():
    example = _load_script("fake_quant_mlp", "examples", "fake_quant_mlp.py")
    losses = example.run(steps=200, bits=4)
    plain, quantised = losses["float32"], losses["4-bit"]
    assert quantised[0] == pytest.approx(plain[0], rel=0.05)  # the same start, nearly
    assert quantised[-1] < 0.05 * quantised[0]
    for step in range(0, 200, 25):
        assert quantised[step] <= plain[step] + 0.05, step


def test_a_weight_norm_cnn_initialised_from_data_trains():
    example = _load_script("weight_norm_cnn", "examples", "weight_norm_cnn.py")
    result = example.run(steps=60)
    for mean, std in result.after:
        assert abs(mean) < 1e-3 and abs(std - 1) < 1e-2
    assert any(abs(std - 1) > 0.3 for _, std in result.before)  # it changed something
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_lora_fine_tuning_injected_by_pattern_trains_only_the_adapters():
    example = _load_script("lora_finetune", "examples", "lora_finetune.py")
    result = example.run(steps=60)
    assert result.losses[-1] < 0.9 * result.losses[0]
    assert result.base_unchanged
    assert 0 < result.trainable < 0.05 * result.total
    assert result.fold_error < 1e-4


def test_wrapped_train_steps_compile_to_the_flops_of_hand_written_ones():
    benchmark = _load_script("train_step_benchmark", "benchmarks", "train_step.py")
    for kind, result in benchmark.main(["--quick", "--rounds", "1"]).items():
        assert result["wrapkit flops"] == result["hand flops"] > 0, kind
