"""scripts/gpu_check.sh (the kit in benchmarks/gpu/): its --dry-run (the same steps on CPU at tiny shapes, Triton
interpreted) passes and writes the documented JSON, its kernel tests run by the pytest carried in .venv/gpu-pytest,
so a GPU run spends its minutes measuring, not fixing typos; its report fails loudly.

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

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
KIT = REPO / "benchmarks" / "gpu"
GPU_PYTEST = REPO / ".venv" / "gpu-pytest"  # scripts/setup.sh
KERNEL_FIELDS = {"name", "ms", "bytes", "flops", "gbps", "pct_copy", "tflops", "pct_floor",
                 "max_abs_err", "poisoned_runs", "reps", "ok", "error", "times_ms"}  # fmt: skip
DECODE_ROW_FIELDS = {"windows", "ops", "batch", "ctx", "graph", "ms", "tok_s", "eager_ms", "eager_tok_s",
                     "pct_roofline", "pct_copy_roofline", "roofline_card", "kv_gb", "logits_vs_opt_in",
                     "note"}  # fmt: skip
COMPARE_ROW_FIELDS = {"op", "kind", "phase", "size", "case", "ours_us", "ours_times", "ours_ok", "peers", "bytes_read",
                      "copies", "method", "error"}  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return {**env, "PYTHON": sys.executable}


def carried_modules() -> list[str]:
    """The top-level modules of .venv/gpu-pytest: pytest and every package it needs."""
    assert (GPU_PYTEST / "pytest").is_dir(), "no .venv/gpu-pytest: run bash scripts/setup.sh"
    return sorted(p.name.removesuffix(".py") for p in GPU_PYTEST.iterdir()
                  if not p.name.endswith(".dist-info") and p.name not in ("bin", "__pycache__"))  # fmt: skip


def block(folder: Path, names: list[str], why: str) -> Path:
    """`folder` with a package per name whose import raises ImportError: put on PYTHONPATH, it hides the
    installed module of that name (PYTHONPATH comes before site-packages)."""
    for name in names:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError({f'{why}: {name}'!r})\n")
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    # vLLM and SGLang are not on the GPU machines: importing either fails the dry run (the script keeps PYTHONPATH).
    # Nor is pytest: this venv's pytest and each package .venv/gpu-pytest holds (pluggy, iniconfig, pygments, ...)
    # are hidden the same way, so the script finds no pytest in the python, puts .venv/gpu-pytest ahead, and the
    # kernel tests pass only if the carried folder alone provides pytest and everything it imports.
    blocked = block(tmp_path_factory.mktemp("no_engines"), ["vllm", "sglang"], "the GPU check imported")
    block(blocked, carried_modules(), "the GPU machine has no")
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
    assert "whole-model decode step" in proc.stdout and "attn decode S" in proc.stdout, "the table is missing"


def test_dry_run_json_has_every_documented_part(dry_run):
    _, s = dry_run
    assert set(s) >= {"env", "kernel_tests", "warm", "kernels", "compare", "decode", "steps", "ok", "verdicts"}, \
        sorted(s)  # fmt: skip
    assert {"name", "torch", "triton", "date", "commit", "dry_run", "pytest"} <= set(s["env"]), s["env"]
    assert set(s["steps"]) == {"env", "kernel-tests", "warm", "kernels", "compare", "decode"}, s["steps"]
    assert all(step["rc"] == 0 for step in s["steps"].values()), s["steps"]
    # the kernel tests ran under the carried pytest (the python's own and its dependencies hidden)
    assert s["env"]["pytest"]["from"] == ".venv/gpu-pytest", s["env"]["pytest"]
    assert Path(s["env"]["pytest"]["path"]).resolve().is_relative_to(GPU_PYTEST.resolve()), s["env"]["pytest"]
    t = s["kernel_tests"]
    assert t["runner"].startswith("pytest 9.2.0 from .venv/gpu-pytest") and t["passed"] > 0 and t["failed"] == 0, t


def test_dry_run_kernel_cases_cover_attention_and_check_the_reference(dry_run):
    _, s = dry_run
    kernels = s["kernels"]["kernels"]
    assert {"copy_gbps", "gemm_tflops"} <= set(s["kernels"]["rates"])
    names = [k["name"] for k in kernels]
    for part in ("attn decode S", "attn decode L", "attn prefill S", "attn prefill L"):
        assert any(n.startswith(part) for n in names), f"no {part!r} case in {names}"
    for k in kernels:
        assert set(k) == KERNEL_FIELDS, f"{k['name']}: fields {sorted(set(k) ^ KERNEL_FIELDS)}"
        assert k["ok"] and k["ms"] > 0 and k["bytes"] > 0 and k["flops"] > 0, k
        assert k["poisoned_runs"] == k["reps"] > 0, f"{k['name']}: outputs not poisoned"
        assert 0 <= k["max_abs_err"] < 0.05, f"{k['name']}: {k['max_abs_err']}"


def test_dry_run_compares_ours_beside_peers_on_identical_inputs_and_decides(dry_run):
    proc, s = dry_run
    assert s["compare"]["complete"] is True and s["compare"]["warm_only"] is False
    rows = s["compare"]["compare"]
    cases = {(r["op"], r["kind"], r["phase"], r["case"].split()[2] if r["op"] == "attention" else "",
              "sglang-page1" in r["case"]) for r in rows}  # fmt: skip
    expected = {("attention", "decode", "decode", w, False) for w in "SL"}
    expected |= {("attention", "prefill", "prefill", w, sglang) for w in "SL" for sglang in (False, True)}
    expected |= {("attention", "mixed", "prefill", w, False) for w in "SL"}
    expected |= {("relu2", "relu2", phase, "", False) for phase in ("decode", "prefill")}
    assert cases == expected, sorted(cases ^ expected)
    for r in rows:
        assert set(r) >= COMPARE_ROW_FIELDS, sorted(COMPARE_ROW_FIELDS - set(r))
        assert r["error"] is None and r["ours_ok"] and r["ours_us"] > 0, r
        assert len(r["ours_times"]) >= 5 and r["copies"] >= 1 and r["bytes_read"] > 0, r
        counted = {n: p for n, p in r["peers"].items() if p.get("us") is not None}
        assert counted and all(p["ok"] and len(p["times"]) >= 5 for p in counted.values()), \
            f"{r['case']}: a peer disagrees or was timed too few times: {r['peers']}"  # fmt: skip
    # the verdicts come from these rows (CPU times mean nothing, but the logic ran on real rows)
    gc = _gpu_check()
    assert s["verdicts"] == gc.verdicts(s["env"], rows), s["verdicts"]
    assert "side by side" in proc.stdout and "verdicts (" in proc.stdout
    # the warm step built the same rows and timed nothing
    warm = s["warm"]
    assert warm["warm_only"] is True and warm["complete"] is True and warm["kernel_launches"] > 0
    assert [r["case"] for r in warm["compare"]] == [r["case"] for r in rows]
    assert all(r["ours_us"] is None and r["ours_times"] == [] and r["ours_ok"] for r in warm["compare"])


def test_dry_run_decode_has_parity_and_both_window_modes(dry_run):
    _, s = dry_run
    d = s["decode"]
    assert d["parity_fp32"]["ok"] and d["parity_bf16"]["ok"], (d["parity_fp32"], d["parity_bf16"])
    assert all(len(t) == d["parity_fp32"]["new_tokens"] for t in d["parity_fp32"]["tokens"])
    rows = d["rows"]
    expected = {("SSSL", ops, b) for ops in ("default", "opt-in") for b in (1, 2)} | {("all-full", "opt-in", b)
                                                                                      for b in (1, 2)}  # fmt: skip
    assert {(r["windows"], r["ops"], r["batch"]) for r in rows} == expected
    for r in rows:
        assert set(r) == DECODE_ROW_FIELDS, sorted(set(r) ^ DECODE_ROW_FIELDS)
        assert r["eager_ms"] > 0 and r["pct_copy_roofline"] > 0 and r["note"] is None, r
        # the default path (torch SDPA over gathered pages, torch relu^2) computes the same step as ours (bf16)
        assert (r["logits_vs_opt_in"] is None) == (r["ops"] == "opt-in"), r
        assert r["ops"] == "opt-in" or r["logits_vs_opt_in"] < 0.25, r
    by = {(r["windows"], r["ops"], r["batch"]): r for r in rows}
    assert by[("SSSL", "opt-in", 2)]["kv_gb"] < by[("all-full", "opt-in", 2)]["kv_gb"], \
        "the S layers' rings must hold less KV"  # fmt: skip


def test_report_fails_when_a_step_failed(tmp_path, capsys):
    sys.path.insert(0, str(KIT))
    import gpu_check

    (tmp_path / "steps.tsv").write_text("env\t0\t1\nkernel-tests\t1\t30\n")
    assert gpu_check.report(tmp_path) == 1
    assert "=== GPU check: FAILED" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is False


def test_poison_catches_an_output_the_launcher_did_not_fully_write():
    sys.path.insert(0, str(KIT))
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


def test_carried_pytest_reports_failures_and_skips_and_the_report_counts_them(tmp_path):
    # what the kernel-tests step runs on the GPU machine: the carried pytest, the python's own hidden; a failing
    # case fails the step and is named in the report, a skip is counted apart, never as a pass
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('x', [1, 2, 3])\n"
        "def test_small(x):\n"
        "    assert x < 3, 'three is not small'\n"
        "def test_skipped():\n"
        "    pytest.skip('not here')\n"
    )
    (tmp_path / "hidden").mkdir()
    hidden = block(tmp_path / "hidden", carried_modules(), "the GPU machine has no")
    env = {**_env(), "PYTHONPATH": f"{GPU_PYTEST}:{hidden}"}
    xml = tmp_path / "kernel_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fake.py",
                           f"--junitxml={xml}"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = _gpu_check().kernel_tests(xml, {"version": "9.2.0", "from": ".venv/gpu-pytest"})
    assert got["runner"] == "pytest 9.2.0 from .venv/gpu-pytest", got
    assert (got["passed"], got["failed"], got["skipped"]) == (2, 1, 1), got
    assert got["failures"] == ["test_fake::test_small[3]"], got
    assert _gpu_check().kernel_tests(tmp_path / "absent.xml", None) is None


def test_gpu_steps_fit_six_minutes_so_a_rerun_fits_the_device_budget():
    # the CUDA branch's per-step limits (env, kernel-tests, kernels, decode, compare, warm) add up to at most 6 min
    cuda_limits = re.findall(r"LIMITS=\(([\d ]+)\)", (KIT / "run.sh").read_text())[-1]
    assert len(cuda_limits.split()) == 6 and sum(int(x) for x in cuda_limits.split()) <= 360, cuda_limits


def test_every_json_field_is_documented():
    doc = (REPO / "docs" / "performance.md").read_text()
    section = doc[doc.index("## The GPU check"):]
    missing = [f for f in sorted(KERNEL_FIELDS | DECODE_ROW_FIELDS | COMPARE_ROW_FIELDS) if f"`{f}`" not in section]
    assert not missing, f"docs/performance.md's GPU check section does not document {missing}"


def _row(phase: str, ours: list[float] | None, peers: dict, ours_ok: bool = True, op: str = "attention") -> dict:
    """A side-by-side row: `ours` and each peer's replay times (µs per launch), peers {name: (times, ok)}."""
    return {"op": op, "kind": phase, "phase": phase, "size": 32, "case": f"{op} {phase}", "error": None,
            "ours_us": None if ours is None else sorted(ours)[len(ours) // 2], "ours_times": ours or [],
            "ours_ok": ours_ok, "peers": {n: {"us": sorted(t)[len(t) // 2] if t else None, "times": t or [], "ok": ok}
                                          for n, (t, ok) in peers.items()}}  # fmt: skip


def _times(median: float, spread: float = 0.2, n: int = 7) -> list[float]:
    """`n` replay times around `median` with max - min = `spread`."""
    return [median - spread / 2 + spread * i / (n - 1) for i in range(n)]


def _gpu_check():
    sys.path.insert(0, str(KIT))
    import gpu_check

    return gpu_check


def test_verdict_triton_only_where_ours_beats_every_peer_by_more_than_the_spread():
    v = _gpu_check().verdict
    faster = [_row("decode", _times(9.0), {"cudnn": (_times(10.0), True), "flash": (_times(12.0), True)})]
    assert v("attention", "decode", faster)["verdict"] == "triton"
    # 3 % slower than the best peer: the engine, whatever the old 1.05x allowance said
    slower = [_row("decode", _times(10.3), {"cudnn": (_times(10.0), True), "flash": (_times(12.0), True)})]
    got = v("attention", "decode", slower)
    assert got["verdict"] == "engine" and "slower than cudnn" in got["reason"], got
    # faster by 0.3 us, but the replays spread over 0.5 us: not a measured win
    within = [_row("decode", _times(9.7, spread=0.5), {"cudnn": (_times(10.0, spread=0.1), True)})]
    got = v("attention", "decode", within)
    assert got["verdict"] == "engine" and "within the spread of cudnn" in got["reason"], got
    # one slow row among faster ones decides the phase
    rows = faster + [_row("decode", _times(20.0), {"flex": (_times(15.0), True)})]
    assert v("attention", "decode", rows)["verdict"] == "engine"


def test_verdict_needs_five_repeats_a_passing_peer_and_our_cross_check():
    v = _gpu_check().verdict
    few = [_row("prefill", _times(5.0, n=4), {"flash": (_times(10.0, n=4), True)})]
    assert "4 times" in v("attention", "prefill", few)["reason"] and v("attention", "prefill", few)["verdict"] == \
        "engine"  # fmt: skip
    # the fast peer failed its cross-check: it does not count; a row with no counting peer is the engine's
    failed_peer = [_row("decode", _times(10.0), {"compiled": (_times(1.0), False), "eager": (_times(20.0), True)},
                        op="relu2")]  # fmt: skip
    assert v("relu2", "decode", failed_peer)["verdict"] == "triton"
    no_peer = [_row("decode", _times(10.0), {"compiled": (_times(1.0), False), "eager": (None, True)}, op="relu2")]
    assert v("relu2", "decode", no_peer)["verdict"] == "engine"
    ours_failed = [_row("decode", _times(1.0), {"eager": (_times(9.0), True)}, ours_ok=False, op="relu2")]
    assert v("relu2", "decode", ours_failed)["verdict"] == "engine"
    assert v("attention", "decode", []) == {"verdict": "engine", "reason": "no side-by-side row measured"}


def test_verdicts_are_per_op_and_phase():
    gc = _gpu_check()
    rows = [_row("decode", _times(5.0), {"flash": (_times(10.0), True)}),
            _row("prefill", _times(50.0), {"flash": (_times(10.0), True)})]  # fmt: skip
    got = gc.verdicts({"name": "NVIDIA H200", "capability": "9.0"}, rows)
    assert set(got) == {"gpu", "capability", "attention", "relu2"} and got["gpu"] == "NVIDIA H200"
    assert got["attention"]["decode"]["verdict"] == "triton" and got["attention"]["prefill"]["verdict"] == "engine"
    assert all(got["relu2"][phase]["verdict"] == "engine" for phase in ("decode", "prefill")), "no relu2 rows"


def test_verdicts_are_keyed_as_measured_faster():
    from cognica_kernels import dispatch

    got = _gpu_check().verdicts({"name": "NVIDIA H100 80GB HBM3"}, [])
    assert {op: set(got[op]) for op in dispatch.OPS} == {op: set(dispatch.MEASURED_FASTER[op]) for op in dispatch.OPS}


def test_rows_reach_the_json_as_each_finishes(tmp_path):
    gc = _gpu_check()
    path = tmp_path / "compare.json"
    writer = gc.RowWriter(path, {"device": "x"})
    assert json.loads(path.read_text()) == {"device": "x", "compare": [], "complete": False}
    writer.add({"case": "a"})
    writer.add({"case": "b"})
    on_disk = json.loads(path.read_text())  # what a step killed now would leave
    assert [r["case"] for r in on_disk["compare"]] == ["a", "b"] and on_disk["complete"] is False
    writer.write(complete=True)
    assert json.loads(path.read_text())["complete"] is True


def test_l2_rotation_is_sized_by_the_bytes_a_launch_reads():
    gc = _gpu_check()
    p = gc.COMPARE_GPU
    kv = 2048 * 12 * 128 * 2 * 2  # one sequence's whole cache, 12.6 MB
    s_b1 = gc._attention_work(1, 2047, 1, 512, {"heads": 12, "head_dim": 128})[0]  # an S layer reads 513 keys
    assert s_b1 < kv / 3
    assert gc.rotation_copies(s_b1, p, kv) * s_b1 >= p["rotate_bytes"] > p["rotate_bytes"] // 2 >= 50 << 20
    assert gc.rotation_copies(s_b1, p, kv) > gc.rotation_copies(kv, p, kv), "fewer bytes read, more copies"
    assert gc.rotation_copies(256 * kv, p, 256 * kv) == 1
    assert gc.rotation_copies(1, p, 1) == p["max_copies"]
    assert gc.rotation_copies(1, p, p["max_input_bytes"] // 2) == 2, "copies bounded by the memory they take"


def test_sdpa_paged_decode_stand_in_matches_the_reference_in_fp32():
    """The whole-model step's "default" attention (torch SDPA over gathered in-window pages, capturable) computes
    the reference's paged attention: windowed and full, shuffled pages, sequences of different lengths."""
    sys.path.insert(0, str(KIT))
    import gpu_timing
    import torch

    from cognica_kernels.attention import paged_attention_reference

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, page, pages, batch = 4, 2, 16, 16, 8, 3
    kc = torch.randn(batch * pages, page, kv_heads, hd, generator=g)
    vc = torch.randn(batch * pages, page, kv_heads, hd, generator=g)
    table = torch.randperm(batch * pages, generator=g).view(batch, pages).to(torch.int32)
    seq_lens = torch.tensor([1, 70, 128], dtype=torch.int32)
    q = torch.randn(batch, heads, hd, generator=g)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    for window in (20, 33, 1000):
        got = gpu_timing.sdpa_paged_decode(q, kc, vc, table, seq_lens, 0.25, window)
        want = paged_attention_reference(q, kc, vc, table, seq_lens, qsl, 0.25, window)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"window {window}: {(got - want).abs().max()}"
