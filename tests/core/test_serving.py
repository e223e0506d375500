"""The serving rules both plugins apply (`cognica.serving`) and the LoRA table they derive their names from
(`cognica.weights.LORA_MODULES`)."""

import pytest

from cognica.config import CognicaConfig
from cognica.names import expected_tensors
from cognica.serving import (
    SMEAR_WHY,
    ServingSettings,
    check_before_build,
    has_sliding_layers,
    refusals,
    refuse,
    served_window_left,
    tensor_parallel_problem,
)
from cognica.weights import LORA_MODULES, LORA_REACH, engine_module, lora_module_pattern

SMALL = dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=64, vocab_size=512, sequence_len=256)


def visible_keys(p: int, window_left: int | None) -> set[int]:
    """The positions a query at `p` attends to: itself and `window_left` keys before it (None: all before it)."""
    return set(range(0 if window_left is None else max(0, p - window_left), p + 1))


@pytest.mark.parametrize("context_len", [1, 2, 64, 128, 129, 130, 131, 200, 256])
def test_served_window_attends_as_the_reference_and_is_none_only_where_no_key_is_dropped(context_len):
    cfg = CognicaConfig(**SMALL)  # short_window 128: S S S L
    for layer in range(cfg.n_layer):
        served = served_window_left(cfg, layer, context_len)
        for p in range(context_len):
            assert visible_keys(p, served) == visible_keys(p, cfg.window_left[layer]), (layer, p, served)
        drops = any(len(visible_keys(p, cfg.window_left[layer])) < p + 1 for p in range(context_len))
        assert (served is not None) == drops, f"layer {layer} at context {context_len}: None must mean full attention"
        # vLLM's rule before this module (per_layer_sliding_window = keys where keys < context_len)
        assert (served is not None) == (cfg.window_keys[layer] < context_len)
        if served is not None:
            assert served + 1 == cfg.window_keys[layer], "vLLM counts the query among the window's keys"
    assert has_sliding_layers(cfg, context_len) == (context_len > cfg.short_window + 1)


@pytest.mark.parametrize("n_kv_head", [1, 2, 3, 4, 6, 12])
def test_tensor_parallel_accepts_exactly_the_sizes_qkv_parallel_linear_shards(n_kv_head):
    cfg = CognicaConfig(n_layer=4, n_head=12, n_kv_head=n_kv_head, n_embd=96, vocab_size=512, sequence_len=256)
    for tp in range(1, 25):
        # both engines' QKVParallelLinear: divide(n_head, tp) and divide(n_kv_head, tp) or divide(tp, n_kv_head)
        shardable = cfg.n_head % tp == 0 and (n_kv_head % tp == 0 if tp <= n_kv_head else tp % n_kv_head == 0)
        if not shardable:
            with pytest.raises(ValueError, match=f"tensor parallel size {tp} must divide the 12 query heads"):
                refuse(cfg, ServingSettings(tensor_parallel=tp))
            continue
        assert tensor_parallel_problem(cfg, tp) is None, f"tp={tp} is shardable"
        refuse(cfg, ServingSettings(tensor_parallel=tp))
        ranks = [cfg.local_kv_heads(tp, r) for r in range(tp)]
        assert {h for r in ranks for h in r} == set(range(n_kv_head)), f"tp={tp}: every KV head on some rank"
        assert all(len(r) == max(1, n_kv_head // tp) for r in ranks), f"tp={tp}: {ranks}"


def test_refusals_one_message_per_rule():
    cfg = CognicaConfig(**SMALL)
    logop = CognicaConfig(**SMALL, poe_mode="flat", poe_every=2, poe_head="logop")
    assert refusals(cfg, ServingSettings()) == [] and refusals(logop, ServingSettings()) == []
    assert refusals(cfg, ServingSettings(pooling="--is-embedding", tensor_parallel=2, pipeline_parallel=2,
                                         head_on_vocab_shard=True, context_len=256)) == [], "only Log-OP pairs"
    cases = [
        (cfg, ServingSettings(foreign_kv=("--a (x)", "--b (y)")), f"{SMEAR_WHY}: --a (x); --b (y)"),
        (logop, ServingSettings(pooling="--runner pooling"), "--runner pooling pools the final hidden state"),
        (logop, ServingSettings(pipeline_parallel=2), "use pipeline_parallel_size=1"),
        (logop, ServingSettings(tensor_parallel=2, head_on_vocab_shard=True), "not supported with tensor parallelism"),
        (cfg, ServingSettings(tensor_parallel=3), "tensor parallel size 3 must divide the 4 query heads"),
        (cfg, ServingSettings(context_len=257, context_flag="--context-length"),
         "--context-length 257 is longer than the 256-token context"),
    ]
    for c, settings, phrase in cases:
        found = refusals(c, settings)
        assert len(found) == 1 and phrase in found[0] and found[0].startswith("cognica: "), (settings, found)
    both = ServingSettings(foreign_kv=("--a (x)",), pooling="--is-embedding")
    assert len(refusals(logop, both)) == 2
    with pytest.raises(ValueError, match="smear reads the previous token.*; cognica: --is-embedding pools"):
        refuse(logop, both)


def test_check_before_build_refuses_a_longer_context_and_passes_the_training_context(tmp_path):
    cfg = CognicaConfig(**SMALL)
    check_before_build(cfg, None, ServingSettings(context_len=256))
    with pytest.raises(ValueError, match="--max-model-len 300 is longer than the 256-token context"):
        check_before_build(cfg, None, ServingSettings(context_len=300))


def test_lora_table_is_a_set_of_published_modules_and_its_prose():
    cfg = CognicaConfig(**SMALL)
    names = expected_tensors(cfg)
    for module in LORA_MODULES:
        assert f"{module.format(i=0)}.weight" in names, f"{module}: not a module of the architecture"
    assert LORA_REACH == ("LoRA reaches attn.c_q/c_k/c_v/c_proj, mlp.c_fc/c_proj, transformer.wte and lm_head "
                          "(value embeddings, ve_gate, smear_gate and the scalars are not adaptable)")
    import re

    adaptable = re.compile(rf"^({lora_module_pattern(engine_module)})$")
    reached = {n.removesuffix(".weight") for n in names if adaptable.match(engine_module(n.removesuffix(".weight")))}
    assert reached == {m.format(i=i) for m in LORA_MODULES for i in range(cfg.n_layer)} | {"transformer.wte",
                                                                                          "lm_head"}
