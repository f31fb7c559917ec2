"""The step benchmark: its memory measure against known allocations, and a tiny end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from emf_lightning.commands.bench import cpu_peak_bytes, main, markdown_report


def test_cpu_peak_bytes_replays_allocations_exactly():
    def work():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(2000, 1000)  # 8 MB, live together with a: peak 12 MB
        del a
        c = torch.empty(500, 1000)  # 2 MB after a is gone: 10 MB
        del b, c

    cpu_peak_bytes(lambda: None)  # the first profiled call of a process is the warm-up (see bench_steps)
    assert cpu_peak_bytes(work) == 12_000_000


def test_dry_run_prints_resolved_setup(capsys):
    assert main(["--dry-run", "--sizes", "tiny", "--batch", "4", "--variants", "mf25"]) == 0
    setup = json.loads(capsys.readouterr().out)
    assert setup["device"] == "cpu" and setup["variants"] == ["fm", "mf25"]  # FM is always the baseline
    assert setup["workloads"][0]["batch"] == 4 and setup["workloads"][0]["size"] == "tiny"


def test_tiny_benchmark_runs_and_reports_ratios(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = [
        "--sizes",
        "tiny",
        "--batch",
        "4",
        "--image-size",
        "8",
        "--patch-size",
        "4",
        "--text-len",
        "4",
        "--text-dim",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--fm-steps",
        "2",
        "--sample-repeats",
        "1",
        "--no-loader",
        "--threads",
        "1",
        "--json",
        str(out_json),
        "--out",
        str(out_md),
    ]
    assert main(args) == 0
    report = json.loads(out_json.read_text())
    steps = {s["variant"]: s for s in report["workloads"][0]["steps"]}
    assert set(steps) == {"fm", "mf_naive", "mf25", "mf75", "mf_pred25", "mf_pred75"}
    assert steps["fm"]["time_ratio"] == 1.0 and steps["fm"]["memory_ratio"] == 1.0
    for s in steps.values():
        assert s["error"] is None and s["median_ms"] > 0 and s["peak_step_mib"] > 0
        assert s["time_ratio"] == s["median_ms"] / steps["fm"]["median_ms"]
    # Memory does not depend on machine load: the naive full-batch JVP keeps tangents for every row.
    assert steps["mf_naive"]["peak_step_mib"] > steps["fm"]["peak_step_mib"]
    assert set(report["workloads"][0]["sampling"]) == {"meanflow_1", "meanflow_2", "flow_matching_2"}
    text = out_md.read_text()
    assert text == markdown_report(report) and "| flow matching |" in text


def test_report_is_written_after_every_size(tmp_path, monkeypatch):
    """A run killed by its time limit (the 2026-11-30 GPU session) keeps the sizes it finished."""
    import emf_lightning.commands.bench as bench

    real_bench_steps, calls = bench.bench_steps, []

    def first_size_then_killed(w, *args, **kwargs):
        calls.append(w.size)
        if len(calls) > 1:
            raise KeyboardInterrupt("stand-in for the time limit")
        return real_bench_steps(w, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_steps", first_size_then_killed)
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = [
        "--sizes",
        "tiny,tiny",
        "--batch",
        "2",
        "--image-size",
        "8",
        "--patch-size",
        "4",
        "--text-len",
        "4",
        "--text-dim",
        "8",
        "--variants",
        "mf25",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--no-sampling",
        "--no-loader",
        "--threads",
        "1",
        "--json",
        str(out_json),
        "--out",
        str(out_md),
    ]
    try:
        main(args)
    except KeyboardInterrupt:
        pass
    report = json.loads(out_json.read_text())
    assert calls == ["tiny", "tiny"] and [wl["workload"]["size"] for wl in report["workloads"]] == ["tiny"]
    assert out_md.read_text() == markdown_report(report)


def test_sana_adapter_workload_trains_what_emf_trains(tmp_path):
    """`--sizes sana-*`: the diffusers adapter with random weights, EMF's trainable set, every production step."""
    from emf_lightning.commands.bench import SANA_SIZES
    from emf_lightning.models.diffusers_adapter import SANA_CONFIGS

    out_json = tmp_path / "bench.json"
    args = ["--sizes", "sana-tiny", "--batch", "2", "--text-len", "4", "--text-dim", "8", "--repeats", "1"]
    args += ["--warmup", "1", "--variants", "mf25,mf_pred25", "--no-sampling", "--no-loader", "--threads", "1"]
    out_md = tmp_path / "bench.md"
    assert main([*args, "--json", str(out_json), "--out", str(out_md)]) == 0
    wl = json.loads(out_json.read_text())["workloads"][0]
    assert f"({wl['info']['trainable_m']:.1f}M trained)" in out_md.read_text()
    config = SANA_CONFIGS[SANA_SIZES["sana-tiny"]]
    assert wl["workload"]["channels"] == config["in_channels"] and wl["workload"]["patch_size"] == config["patch_size"]
    # the patch embedding, caption projection and output projection stay frozen (trainable="emf")
    assert 0 < wl["info"]["trainable_m"] < wl["info"]["parameters_m"]
    steps = {s["variant"]: s for s in wl["steps"]}
    assert set(steps) == {"fm", "mf25", "mf_pred25"}
    assert all(s["error"] is None and s["median_ms"] > 0 for s in steps.values())


def test_sana_workload_refuses_a_channel_count_its_config_does_not_have():
    with pytest.raises(SystemExit, match="32 channels"):
        main(["--dry-run", "--sizes", "sana-1.6b", "--channels", "4"])


def test_fp32_jvp_variants_run_under_bf16_autocast_and_are_left_out_without_it(capsys, tmp_path):
    assert main(["--dry-run", "--sizes", "tiny"]) == 0
    assert not {"mf_fp32jvp25", "mf_fp32jvp75"} & set(json.loads(capsys.readouterr().out)["variants"])
    out_json = tmp_path / "bench.json"
    args = ["--sizes", "tiny,unet-tiny", "--batch", "2", "--image-size", "8", "--patch-size", "4", "--text-len", "4"]
    args += ["--text-dim", "8", "--precision", "bf16", "--repeats", "1", "--warmup", "1", "--no-sampling"]
    assert main([*args, "--no-loader", "--threads", "1", "--json", str(out_json)]) == 0
    workloads = json.loads(out_json.read_text())["workloads"]
    assert [wl["workload"]["size"] for wl in workloads] == ["tiny", "unet-tiny"]  # a U-Net takes no patch size
    for wl in workloads:
        steps = {s["variant"]: s for s in wl["steps"]}
        assert {"mf_fp32jvp25", "mf_fp32jvp75"} <= set(steps)
        assert all(s["error"] is None and s["median_ms"] > 0 for s in steps.values())


COMPILED_TWO_MODELS = """
import sys
import emf_lightning.commands.bench as bench
from emf_lightning.models.compiled import CompiledForward

# Dynamo traces and guards as with inductor; the "eager" backend only skips code generation (seconds, not minutes).
bench.CompiledForward = lambda module: CompiledForward(module, backend="eager")
sys.exit(bench.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_compiled_benchmark_of_two_models_in_one_process(tmp_path):
    """`--compile --sizes tiny,unet-tiny`: the U-Net's compiled step once failed on the DiT's cached graph.
    In its own process: Dynamo's caches and autograd's threads must not reach the tests that fork after it."""
    out_json = tmp_path / "bench.json"
    args = ["--sizes", "tiny,unet-tiny", "--compile", "--batch", "2", "--image-size", "8", "--patch-size", "4"]
    args += ["--text-len", "4", "--text-dim", "8", "--variants", "mf25", "--repeats", "1", "--warmup", "1"]
    args += ["--no-sampling", "--no-loader", "--threads", "1", "--json", str(out_json)]
    run = subprocess.run([sys.executable, "-c", COMPILED_TWO_MODELS, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for wl in json.loads(out_json.read_text())["workloads"]:
        assert all(s["error"] is None for s in wl["steps"]), wl["steps"]
