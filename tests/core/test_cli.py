"""The `cognica` command line: inspect, convert-tokenizer, make-checkpoint and bpb on tiny factory checkpoints."""

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from cognica import cli
from cognica.bpb import bits_per_byte, evaluate_bpb, split_windows
from cognica.model import load_reference
from cognica.tokenizer import BOS, load_tiktoken_pickle

TEXT = "The quick brown fox jumps over the lazy dog.\ndef f(x):\n    return x ** 2  # naïve 日本\n"
OVERRIDES = '{"architectures": ["CognicaPoEForCausalLM"], "model_type": "cognica_poe"}'


def linked_copy(src: Path, dst: Path) -> Path:
    """Hardlink copy of a checkpoint; tests replace files in it (unlink first), never edit them in place."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        os.link(p, dst / p.name)
    return dst


def set_config(ckpt: Path, **fields) -> None:
    cfg = json.loads((ckpt / "config.json").read_text()) | fields
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_text(json.dumps(cfg))


def run_inspect(ckpt: Path, capsys) -> tuple[int, str]:
    rc = cli.main(["inspect", str(ckpt)])
    return rc, capsys.readouterr().out


def test_inspect_good_checkpoint_as_a_process(tiny_ckpt: Path):
    proc = subprocess.run([sys.executable, "-m", "cognica", "inspect", str(tiny_ckpt)], capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"a good factory checkpoint must pass inspect:\n{out}"
    assert "architectures=['CognicaPoEForCausalLM']" in out, f"inspect must name the architecture:\n{out}"
    assert "windows: S S S L (S = 256 keys before the query, L = 1024)" in out, f"windows per layer missing:\n{out}"
    for fact in ("layers: 4", "width: 128", "value embedding layers: 1, 3", "backout layer: 2", "tensors: 35",
                 "dtype: BF16", "params: 17,563,730"):
        assert fact in out, f"inspect must report {fact!r}:\n{out}"
    assert "--hf-overrides" not in out and "convert-tokenizer" not in out, f"nothing is needed here:\n{out}"


def test_inspect_json_is_machine_readable(tiny_ckpt: Path, capsys):
    assert cli.main(["inspect", str(tiny_ckpt), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["problems"] == [], f"a clean JSON report expected: {report}"
    assert report["facts"]["layers"] == 4, f"facts carry the config: {report['facts']}"


def test_inspect_names_a_renamed_tensor(published_ckpt: Path, tmp_path: Path, capsys):
    ckpt = linked_copy(published_ckpt, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["transformer.h.2.attn.c_q.wieght"] = tensors.pop("transformer.h.2.attn.c_q.weight")
    (ckpt / "model.safetensors").unlink()
    save_file(tensors, ckpt / "model.safetensors")
    rc, out = run_inspect(ckpt, capsys)
    assert rc == 1, f"a renamed tensor is an error:\n{out}"
    assert "missing 1 tensor(s): transformer.h.2.attn.c_q.weight" in out, f"the expected name must be given:\n{out}"
    assert "transformer.h.2.attn.c_q.wieght" in out, f"the stored (unknown) name must be given:\n{out}"


def test_inspect_says_truncated(published_ckpt: Path, tmp_path: Path, capsys):
    ckpt = linked_copy(published_ckpt, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc, out = run_inspect(ckpt, capsys)
    assert rc == 1 and "truncated" in out, f"a half file must be reported as truncated:\n{out}"


@pytest.mark.parametrize("fields", [{"architectures": ["CognicaPoEModelForCausalLMv2"]},
                                    {"model_type": "cognica_poe_v2"}, {"architectures": None}])
def test_inspect_suggests_engine_overrides_for_unknown_architecture(tiny_ckpt, tmp_path, capsys, fields):
    ckpt = linked_copy(tiny_ckpt, tmp_path / "ckpt")
    set_config(ckpt, **fields)
    rc, out = run_inspect(ckpt, capsys)
    assert rc == 0, f"an unregistered architecture string is not an error, only a need:\n{out}"
    assert f"--hf-overrides '{OVERRIDES}'" in out, f"the exact vLLM flag must be printed:\n{out}"
    assert f"--json-model-override-args '{OVERRIDES}'" in out, f"the exact SGLang flag must be printed:\n{out}"


def test_inspect_suggests_convert_tokenizer_when_tokenizer_json_is_missing(published_ckpt: Path, capsys):
    rc, out = run_inspect(published_ckpt, capsys)
    assert rc == 0, f"the published layout (tokenizer.pkl only) is valid:\n{out}"
    assert f"run `cognica convert-tokenizer {published_ckpt}` once" in out, f"the conversion must be suggested:\n{out}"


def test_inspect_lists_unknown_config_fields_without_failing(tiny_ckpt, tmp_path, capsys):
    ckpt = linked_copy(tiny_ckpt, tmp_path / "ckpt")
    set_config(ckpt, poe_stage_weights=[0.25, 0.25, 0.5], mtp_heads=0)
    rc, out = run_inspect(ckpt, capsys)
    assert rc == 0, f"unknown config fields are not fatal:\n{out}"
    assert "unknown to cognica (kept, not used): mtp_heads, poe_stage_weights" in out, f"fields not listed:\n{out}"


def test_inspect_of_a_missing_directory_exits_1(tmp_path: Path, capsys):
    rc = cli.main(["inspect", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 1 and "no such directory" in err and str(tmp_path / "nope") in err, \
        f"a missing directory must be reported on stderr, naming it:\n{err}"


def test_convert_tokenizer_round_trip(published_ckpt: Path, tmp_path: Path, capsys):
    out_dir = tmp_path / "converted"
    assert cli.main(["convert-tokenizer", str(published_ckpt), "--out", str(out_dir)]) == 0
    assert not (published_ckpt / "tokenizer.json").exists(), "--out must leave the source directory alone"
    enc = load_tiktoken_pickle(published_ckpt / "tokenizer.pkl")
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = tok.encode(TEXT).ids
    assert ids == [enc.encode_single_token(BOS)] + enc.encode_ordinary(TEXT), "converted ids must be tiktoken's + BOS"
    assert tok.decode(ids) == TEXT, "decoding the converted ids must give the text back"


def test_convert_tokenizer_refuses_a_hostile_pickle(tmp_path: Path, capsys):
    (tmp_path / "tokenizer.pkl").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    assert cli.main(["convert-tokenizer", str(tmp_path)]) == 1, "a hostile pickle must fail the conversion"
    assert "refusing to unpickle global 'os.system'" in capsys.readouterr().err
    assert not (tmp_path / "tokenizer.json").exists(), "nothing may be written for a refused pickle"


def test_make_checkpoint_writes_the_published_layout(tmp_path: Path, capsys):
    out = tmp_path / "made"
    assert cli.main(["make-checkpoint", str(out), "--preset", "tiny", "--seed", "0"]) == 0
    files = {p.name for p in out.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.pkl",
                "tokenizer_config.json", "special_tokens_map.json", "token_bytes.pt"}
    assert files == expected, f"published layout differs: extra {files - expected}, missing {expected - files}"
    assert "auto_map" in json.loads((out / "tokenizer_config.json").read_text()), "the remote-code auto_map is kept"
    capsys.readouterr()
    rc, report = run_inspect(out, capsys)
    assert rc == 0, f"a freshly made checkpoint must pass inspect:\n{report}"


def test_bits_per_byte_by_hand():
    token_bytes = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    ids = [1, 2, 0, 3]  # token 0 is a special: 0 bytes, left out of both sums
    logprobs = [math.log(1 / 2), math.log(1 / 4), math.log(1 / 1024), math.log(1 / 2)]
    assert bits_per_byte(ids, logprobs, token_bytes) == pytest.approx((1 + 2 + 1) / (1 + 2 + 3)), "4 bits / 6 bytes"


def test_bits_per_byte_of_only_specials_is_inf():
    assert bits_per_byte([0, 0], [-1.0, -2.0], torch.tensor([0, 5])) == float("inf"), "nanochat returns inf"


@pytest.mark.parametrize("n, max_len", [(2, 2), (10, 4), (11, 4), (1025, 1024), (3000, 1024)])
def test_windows_predict_every_token_once(n, max_len):
    ids = list(range(n))
    windows = split_windows(ids, max_len)
    assert all(2 <= len(w) <= max_len for w in windows), f"window lengths {[len(w) for w in windows]}"
    assert [t for w in windows for t in w[1:]] == ids[1:], "every token after the first is predicted exactly once"


def reference_bpb(ckpt: Path, text: str) -> tuple[float, int]:
    """bpb computed from scratch: tiktoken ids, one full forward, nanochat's sums."""
    enc = load_tiktoken_pickle(ckpt / "tokenizer.pkl")
    ids = torch.tensor([[enc.encode_single_token(BOS)] + enc.encode_ordinary(text)])
    with torch.no_grad():
        lp = torch.log_softmax(load_reference(ckpt)(ids)[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
    nbytes = torch.load(ckpt / "token_bytes.pt", weights_only=True).long()[ids[0, 1:]]
    return float(-(lp * (nbytes > 0)).sum() / (math.log(2) * nbytes.sum())), int(nbytes.sum())


def test_bpb_reference_matches_the_computation_by_hand(tiny_ckpt: Path, tmp_path: Path, capsys):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    assert cli.main(["bpb", str(tiny_ckpt), "--engine", "reference", "--text", str(tmp_path / "text.txt")]) == 0
    out = capsys.readouterr().out
    match = re.search(r"bpb (\d+\.\d+) \((\d+) tokens, (\d+) bytes", out)
    assert match, f"unexpected bpb output: {out}"
    expected, nbytes = reference_bpb(tiny_ckpt, TEXT)
    assert 0 < float(match[1]) < 100 and math.isfinite(float(match[1])), f"bpb must be finite and positive: {out}"
    assert float(match[1]) == pytest.approx(expected, abs=2e-6), f"CLI bpb {match[1]} vs by hand {expected}"
    assert int(match[3]) == nbytes == len(TEXT.encode("utf-8")), "the counted bytes are the text's UTF-8 bytes"


def test_bpb_through_an_engine_back_end(tiny_ckpt: Path, monkeypatch):
    calls = []

    def prompt_logprobs(model_dir, windows, dtype):
        calls.append((model_dir, len(windows), dtype))
        from cognica.bpb import reference_logprobs

        return [[None] + lp for lp in reference_logprobs(model_dir, windows, dtype, progress=False)]

    monkeypatch.setitem(sys.modules, "cognica_vllm.bpb", types.SimpleNamespace(prompt_logprobs=prompt_logprobs))
    via_engine = evaluate_bpb(tiny_ckpt, TEXT, engine="vllm", max_tokens=20)
    assert calls == [(str(tiny_ckpt), 1, "float32")], f"the engine back end must get the windows once: {calls}"
    assert via_engine == evaluate_bpb(tiny_ckpt, TEXT, engine="reference", max_tokens=20), "same logprobs, same bpb"
    assert via_engine.tokens == 20, f"--max-tokens 20 scores 20 tokens, got {via_engine.tokens}"


def test_bpb_without_the_engine_venv_exits_2(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    monkeypatch.setitem(sys.modules, "cognica_sglang.bpb", None)  # makes the import fail
    rc = cli.main(["bpb", str(tiny_ckpt), "--engine", "sglang", "--text", str(tmp_path / "text.txt")])
    err = capsys.readouterr().err
    assert rc == 2, f"a missing engine back end must exit 2, got {rc}: {err}"
    assert "needs the sglang venv (.venv/sglang)" in err, f"the error must say which venv is needed: {err}"


def test_engine_bpb_back_ends_come_from_the_plugins_entry_points():
    """`cognica bpb --engine vllm` finds the plugin's back end through the `cognica.bpb_backends` entry point."""
    import cognica_vllm.bpb
    from cognica.bpb import engine_logprob_fn

    assert engine_logprob_fn("vllm") is cognica_vllm.bpb.prompt_logprobs, "not the vLLM plugin's back end"


def test_the_core_names_no_plugin_module():
    """Dependency direction: `cognica` imports no plugin, neither by statement nor by a module-path string."""
    import ast

    core = Path(__file__).resolve().parents[2] / "cognica"
    found = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
                names = [node.value]
            plugins = [n for n in names if n.startswith(("cognica_vllm", "cognica_sglang"))]
            found += [f"{path.name}:{node.lineno}: {n}" for n in plugins]
    assert not found, f"the core names plugin modules: {found}"


def test_sglang_cpu_path_prints_the_stand_in_folder(capsys):
    assert cli.main(["sglang-cpu-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "sgl_kernel" / "__init__.py").is_file(), folder
