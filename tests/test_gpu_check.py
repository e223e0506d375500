"""scripts/gpu_check.sh: its --dry-run (the same steps on CPU at tiny shapes, Triton interpreted) passes and writes
the documented JSON, so a session that is lent a GPU spends its minutes measuring, not fixing typos; its report
and its pytest-less test runner fail loudly.

The dry run is run once for the module (about a minute on an idle 2-core machine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu_check  # the scripts/test.sh step(s) that run this file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
KERNEL_FIELDS = {"name", "ms", "torch_ms", "bytes", "flops", "gbps", "pct_copy", "tflops", "pct_floor",
                 "max_abs_err", "poisoned_runs", "reps", "ok", "error", "times_ms"}  # fmt: skip
DECODE_ROW_FIELDS = {"windows", "batch", "ctx", "graph", "ms", "tok_s", "eager_ms", "eager_tok_s", "pct_roofline",
                     "pct_copy_roofline", "roofline_card", "kv_gb", "note"}  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return {**env, "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    # vLLM and SGLang are not on the GPU machines: importing either fails the dry run (the script keeps PYTHONPATH)
    blocked = tmp_path_factory.mktemp("no_engines")
    for engine in ("vllm", "sglang"):
        (blocked / engine).mkdir()
        (blocked / engine / "__init__.py").write_text(f"raise ImportError('the GPU check imported {engine}')\n")
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          env={**_env(), "PYTHONPATH": str(blocked)}, timeout=900)  # fmt: skip
    summary = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    return proc, summary


def test_dry_run_passes_and_prints_the_table_last(dry_run):
    proc, summary = dry_run
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"gpu_check.sh --dry-run exited {proc.returncode}:\n{tail}"
    assert summary.get("ok") is True, f"gpu_check.json says not ok: {summary.get('steps')}"
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("=== gpu_check.sh:") and "=== GPU check: PASSED" in lines[-2], lines[-4:]
    assert "whole-model decode step" in proc.stdout and "relu2_linear M=" in proc.stdout, "the table is missing"


def test_dry_run_json_has_every_documented_part(dry_run):
    _, s = dry_run
    assert set(s) >= {"env", "kernel_tests", "kernel_tests_builtin", "kernels", "compare", "decode", "steps", "ok",
                      "verdicts"}, sorted(s)  # fmt: skip
    assert {"name", "torch", "triton", "date", "commit", "dry_run", "pytest"} <= set(s["env"]), s["env"]
    assert set(s["steps"]) == {"env", "kernel-tests", "kernel-tests-builtin", "kernels", "compare", "decode"}, \
        s["steps"]  # fmt: skip
    assert all(step["rc"] == 0 for step in s["steps"].values()), s["steps"]
    for key, runner in (("kernel_tests", "pytest"), ("kernel_tests_builtin", "builtin")):
        t = s[key]
        assert t["runner"].startswith(runner) and t["passed"] > 0 and t["failed"] == 0, t


def test_dry_run_kernel_cases_cover_attention_and_relu2_and_check_the_reference(dry_run):
    _, s = dry_run
    kernels = s["kernels"]["kernels"]
    assert {"copy_gbps", "gemm_tflops"} <= set(s["kernels"]["rates"])
    names = [k["name"] for k in kernels]
    for part in ("attn decode S", "attn decode L", "attn prefill S", "attn prefill L", "relu2_linear"):
        assert any(n.startswith(part) for n in names), f"no {part!r} case in {names}"
    for k in kernels:
        assert set(k) == KERNEL_FIELDS, f"{k['name']}: fields {sorted(set(k) ^ KERNEL_FIELDS)}"
        assert k["ok"] and k["ms"] > 0 and k["bytes"] > 0 and k["flops"] > 0, k
        assert k["poisoned_runs"] == k["reps"] > 0, f"{k['name']}: outputs not poisoned"
        assert 0 <= k["max_abs_err"] < 0.05, f"{k['name']}: {k['max_abs_err']}"
        assert (k["torch_ms"] is not None) == k["name"].startswith("relu2_linear"), k


def test_dry_run_compares_ours_beside_peers_on_identical_inputs_and_decides(dry_run):
    proc, s = dry_run
    rows = s["compare"]["compare"]
    cases = {(r["op"], r["kind"], r["case"].split()[2] if r["op"] == "attention" else "") for r in rows}
    assert cases >= {("attention", k, w) for k in ("decode", "prefill") for w in ("S", "L")} | {("relu2", "relu2", "")}
    for r in rows:
        assert r["error"] is None and r["ours_ok"] and r["ours_us"] > 0, r
        counted = {n: p for n, p in r["peers"].items() if p.get("us") is not None}
        assert counted and all(p["ok"] for p in counted.values()), f"{r['case']}: a peer disagrees: {r['peers']}"
    # the verdicts come from these rows (CPU times mean nothing, but the logic ran on real rows)
    gc = _gpu_check()
    assert s["verdicts"] == gc.verdicts(s["env"], rows), s["verdicts"]
    assert "side by side" in proc.stdout and "verdicts (" in proc.stdout


def test_dry_run_decode_has_parity_and_both_window_modes(dry_run):
    _, s = dry_run
    d = s["decode"]
    assert d["parity_fp32"]["ok"] and d["parity_bf16"]["ok"], (d["parity_fp32"], d["parity_bf16"])
    assert all(len(t) == d["parity_fp32"]["new_tokens"] for t in d["parity_fp32"]["tokens"])
    rows = d["rows"]
    assert {(r["windows"], r["batch"]) for r in rows} == {(w, b) for w in ("SSSL", "all-full") for b in (1, 2)}
    for r in rows:
        assert set(r) == DECODE_ROW_FIELDS, sorted(set(r) ^ DECODE_ROW_FIELDS)
        assert r["eager_ms"] > 0 and r["pct_copy_roofline"] > 0 and r["note"] is None, r
    by = {(r["windows"], r["batch"]): r for r in rows}
    assert by[("SSSL", 2)]["kv_gb"] < by[("all-full", 2)]["kv_gb"], "the S layers' rings must hold less KV"


def test_report_fails_when_a_step_failed(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    (tmp_path / "steps.tsv").write_text("env\t0\t1\nkernel-tests\t1\t30\n")
    assert gpu_check.report(tmp_path) == 1
    assert "=== GPU check: FAILED" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is False


def test_poison_catches_an_output_the_launcher_did_not_fully_write():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check
    import torch

    launcher = types.ModuleType("fake_launcher")
    launcher.torch = torch

    def launch(x: torch.Tensor, rows: int) -> list[torch.Tensor]:
        out = launcher.torch.empty_like(x)  # what the Triton launchers do
        out[:rows] = x[:rows]
        return [out]

    x = torch.ones(4, 3)
    poison = gpu_check.Poison(launcher, (4, 3), torch.float32, torch.device("cpu"))
    poison.prepare()
    poison.check(poison.run(lambda: launch(x, 4)))
    assert poison.landed == 1 and launcher.torch is torch, "a fully written output must pass and count as poisoned"
    poison.prepare()
    with pytest.raises(AssertionError, match="never written"):
        poison.check(poison.run(lambda: launch(x, 3)))


def test_script_refuses_to_run_without_an_output_folder():
    env = {k: v for k, v in _env().items() if k != "OUT"}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "results folder" in proc.stderr, proc.stderr


def test_builtin_runner_reports_failures_and_unsupported_pytest_features(tmp_path):
    # what the GPU machine runs when pytest is absent: a failing case fails, it is never skipped into green
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('x', [1, 2, 3])\n"
        "def test_small(x):\n"
        "    assert x < 3, 'three is not small'\n"
        "def test_uses_skip():\n"
        "    pytest.skip('unsupported here')\n"
    )
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_kernel_tests.py"), "--runner", "builtin", "--out", str(out),
           "--file", str(tmp_path / "test_fake.py")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    result = json.loads(out.read_text())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert result["passed"] == 2 and sorted(result["failures"]) == ["test_small[3]", "test_uses_skip"], result


def test_gpu_steps_fit_the_nine_minute_budget():
    # the CUDA branch's per-step limits (env, kernel-tests, kernels, decode, compare) must add up to at most 9 minutes
    cuda_limits = re.findall(r"LIMITS=\(([\d ]+)\)", SCRIPT.read_text())[-1]
    assert len(cuda_limits.split()) == 5 and sum(int(x) for x in cuda_limits.split()) <= 540, cuda_limits


def test_every_json_field_is_documented():
    doc = (REPO / "docs" / "performance.md").read_text()
    section = doc[doc.index("## The GPU check"):]
    missing = [f for f in sorted(KERNEL_FIELDS | DECODE_ROW_FIELDS) if f"`{f}`" not in section]
    assert not missing, f"docs/performance.md's GPU check section does not document {missing}"


def _row(kind: str, size: int, ours: float | None, peers: dict, ours_ok: bool = True) -> dict:
    return {"kind": kind, "size": size, "case": f"{kind} {size}", "ours_us": ours, "ours_ok": ours_ok,
            "peers": {n: {"us": us, "ok": ok} for n, (us, ok) in peers.items()}}  # fmt: skip


def _gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check


def test_verdict_triton_only_within_the_limits_of_the_best_peer():
    v = _gpu_check().verdict
    rows = [_row("decode", 1, 500.0, {"cudnn": (10.0, True)}),  # batch 1 does not count
            _row("decode", 32, 10.4, {"cudnn": (10.0, True), "flash": (12.0, True)}),
            _row("prefill", 8, 140.0, {"flash": (100.0, True)})]  # fmt: skip
    assert v("attention", rows)["verdict"] == "triton"
    rows[1] = _row("decode", 32, 10.6, {"cudnn": (10.0, True)})
    assert v("attention", rows) == {"verdict": "engine", "reason": "decode 32: ours 1.06x cudnn (limit 1.05x)"}
    rows[1] = _row("decode", 32, 10.0, {"cudnn": (10.0, True)})
    rows[2] = _row("prefill", 8, 160.0, {"flash": (100.0, True)})
    assert v("attention", rows)["verdict"] == "engine", "prefill over 1.5x"


def test_verdict_ignores_failed_peers_and_refuses_failed_ours():
    v = _gpu_check().verdict
    # the fast peer failed its cross-check: it does not count
    assert v("relu2", [_row("relu2", 256, 10.0, {"eager": (20.0, True), "compiled": (1.0, False)})])["verdict"] == \
        "triton"  # fmt: skip
    assert v("relu2", [_row("relu2", 256, 10.0, {"compiled": (1.0, False), "eager": (None, True)})])["verdict"] == \
        "engine"  # fmt: skip
    failed_ours = [_row("relu2", 1, 1.0, {"eager": (9.0, True)}),
                   _row("relu2", 32, 1.0, {"eager": (9.0, True)}, ours_ok=False)]  # fmt: skip
    assert v("relu2", failed_ours)["verdict"] == "engine"
    assert v("attention", []) == {"verdict": "engine", "reason": "no side-by-side row measured"}
    assert v("relu2", [_row("decode", 32, 1.0, {"x": (9.0, True)})])["verdict"] == "engine", "other op's rows"


def test_verdicts_shape():
    got = _gpu_check().verdicts({"name": "NVIDIA H200", "capability": "9.0"}, [])
    assert set(got) == {"gpu", "capability", "attention", "relu2"} and got["gpu"] == "NVIDIA H200"
    assert set(got["attention"]) == {"verdict", "reason"}
