"""PoE twin on the reference: stage prefixes, the Log-OP head, the BP refusal and what a prefix loads.

The checkpoint has 8 layers in stages of 2 (stage ends 1, 3, 5, 7; backout stored after layer 4), the release's
shape in miniature (stage ends 5, 11, 17, 23; backout after 12): the first two exits have no backout, the last two
subtract it. The expected values are computed here from the full model's block outputs, not from `cognica.layers`'
exit helpers, so a wrong tail in the shared code fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cognica.config import LOGIT_SOFTCAP, CognicaConfig, ConfigError
from cognica.factory import make_checkpoint
from cognica.model import CognicaGPT, load_reference

POE_EVERY = 2
N_LAYER = 8
SEQ = 320  # past the tiny preset's 256-key S window


@pytest.fixture(scope="module")
def poe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("poe") / "poe", preset="tiny", seed=3, progress=False,
                           n_layer=N_LAYER, poe_mode="flat", poe_every=POE_EVERY)


@pytest.fixture(scope="module")
def bp_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bp") / "bp", preset="tiny", seed=3, progress=False,
                           tokenizer=False, n_layer=N_LAYER, poe_every=POE_EVERY)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 32759, (1, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def full(poe_ckpt: Path) -> CognicaGPT:
    return load_reference(poe_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def full_run(full: CognicaGPT, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residual stream right after every block of the full model, and its logits."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outs.append(out)) for b in full.transformer.h]
    with torch.inference_mode():
        logits = full(ids)
    for h in hooks:
        h.remove()
    assert len(outs) == N_LAYER
    return outs, logits


@pytest.fixture(scope="module")
def block_outputs(full_run: tuple[list[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    return full_run[0]


@torch.inference_mode()
def stage_logits_by_hand(full: CognicaGPT, outs: list[torch.Tensor], e: int, backout: bool) -> torch.Tensor:
    """model.md's tail, written out: (x - backout_lambda * x_after_block_n_layer//2), rms norm, lm_head, 15 tanh."""
    x = outs[e]
    if backout:
        x = x - full.backout_lambda * outs[N_LAYER // 2]
    x = F.rms_norm(x, (x.size(-1),), eps=torch.finfo(torch.float32).eps)
    logits = F.linear(x, full.lm_head.weight)[..., :32768].float()
    return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)


def test_stage_structure_of_the_release() -> None:
    cfg = CognicaConfig(poe_mode="flat")
    assert cfg.n_stages == 4 and cfg.stage_ends == (5, 11, 17, 23), f"release stages wrong: {cfg.stage_ends}"
    assert [cfg.exit_backout(e) for e in cfg.stage_ends] == [False, False, True, True], \
        "exits after layers 5 and 11 come before the backout block (12); 17 and 23 follow the final tail"
    assert [CognicaConfig(poe_mode="flat", poe_exit_stage=k).n_active_layers for k in (1, 2, 3, 4)] == [6, 12, 18, 24]


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_prefix_equals_first_layers_with_the_documented_tail(
    poe_ckpt: Path, full: CognicaGPT, block_outputs: list[torch.Tensor], ids: torch.Tensor, stage: int
) -> None:
    e = stage * POE_EVERY - 1
    prefix = load_reference(poe_ckpt, dtype=torch.float32, poe_exit_stage=stage)
    assert len(prefix.transformer.h) == stage * POE_EVERY, "a stage prefix must build only its layers"
    with torch.inference_mode():
        got = prefix(ids)
    want = stage_logits_by_hand(full, block_outputs, e, backout=e >= N_LAYER // 2)
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"stage {stage} (exit after layer {e}) differs from the full model's layers by {err:.2e}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), f"stage {stage}: greedy tokens differ"
    if e >= N_LAYER // 2:  # the backout choice is visible: without it the logits move
        other = stage_logits_by_hand(full, block_outputs, e, backout=False)
        assert (other - want).abs().max().item() > 0.05, "backout has no effect here: the test would not see it"


def test_last_stage_is_the_full_model(poe_ckpt: Path, full_run: tuple[list[torch.Tensor], torch.Tensor],
                                      ids: torch.Tensor) -> None:
    last = load_reference(poe_ckpt, dtype=torch.float32, poe_exit_stage=N_LAYER // POE_EVERY)
    with torch.inference_mode():
        assert torch.equal(last(ids), full_run[1]), "poe_exit_stage = n_stages must be exactly the full model"


def test_stage_prefix_kv_cache_generation_matches_full_sequence(poe_ckpt: Path, ids: torch.Tensor) -> None:
    prefix = load_reference(poe_ckpt, dtype=torch.float32, poe_exit_stage=1)
    prompt = ids[0, :300].tolist()
    gen = prefix.generate([prompt], 8)[0]
    with torch.inference_mode():
        teacher = prefix(torch.tensor([prompt + gen]))[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert gen == teacher, "stage-prefix KV-cache generation must equal the full-sequence argmax"


@pytest.mark.parametrize("exit_stage", [None, 2])
def test_logop_is_the_mean_of_the_stage_log_softmaxes(
    poe_ckpt: Path, full: CognicaGPT, block_outputs: list[torch.Tensor], ids: torch.Tensor, exit_stage: int | None
) -> None:
    model = load_reference(poe_ckpt, dtype=torch.float32, poe_head="logop", poe_exit_stage=exit_stage)
    with torch.inference_mode():
        got = model(ids)
    n = exit_stage or N_LAYER // POE_EVERY
    ends = [(s + 1) * POE_EVERY - 1 for s in range(n)]
    want = torch.stack([torch.log_softmax(stage_logits_by_hand(full, block_outputs, e, e >= N_LAYER // 2), -1)
                        for e in ends]).mean(0)
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"Log-OP over stages {ends} differs from the mean of their log-softmaxes by {err:.2e}"
    assert (got.exp().sum(-1) <= 1 + 1e-4).all(), "Log-OP returns a mean of log-probs, never soft-capped again"


def test_bp_checkpoint_refuses_a_stage_exit(bp_ckpt: Path) -> None:
    for kw in ({"poe_exit_stage": 1}, {"poe_head": "logop"}):
        with pytest.raises(ConfigError, match=r"poe_mode='none' \(BP\) checkpoint are not trained as predictors"
                                              r".*poe_force=true"):
            load_reference(bp_ckpt, **kw)
    forced = load_reference(bp_ckpt, poe_exit_stage=1, poe_force=True)
    assert len(forced.transformer.h) == POE_EVERY, "poe_force must allow the stage exit"
    assert len(load_reference(bp_ckpt, poe_exit_stage=4).transformer.h) == N_LAYER, \
        "the last stage is the full model and needs no force"


def test_bp_refusal_reaches_the_engines_through_the_hf_config(bp_ckpt: Path) -> None:
    from cognica.hf import CognicaPoEConfig, cognica_config

    hf_cfg = CognicaPoEConfig.from_pretrained(bp_ckpt)
    hf_cfg.update({"poe_exit_stage": 1})  # what SGLang's --json-model-override-args / vLLM's --hf-overrides do
    with pytest.raises(ConfigError, match="poe_force"):
        cognica_config(hf_cfg)
    hf_cfg.update({"poe_force": True})
    assert cognica_config(hf_cfg).n_active_layers == POE_EVERY, "overrides must reach the core config"


@pytest.mark.parametrize("fields, message", [
    ({"poe_exit_stage": 5}, "poe_exit_stage: 5 is out of range; this model has stages 1..4"),
    ({"poe_exit_stage": 0}, "poe_exit_stage: 0 is out of range"),
    ({"poe_head": "mean"}, "poe_head: 'mean' is not one of"),
    ({"poe_every": 3, "poe_exit_stage": 1}, "poe_every: 3 does not divide the 8 layers"),
    ({"poe_exit_stage": "1"}, "poe_exit_stage: must be an integer"),
    ({"poe_force": "yes"}, "poe_force: must be true or false"),
])
def test_bad_stage_options_get_one_clear_message(fields: dict, message: str) -> None:
    raw = CognicaConfig(n_layer=N_LAYER, poe_mode="flat", poe_every=POE_EVERY).to_dict() | fields
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        CognicaConfig.from_dict(raw)


def test_stage_options_round_trip_through_config_json(poe_ckpt: Path) -> None:
    raw = json.loads((poe_ckpt / "config.json").read_text())
    assert raw["poe_every"] == POE_EVERY, "the factory must write a non-default poe_every"
    cfg = CognicaConfig(n_layer=N_LAYER, poe_mode="flat", poe_every=2, poe_exit_stage=3, poe_head="logop")
    assert CognicaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert CognicaConfig.from_dict(raw).extra == {}, "the PoE fields must never be reported as unknown"


def test_stage_prefix_reads_only_its_tensors(poe_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    read: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    model = load_reference(poe_ckpt, dtype=torch.float32, poe_exit_stage=1)
    big = [n for n in read if n.startswith(("transformer.h.", "value_embeds."))]
    assert big and all(int(n.split(".")[2 if n.startswith("transformer") else 1]) < POE_EVERY for n in big), \
        f"a stage-1 prefix read tensors of later layers: {sorted(set(big))}"
    assert set(model.value_embeds.keys()) == {"1"}, "value-embedding tables exist only for built layers"
    assert not any(k.startswith(f"transformer.h.{POE_EVERY}.") for k in model.state_dict()), "no weights past stage 1"


@pytest.mark.parametrize("argv, keywords", [(["--poe-exit-stage", "1"], {"poe_exit_stage": 1}),
                                            (["--poe-head", "logop"], {"poe_head": "logop"})])
def test_cli_bpb_scores_the_chosen_stage_mode(poe_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              argv: list[str], keywords: dict) -> None:
    from cognica import cli
    from cognica.bpb import bits_per_byte, encode_text

    text = "The stage experts of a product of experts each predict the next token. " * 6
    (tmp_path / "t.txt").write_text(text)
    assert cli.main(["bpb", str(poe_ckpt), "--text", str(tmp_path / "t.txt"), *argv]) == 0
    got = float(capsys.readouterr().out.split()[1])
    ids = encode_text(poe_ckpt, text)
    token_bytes = torch.load(poe_ckpt / "token_bytes.pt", weights_only=True)

    def bpb(**kw) -> float:
        return bits_per_byte(ids[1:], load_reference(poe_ckpt, **kw).token_logprobs(ids), token_bytes)

    want = bpb(**keywords)
    assert abs(got - want) < 1e-6, f"cognica bpb {argv}: {got:.6f}, the {keywords} reference gives {want:.6f}"
    assert abs(got - bpb()) > 1e-5, f"{argv} gave the full model's bpb: the option was not applied"


def test_cli_bpb_refuses_a_stage_exit_on_bp(bp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cognica import cli

    (tmp_path / "t.txt").write_text("hello")
    assert cli.main(["bpb", str(bp_ckpt), "--text", str(tmp_path / "t.txt"), "--poe-exit-stage", "2"]) == 1
    err = capsys.readouterr().err
    assert "not trained as predictors; set poe_force=true" in err, f"the refusal should say why: {err}"


def test_vllm_bpb_passes_the_stage_options_as_hf_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cognica bpb --engine vllm --poe-head logop` builds vLLM's LLM with the option as `hf_overrides`."""
    import cognica_vllm.bpb

    built: dict = {}

    class LLM:
        def __init__(self, **kwargs):
            built.update(kwargs)

        def generate(self, prompts, sp):
            from types import SimpleNamespace

            return [SimpleNamespace(prompt_logprobs=[None, {2: SimpleNamespace(logprob=-1.5)}])]

    monkeypatch.setattr(cognica_vllm.bpb, "LLM", LLM)
    monkeypatch.setattr(cognica_vllm.bpb.CognicaConfig, "from_file", lambda path: CognicaConfig())
    got = cognica_vllm.bpb.prompt_logprobs("/ckpt", [[1, 2]], overrides={"poe_head": "logop"})
    assert got == [[-1.5]], f"unexpected scoring through the fake LLM: {got}"
    assert built.get("hf_overrides") == {"poe_head": "logop"}, f"options not passed to vLLM: {built}"
