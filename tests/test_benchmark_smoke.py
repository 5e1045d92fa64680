"""The benchmark cannot rot: its smoke preset (a tiny model on the CPU, a few steps, every system and task that runs
without a GPU) writes a well-formed table, JSON and plot; the gpt-fast anchor generates what the reference does;
the byte budget and the target verdicts say what shared/docs/performance.md says; a quantization throughput row
whose ids are unlike the kernel's is a failure. No timing is asserted.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import TINY, decode_step_kernels, random_state_dict

from igpt_fast import bench_kernels, bench_measure, bench_report, benchmark
from igpt_fast.anchors import StaticCacheAnchor
from igpt_fast.config import ImageGPTConfig
from igpt_fast.model import ImageGPT
from igpt_fast.reference import ReferenceImageGPT

SMOKE_BATCHES = (1, 2)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run (about 20 s on 2 cores): its output folder, exit code and printed text."""
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = benchmark.main(["--sizes", "smoke", "--device", "cpu", "--backend", "torch", "--out", str(out)])
    return out, code, printed.getvalue()


def test_smoke_run_measures_every_system_and_task(smoke_run):
    out, code, _ = smoke_run
    assert code == 0
    smoke_model = bench_measure.MODELS["tiny"]
    data = json.loads((out / "results.json").read_text())
    rows = data["results"]
    by_key = {(r["task"], r["system"], r["batch"]): r for r in rows}
    expected = [(task, system, batch) for system in benchmark.PRESETS["smoke"].systems
                for task in benchmark.SYSTEM_TASKS[system] for batch in SMOKE_BATCHES]
    expected += [("kernel", case, batch) for batch in SMOKE_BATCHES
                 for case in (f"decode_attention (t={smoke_model.n_positions - 1})",
                              f"prefill_attention (S={smoke_model.n_positions})", "norm_qkv",
                              "linear_residual (attn c_proj)", "sample_tokens (top_k=40)",
                              "quantize (pixels to clusters)")]
    expected += [("startup", bench_measure.ENGINE, SMOKE_BATCHES[0])]  # smoke has no batch 8: its first
    missing = [key for key in expected if key not in by_key]
    assert not missing, missing
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["ms"] is None) == (r["task"] == "startup") and r["model"] == "tiny", r
        assert r["ms"] is None or r["ms"] > 0, r
        assert r["wall_s"] > 0, r  # what each row cost the run
        for name in ("card", "driver", "torch", "triton", "transformers", "git_commit"):
            assert name in r["environment"], (name, r)
    for task, system, batch in expected:
        r = by_key[task, system, batch]
        if task in ("generate", "complete"):
            # The engine runs whole images; anchors a window of 8 steps (smoke: 31 steps per image).
            assert r["extrapolated"] == (system != bench_measure.ENGINE), r
            whole_image = smoke_model.n_positions - bench_measure.task_prompt_length(smoke_model, task)
            assert r["steps_timed"] == (8 if system != bench_measure.ENGINE else whole_image), r
            assert r["images_per_s"] > 0 and r["first_call_s"] > 0 and r["bytes_per_step"] > 0, r
        if task == "kernel":
            assert r["baseline_ms"] > 0 and r["gb_per_s"] > 0, r
        if task == "startup":  # from two child processes, each timing its first generate() call
            assert r["first_call_s"] > 0 and r["warm_first_call_s"] > 0, r
            assert r["note"].startswith("whole child process:"), r
    assert data["settings"]["top_k"] == bench_measure.TOP_K


def test_smoke_run_measures_quantization_throughput(smoke_run):
    """The kernel, its unfused equivalent and transformers' processor (installed with the dev extra), each a few
    images per call, in pixels/s in the JSON and the printed table; the processor's ids checked against the
    kernel's."""
    out, _, printed = smoke_run
    rows = [r for r in json.loads((out / "results.json").read_text())["results"] if r["task"] == "quantize"]
    systems = [r["system"] for r in rows]
    assert systems[:2] == ["igpt-fast quantize (Triton)", "torch broadcast distances + argmin"], systems
    assert len(rows) == 3 and systems[2].startswith("transformers ImageGPTImageProcessor"), systems
    for r in rows:
        assert r["status"] == "ok" and r["batch"] == 4 and r["dtype"] == "uint8", r
        assert r["pixels_per_s"] > 0 and r["pixels_per_s"] == pytest.approx(r["images_per_s"] * 32 * 32), r
    assert rows[2]["note"].startswith(f"ids equal to the kernel's on {4 * 32 * 32} pixels"), rows[2]
    table = printed[printed.index("Quantization throughput"):].splitlines()
    assert [column.strip() for column in table[1].split("|")] == [
        "system", "images", "ms/call", "images/s", "pixels/s", "vs transformers", "note"]
    assert [line.split("|")[0].strip() for line in table[3:6]] == systems
    assert table[5].split("|")[5].strip() == "1x"  # the processor against itself


def test_quantize_ids_unlike_the_kernel_fail_the_row(device):
    """A mismatch beyond a near tie is a failed row without a number; one at a tie is counted and allowed."""
    pixels = torch.tensor([[[[0, 0, 0], [255, 255, 255]]]], dtype=torch.uint8, device=device)  # -1s and +1s
    # Clusters 0 and 1 are equally far from the first pixel (the kernel takes 0); cluster 2 is the second's.
    centers = torch.tensor([[-0.5, -1.0, -1.0], [-1.5, -1.0, -1.0], [1.0, 1.0, 1.0]], device=device)
    check = functools.partial(bench_kernels.ids_unlike_the_kernel, pixels=pixels, centers=centers)
    assert check(torch.tensor([[0, 2]])) == (0, 0)
    assert check(torch.tensor([[1, 2]])) == (0, 1)
    assert check(torch.tensor([[0, 0]])) == (1, 0)

    def case(ids):
        return bench_kernels.QuantizeCase("processor", 1, lambda: torch.tensor([ids]), on_host=True, check=check)

    failed = bench_kernels.measure_quantize(case([1, 0]), device)
    assert failed == {"status": "failed", "note": "ids differ from the kernel's at 1 of 2 pixels, beyond near ties"}
    ok = bench_kernels.measure_quantize(case([1, 2]), device)
    assert ok["ms"] > 0 and ok["note"] == "ids equal to the kernel's on 2 pixels (1 near ties differ)", ok


def test_smoke_run_prints_the_generation_table_last(smoke_run):
    out, _, printed = smoke_run
    text = (out / "summary.txt").read_text()
    assert printed.strip() == text.strip()
    kernels, forwards, generation = (text.index(title) for title in ("Kernels", "Whole-image", "Generation"))
    assert kernels < forwards < generation
    table = text[generation:].splitlines()
    assert [column.strip() for column in table[1].split("|")] == [
        "task", "system", "model", "dtype", "batch", "ms/step", "images/s", "first call", "vs best anchor",
        "% of floor", "peak mem", "target"]
    rows = [line for line in table if line.startswith(("generate", "complete"))]
    assert len(rows) == sum(len(set(benchmark.SYSTEM_TASKS[s]) & {"generate", "complete"}) * len(SMOKE_BATCHES)
                            for s in benchmark.PRESETS["smoke"].systems)


def test_smoke_run_plots_images_per_second(smoke_run):
    pytest.importorskip("matplotlib")
    PIL = pytest.importorskip("PIL.Image")
    out, _, _ = smoke_run
    png = out / "images_per_s.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with PIL.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 300


@pytest.mark.parametrize("run", sorted(p.name for p in (pathlib.Path(__file__).parents[1] / "benchmarks" / "results")
                                       .iterdir() if (p / "results.json").exists()))
def test_the_stored_gpu_runs_render_again(run, tmp_path, capsys):
    """benchmarks/results/*: a run recorded by an older version (systems since deleted among its rows) still renders,
    table and plot, as README's measured table is made from it."""
    pytest.importorskip("matplotlib")
    stored = pathlib.Path(__file__).parents[1] / "benchmarks" / "results" / run / "results.json"
    assert benchmark.main(["--from-json", str(stored), "--out", str(tmp_path)]) == 0
    assert "card: NVIDIA" in (tmp_path / "summary.txt").read_text()
    assert (tmp_path / "images_per_s.png").exists()


def test_from_json_renders_the_same_summary(smoke_run, tmp_path):
    out, _, _ = smoke_run
    assert benchmark.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.txt").read_text() == (out / "summary.txt").read_text()


def test_readme_gets_the_measured_table_between_its_markers(smoke_run, tmp_path, capsys):
    out, _, _ = smoke_run
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- measured:start -->\nold table\n<!-- measured:end -->\nafter\n")
    assert benchmark.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path),
                           "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- measured:start -->\nMeasured ") and "old table" not in text
    assert text.endswith("\n<!-- measured:end -->\nafter\n")
    table = [line for line in text.splitlines() if line.startswith("| generate | tiny | float32 |")]
    assert len(table) == len(SMOKE_BATCHES) and "x |" in table[0]  # a speedup over the best anchor
    assert "First call in a fresh process (tiny, float32, batch 1)" in text
    readme.write_text("no markers\n")
    capsys.readouterr()
    assert benchmark.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path),
                           "--readme", str(readme)]) == 2
    assert "needs a line <!-- measured:start -->" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"


@pytest.mark.parametrize("compile_options", [None, {"backend": "eager", "fullgraph": True}],
                         ids=["eager", "dynamo-fullgraph"])
def test_static_cache_anchor_generates_what_the_reference_generates(compile_options):
    """gpt-fast's recipe over the reference's weights: greedy tokens equal ReferenceImageGPT.generate's, for an
    SOS prompt and a longer one; traced whole by dynamo (no graph break), as reduce-overhead needs."""
    reference = ReferenceImageGPT.from_state_dict(TINY, random_state_dict(TINY, seed=5))
    for prompt_len in (1, 6):
        prompt = torch.randint(0, TINY.n_clusters, (3, prompt_len), generator=torch.Generator().manual_seed(1))
        prompt[:, 0] = TINY.sos_token_id
        new_tokens = TINY.n_positions + 1 - prompt_len
        anchor = StaticCacheAnchor(reference, 3, top_k=5, greedy=True, compile_options=compile_options)
        run = anchor.generate(prompt, new_tokens)
        assert torch.equal(run.sequences, reference.generate(prompt, max_new_tokens=new_tokens))
        assert run.decode_steps == new_tokens - 1


def test_static_cache_anchor_samples_from_the_top_k():
    reference = ReferenceImageGPT.from_state_dict(TINY, random_state_dict(TINY, seed=6))
    prompt = torch.full((64, 1), TINY.sos_token_id)
    sequences = StaticCacheAnchor(reference, 64, top_k=1).generate(prompt, 4).sequences
    assert torch.equal(sequences, reference.generate(prompt, max_new_tokens=4))  # top_k=1 is greedy
    first = StaticCacheAnchor(reference, 64, top_k=3).generate(prompt, 1).sequences[:, 1]
    with torch.no_grad():
        top3 = reference(prompt).logits[:, -1].topk(3).indices
    assert (first[:, None] == top3).any(dim=1).all()
    assert len(first.unique()) > 1  # 64 draws from 3 tokens: not all the same


@pytest.mark.gpu
def test_a_compiled_anchors_peak_memory_holds_at_least_its_own_tensors():
    """The benchmark's peak-memory baseline after the kernel rows: their torch baselines leave a cuBLAS workspace
    allocated for each side stream they ran on, and torch.compile's CUDA-graph trees free those workspaces when
    they record. Measured from a baseline that still counted them, reference-compiled's completion at batch 1
    reported -0.34 GiB on an H200. release_device_memory frees them first; each row's peak must then hold at least
    the anchor's weights and KV cache."""
    device = torch.device("cuda")
    x = torch.randn(256, 256, device=device)
    for _ in range(4):  # what four kernel rows' baselines leave behind
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            x @ x
    torch.cuda.synchronize(device)
    del x
    bench_measure.release_device_memory(device)
    base = bench_measure.allocated_memory(device)
    weights = {k: v.to(device=device, dtype=torch.float16) for k, v in random_state_dict(TINY, seed=7).items()}
    reference = ReferenceImageGPT.from_state_dict(TINY, weights)
    anchor = StaticCacheAnchor(reference, 2, top_k=5, compile_options=StaticCacheAnchor.compiled_options())
    own = sum(t.numel() * t.element_size() for t in [*reference.parameters(), *anchor.model.buffers()])
    for task in ("generate", "complete"):
        row = bench_measure.measure_generation(anchor, TINY, task, torch.float16, 2, steps=0, seed=0, device=device,
                                               peak_base=base, copy_bytes_per_s=1e12)
        assert row["peak_memory_bytes"] >= own, (task, row["peak_memory_bytes"], own)


@pytest.mark.parametrize("batch, gigabytes", [(1, 0.18), (8, 0.35), (64, 1.76), (256, 6.6)])
def test_decode_step_bytes_match_the_performance_doc(batch, gigabytes):
    """shared/docs/performance.md's table: imagegpt-small fp16, the average step of a whole image."""
    step = bench_measure.decode_step_bytes(ImageGPTConfig.small(), torch.float16, batch, prompt_len=1)
    assert step / 1e9 == pytest.approx(gigabytes, rel=0.03)


def _row(system, dtype, batch, ms, task="generate"):
    return {"task": task, "system": system, "model": "small", "dtype": dtype, "batch": batch, "status": "ok",
            "note": "", "ms": ms, "images_per_s": batch / (1024 * ms / 1e3), "first_call_s": 1.0,
            "extrapolated": system != bench_measure.ENGINE, "floor_ms": 0.1, "peak_memory_bytes": None}


def test_targets_and_ratios_to_the_best_anchor():
    rows = [_row("igpt-fast", "float16", 1, 0.19), _row("igpt-fast", "float16", 8, 0.30),
            _row("reference-compiled", "float16", 8, 2.4), _row("reference-eager", "float16", 8, 6.0),
            _row("igpt-fast", "float32", 8, 0.5), _row("transformers", "float32", 8, 17.0),
            _row("igpt-fast", "float32", 1, 0.4)]
    verdicts = [bench_report.target_verdict(r, rows) for r in rows]
    assert verdicts[0].startswith("met") and verdicts[1].startswith("NOT met")
    assert verdicts[4].startswith("met (34.0x")
    assert verdicts[2] == verdicts[3] == verdicts[5] == verdicts[6] == ""
    assert bench_report.target_verdict(_row("igpt-fast", "float32", 8, 1.0), rows[:1]).startswith("unknown")
    assert bench_report.best_anchor_ms(rows)[("generate", "small", "float16", 8)] == ("reference-compiled", 2.4)
    table = bench_report.generation_table(rows)
    line = next(x for x in table.splitlines() if x.startswith("generate | igpt-fast") and " 0.300 |" in x)
    assert " 8.00x |" in line and " 33% |" in line and "NOT met (<= 0.25 ms)" in line


def test_targets_say_so_when_the_card_is_not_the_h100_they_were_set_for():
    rows = [_row("igpt-fast", "float16", 1, 0.19), _row("igpt-fast", "float16", 8, 0.30),
            _row("igpt-fast", "float32", 8, 100.0), _row("transformers", "float32", 8, 120.0)]
    startup = dataclasses.asdict(bench_measure.Result("startup", "igpt-fast", "small", "float16", 8, first_call_s=5.0,
                                                      warm_first_call_s=1.0))
    rows[0]["environment"] = {"card": "NVIDIA H200"}
    assert [bench_report.target_verdict(r, rows) for r in rows[:3]] == [
        "met (<= 0.20 ms; set for an H100, run on NVIDIA H200)",
        "NOT met (<= 0.25 ms; set for an H100, run on NVIDIA H200)",
        "NOT met (1.2x vs >= 20x transformers; set for an H100, run on NVIDIA H200)"]
    assert (bench_report.startup_verdict(startup, rows)
            == "cold met (<= 15 s), warm met (<= 3 s); set for an H100, run on NVIDIA H200")
    rows[0]["environment"] = {"card": "NVIDIA H100 80GB HBM3"}
    assert bench_report.target_verdict(rows[1], rows) == "NOT met (<= 0.25 ms)"
    assert bench_report.target_verdict(rows[2], rows) == "NOT met (1.2x vs >= 20x transformers)"
    assert bench_report.startup_verdict(startup, rows) == "cold met (<= 15 s), warm met (<= 3 s)"


def test_startup_verdicts_against_the_first_call_targets():
    rows = [dataclasses.asdict(bench_measure.Result("startup", "igpt-fast", model, "float16", 8, first_call_s=cold,
                                                    warm_first_call_s=warm, note="whole child process: ..."))
            for model, cold, warm in (("small", 12.0, 4.0), ("small", 16.0, 1.0), ("tiny", 99.0, 99.0))]
    rows.append(dataclasses.asdict(bench_measure.Result("startup", "igpt-fast", "small", "float16", 8,
                                                        status="failed", note="RuntimeError: the child failed")))
    lines = bench_report.startup_table(rows).splitlines()[2:]
    assert "cold met (<= 15 s), warm NOT met (<= 3 s)" in lines[0] and "12.00 s |" in lines[0]
    assert "cold NOT met (<= 15 s), warm met (<= 3 s)" in lines[1]
    assert "met" not in lines[2]  # the targets speak of imagegpt-small
    assert "failed" in lines[3] and "the child failed" in lines[3]


def test_default_preset_is_core_on_a_gpu_and_smoke_without(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = benchmark.make_plan(benchmark.parse_args([]))
    assert plan.models == ("tiny",) and plan.device == torch.device("cpu")
    assert "no CUDA GPU: running the smoke preset" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = benchmark.make_plan(benchmark.parse_args([]))
    assert plan.models == ("small",) and plan.batches == (1, 8, 64) and plan.device == torch.device("cuda")
    assert plan.kernel_batches == (1, 8, 64, 256)  # the kernel rows are cheap: the issues' batch 256 too
    plan = benchmark.make_plan(benchmark.parse_args(["--batches", "8,1"]))
    assert plan.batches == plan.kernel_batches == (1, 8)  # --batches names every row's batches


def test_cli_help_and_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--help"])
    assert exit_info.value.code == 0
    assert "--sizes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--batches", "3"])  # not a batch bucket
    assert exit_info.value.code == 2
    capsys.readouterr()
    missing = tmp_path / "results.json"  # a run cut short before its first measurement
    assert benchmark.main(["--from-json", str(missing), "--out", str(tmp_path)]) == 1
    assert f"no results at {missing}" in capsys.readouterr().err


def test_sweep_measures_each_heuristic_value_and_restores_the_default(tmp_path):
    """--tasks sweep: a kernel row per (heuristic value, kernel it changes), each measured under that value."""
    from igpt_fast.kernels import linear

    with contextlib.redirect_stdout(io.StringIO()):
        code = benchmark.main(["--sizes", "smoke", "--tasks", "sweep", "--batches", "2", "--device", "cpu",
                               "--systems", "igpt-fast", "--out", str(tmp_path)])
    assert code == 0
    rows = [r for r in json.loads((tmp_path / "results.json").read_text())["results"] if r["task"] == "kernel"]
    names = [c.name for c in bench_kernels.kernel_cases(bench_measure.MODELS["tiny"], torch.float32, 2,
                                                        torch.device("cpu"), 0, with_dtype_free=False)]
    expected = {f"{name} [{sweep.constant.strip('_')}={value}]" for sweep in bench_kernels.SWEEPS if 2 in sweep.batches
                for value in sweep.values for name in names if name.startswith(sweep.cases)}
    # at batch 2: the residual projections' splits (3 values) on mlp c_proj, the decode attention heuristics (3 and 2
    # values) on two attention cases
    assert len(expected) == 3 + (3 + 2) * 2
    steps = {f"decode step [{sweep.constant.strip('_')}={value}]" for sweep in bench_kernels.SWEEPS
             if 2 in sweep.batches and sweep.steps for value in sweep.values}
    # and ATTENTION_KV_BEFORE_WAIT_MAX_BATCH's 2 values: decode steps alone
    assert len(steps) == 3 + 2 + 3 + 2
    expected |= steps
    assert {r["system"] for r in rows} == expected and len(rows) == len(expected)
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), [r for r in rows if r["status"] != "ok"]
    is_step = [r["system"].startswith("decode step") for r in rows]
    assert is_step == sorted(is_step, reverse=True), "every decode-step row comes before the kernel rows"
    # every sweep's default row is the same engine: its step is measured once and shared
    defaults = {f"decode step [{s.constant.strip('_')}={bench_kernels.current_value(s)}]" for s in bench_kernels.SWEEPS}
    default_rows = [r for r in rows if r["system"] in defaults]
    assert len(default_rows) == 4 and len({r["ms"] for r in default_rows}) == 1, default_rows
    assert sum(r["note"] == "every default: measured once a batch" for r in default_rows) == 3
    assert len({r["ms"] for r in rows if r["system"].startswith("decode step")}) > 1
    with bench_kernels.heuristic("igpt_fast.kernels.linear", "_GEMV_MIN_BLOCK_N", 32):
        assert linear._gemv_config(1, 512, 512)["BLOCK_N"] == 32
    assert linear._GEMV_MIN_BLOCK_N == 2 and linear._gemv_config(1, 512, 512)["BLOCK_N"] == 2


def test_the_sweep_table_puts_each_default_first_and_names_the_fastest(monkeypatch):
    from igpt_fast.kernels import attention

    monkeypatch.setattr(attention, "_DECODE_MIN_SPLIT_KEYS", 64)  # the default, whatever the code holds

    def row(system, ms, batch=1, status="ok"):
        return dict(task="kernel", system=system, model="small", dtype="float16", batch=batch, ms=ms, status=status)

    name = "DECODE_MIN_SPLIT_KEYS"
    rows = [row(f"decode step [{name}=128]", 0.30), row(f"decode step [{name}=64]", 0.40),
            row(f"decode step [{name}=64]", 0.50, batch=8), row(f"decode step [{name}=128]", 0.55, batch=8),
            row("decode step [DECODE_WHOLE_ROW_BLOCK_N=16]", 0.1, status="failed"),
            row(f"decode_attention (late) [{name}=128]", 0.01)]
    lines = bench_report.sweep_table(rows).splitlines()[2:]
    assert len(lines) == 2  # a failed row and kernel rows are not verdicts
    cells = [[cell.strip() for cell in line.split("|")] for line in lines]
    assert cells[0] == [name, "small", "float16", "1", "64: 0.4000, 128: 0.3000 (-25.0%)", "128"]
    assert cells[1] == [name, "small", "float16", "8", "64: 0.5000, 128: 0.5500 (+10.0%)", "64 (default)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_check_script_checks_its_arguments_and_refuses_without_a_gpu(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0  # a syntax error fails

    def run(*args):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120)

    assert run().returncode == 2 and "usage" in run().stderr
    short = run(str(tmp_path / "out"), "300")
    assert short.returncode == 2 and "SECONDS must be a whole number of at least 360" in short.stderr
    assert "got '300'" in short.stderr
    for seconds in ((), ("560",)):
        refused = run(str(tmp_path / "out"), *seconds)
        assert refused.returncode == 2 and "no CUDA GPU" in refused.stderr
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_gpu_sweep_script_checks_its_arguments_and_refuses_without_a_gpu(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_sweep.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0

    def run(*args):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120)

    assert run().returncode == 2 and "usage" in run().stderr
    bad = run(str(tmp_path / "out"), "60")
    assert bad.returncode == 2 and "SECONDS must be a whole number of at least 120, got '60'" in bad.stderr
    refused = run(str(tmp_path / "out"))
    assert refused.returncode == 2 and "no CUDA GPU" in refused.stderr
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_transformers_anchor_generates_what_the_reference_generates():
    """generate() must not take the SOS for padding (pad_token_id is the SOS): with top_k=1 the plain anchor's
    tokens are the reference's, for an SOS prompt and a longer one."""
    pytest.importorskip("transformers")
    from igpt_fast.anchors import TransformersAnchor

    config = bench_measure.MODELS["tiny"]
    weights = bench_measure.random_weights(config, 0, torch.device("cpu"))
    reference = ReferenceImageGPT.from_state_dict(config, weights)
    anchor = TransformersAnchor(config, weights, dtype=torch.float32, device="cpu", top_k=1)
    for prompt_len in (1, 12):
        prompt = bench_measure.prompt_of(config, 3, prompt_len, 0, "cpu")
        new_tokens = config.n_positions + 1 - prompt_len
        run = anchor.generate(prompt, new_tokens)
        assert torch.equal(run.sequences, reference.generate(prompt, max_new_tokens=new_tokens))


def test_transformers_static_anchor_passes_imagegpt_no_4d_mask():
    """With a static cache generate() builds a 4D attention mask, which ImageGPT's forward flattens to
    [batch, -1]; transformers 5.17 (the GPU machine's) then fails in the first forward. The anchor passes none."""
    pytest.importorskip("transformers")
    from igpt_fast.anchors import TransformersAnchor

    config = bench_measure.MODELS["tiny"]
    weights = bench_measure.random_weights(config, 0, torch.device("cpu"))
    anchor = TransformersAnchor(config, weights, dtype=torch.float32, device="cpu", top_k=5,
                                cache_implementation="static")
    masks = []
    hook = anchor.model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        run = anchor.generate(bench_measure.prompt_of(config, 2, 12, 0, "cpu"), 9)
    finally:
        hook.remove()
    assert run.sequences.shape == (2, 21) and run.decode_steps == 8
    assert len(masks) == 9 and all(m is None or m.ndim <= 2 for m in masks), [None if m is None else m.shape
                                                                                for m in masks]


def test_cases_that_fail_to_build_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """Building a sweep value's kernel cases, or the quantize cases (transformers' processor among them), may raise
    on a GPU: a failed row, and every later measurement still runs (not a crash that loses them)."""
    from igpt_fast.kernels import linear

    real_kernel_cases = bench_kernels.kernel_cases

    def kernel_cases(*args, **kwargs):
        if linear._GEMV_NUM_WARPS != 8:
            raise RuntimeError("no cases under this value")
        return real_kernel_cases(*args, **kwargs)

    def quantize_cases(*args, **kwargs):
        raise RuntimeError("no processor")

    monkeypatch.setattr(benchmark, "kernel_cases", kernel_cases)
    monkeypatch.setattr(benchmark, "quantize_cases", quantize_cases)
    monkeypatch.setattr(benchmark, "SWEEPS", (bench_kernels.Sweep("igpt_fast.kernels.linear", "_GEMV_NUM_WARPS", (4, 8),
                                                                 ("norm_qkv",), range(1, 17)),))
    with contextlib.redirect_stdout(io.StringIO()):
        code = benchmark.main(["--sizes", "smoke", "--tasks", "kernels,sweep", "--batches", "1", "--device", "cpu",
                               "--systems", "igpt-fast", "--out", str(tmp_path)])
    assert code == 1
    rows = {(r["task"], r["system"]): r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["kernel", "all kernels"]["status"] == "failed", rows
    assert rows["quantize", "quantize cases"]["note"] == "RuntimeError: no processor", rows
    assert rows["kernel", "sweep [GEMV_NUM_WARPS=4]"]["status"] == "failed", rows
    assert rows["kernel", "norm_qkv [GEMV_NUM_WARPS=8]"]["status"] == "ok", rows
    assert rows["kernel", "decode step [GEMV_NUM_WARPS=4]"]["status"] == "ok", rows  # the engine builds its own


def run_benchmark_script(name: str, *args: str) -> subprocess.CompletedProcess:
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / name
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


def test_the_launch_floor_script_checks_its_arguments_and_refuses_without_a_gpu():
    def run(*args):
        return run_benchmark_script("launch_floor.py", *args)

    shown = run("--help")
    assert shown.returncode == 0 and "--chain" in shown.stdout
    odd = run("--chain", "6")
    assert odd.returncode == 2 and "--chain must be a multiple of 4, got 6" in odd.stderr
    none = run("--rep-ms", "0")
    assert none.returncode == 2 and "--rep-ms must be >= 1, got 0" in none.stderr
    if not torch.cuda.is_available():
        refused = run()
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr


def test_the_decode_step_profiler_checks_its_arguments_and_refuses_without_a_gpu():
    def run(*args):
        return run_benchmark_script("profile_step.py", *args)

    shown = run("--help")
    assert shown.returncode == 0 and "--batches" in shown.stdout
    bad = run("--batches", "1,x")
    assert bad.returncode == 2 and "argument --batches: must be comma-separated integers, got '1,x'" in bad.stderr
    too_long = run("--steps", "1024")
    assert too_long.returncode == 2 and "--steps must be in [1, 1023] after a prompt of 1, got 1024" in too_long.stderr
    past_the_end = run("--prompt-length", "768", "--steps", "257")
    assert past_the_end.returncode == 2
    assert "--steps must be in [1, 256] after a prompt of 768, got 257" in past_the_end.stderr
    no_prompt = run("--prompt-length", "0")
    assert no_prompt.returncode == 2 and "--prompt-length must be in [1, 1023], got 0" in no_prompt.stderr
    if not torch.cuda.is_available():
        refused = run("--batches", "1")
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr


def test_the_settings_timer_checks_its_settings_and_refuses_without_a_gpu():
    def run(*args):
        return run_benchmark_script("step_settings.py", *args)

    shown = run("--help")
    assert shown.returncode == 0 and "--setting" in shown.stdout
    assert run("--batches", "1").returncode == 2  # no --setting at all
    unknown = run("--setting", "igpt_fast.kernels.attention._DECODE_BLOK_N=32")
    assert unknown.returncode == 2 and "module igpt_fast.kernels.attention has no _DECODE_BLOK_N" in unknown.stderr
    not_literal = run("--setting", "igpt_fast.decoder.ATTENTION_KV_BEFORE_WAIT_MAX_BATCH=eight")
    assert not_literal.returncode == 2 and "the value must be a Python literal, got 'eight'" in not_literal.stderr
    no_value = run("--setting", "", "--setting", "igpt_fast.decoder.ATTENTION_KV_BEFORE_WAIT_MAX_BATCH")
    assert no_value.returncode == 2 and "a setting is 'package.module.CONSTANT=value ...'" in no_value.stderr
    no_batch = run("--setting", "", "--batches", "8,0")
    assert no_batch.returncode == 2 and "argument --batches: must be positive, got [8, 0]" in no_batch.stderr
    bad_dtype = run("--setting", "", "--dtypes", "float16,int8")
    assert bad_dtype.returncode == 2 and "--dtypes must be among float32,float16,bfloat16, got int8" in bad_dtype.stderr
    if not torch.cuda.is_available():
        refused = run("--setting", "")
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr


def test_the_profilers_critical_path_charges_each_role_what_it_adds_to_the_chain(monkeypatch, few_linear_programs):
    """Decode steps are found by the kernels the engine really launches (under the interpreter), in any event
    order, among launches that are not a step; each launch is charged from its predecessor's end to its own."""
    spec = importlib.util.spec_from_file_location("profile_step", pathlib.Path(__file__).parents[1] / "benchmarks"
                                                  / "profile_step.py")
    profiler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profiler)
    config = TINY.replace(n_positions=128)
    step = decode_step_kernels(ImageGPT(config, random_state_dict(config), backend="triton"), 2, monkeypatch)
    roles = profiler.step_roles(config.n_layer)
    assert len(step) == len(roles)
    charge = {role: 1.0 + i for i, role in enumerate(dict.fromkeys(roles))}  # us each launch of a role adds
    whole = [*zip(step, [charge[role] for role in roles], strict=True)]
    prefill = [(name, 0.5) for name in ["_embed_kernel", "_gemv_kernel", "_prefill_attention_kernel", *step[3:]]]
    broken = [*whole[:5], ("Memcpy DtoD", 0.5), *whole[5:]]  # not a decode step
    kernels, end = [], 0.0
    for name, us in prefill + whole + broken + whole:
        end += us
        kernels.append((name, end - 3.0, end))  # each starts before its predecessor ends, as under PDL
    totals, steps = profiler.critical_path(kernels[::-1], config.n_layer)
    assert steps == 2
    assert totals == {role: 2 * charge[role] * roles.count(role) for role in charge}


def run_gpu_check_with_stand_ins(tmp_path, seconds: int):
    """benchmarks/gpu_check.sh OUT seconds, with a stand-in python3 that says CUDA is there and does nothing but log
    its arguments: (the run, the logged calls)."""
    shims = tmp_path / "bin"
    shims.mkdir(parents=True)
    calls = tmp_path / "calls.log"
    # The tests take a moment, as on a GPU: the cache warmer, started in the background before them and stopped
    # after them, gets to log its call (without it, a race the warmer sometimes lost).
    (shims / "python3").write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\n'
                                   'case "$*" in *"-m pytest -m gpu tests"*) sleep 1;; esac\n')
    (shims / "python3").chmod(0o755)
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script), str(tmp_path / "out"), str(seconds)], capture_output=True, text=True,
                          env=env, timeout=120)
    return done, calls.read_text().splitlines()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_the_six_minute_gpu_check_leaves_out_the_diagnostics_and_the_sweep(tmp_path):
    """Issue 7's check: install, tests, the core benchmark, the summary last; nothing past its 6 minutes."""
    done, logged = run_gpu_check_with_stand_ins(tmp_path, 360)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any(line.startswith(("benchmarks/profile_step.py", "benchmarks/step_settings.py",
                                    "benchmarks/launch_floor.py")) for line in logged)
    assert not any("--tasks sweep" in line or "--batches 256" in line or "--sizes full" in line for line in logged)
    assert logged[-1].startswith("-m igpt_fast.benchmark --from-json")
    assert "skipped" not in done.stdout  # the plain check is not a cut-short long one


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_the_gpu_check_gives_what_its_seconds_leave_to_the_wider_sizes_batch_256_and_the_sweep(tmp_path):
    """The scripts' order and time arithmetic, with a stand-in python3: a script bug found on the GPU machine costs
    device time that comes a few times a month."""
    done, logged = run_gpu_check_with_stand_ins(tmp_path, 560)
    out = tmp_path / "out"
    benchmark_calls = [line for line in logged if line.startswith("-m igpt_fast.benchmark")]
    assert [call.split()[2] for call in benchmark_calls] == ["--sizes", "--sizes", "--from-json", "--sizes", "--tasks",
                                                             "--from-json", "--from-json"], benchmark_calls
    core, wider, wider_tables, b256, sweep, verdicts, summary = benchmark_calls
    assert "--without" not in core and "--batches 256" in b256
    # the wider sizes first: bfloat16 at every model width, into a folder of their own, with a time limit
    assert wider.startswith("-m igpt_fast.benchmark --sizes full --models small,medium,large --dtypes bfloat16 ")
    assert f"--out {out}/wider --time-limit " in wider
    plan = benchmark.make_plan(benchmark.parse_args(wider.split()[2:]))  # arguments the benchmark takes, as meant
    assert (plan.models, plan.dtypes, plan.batches) == (("small", "medium", "large"), ("bfloat16",), (8, 64))
    assert (plan.systems, plan.tasks) == (("igpt-fast", "transformers"), ("generate", "features", "likelihood"))
    assert plan.anchor_steps == 32 and 60 <= plan.time_limit_s <= 120
    assert wider_tables == f"-m igpt_fast.benchmark --from-json {out}/wider/results.json --out {out}/wider"
    # the benchmark gets what the 6 minutes leave: 360 s less what the stand-in stages took (a second or two), the
    # 30 s kept for the stages after it and 20 s for the measurement running when the limit strikes
    core_limit = int(core.split("--time-limit ")[1].split()[0])
    assert 360 - 30 - 20 - 5 <= core_limit <= 360 - 30 - 20
    # the wider sizes, then the diagnostics come after the 6 minutes' stages, before batch 256 and the sweep
    profiles = [i for i, line in enumerate(logged) if line.startswith("benchmarks/profile_step.py")]
    pytest_benchmark = next(i for i, line in enumerate(logged) if "benchmarks/test_bench_generation.py" in line)
    assert pytest_benchmark < logged.index(wider) < logged.index(wider_tables) < profiles[0]
    assert len(profiles) == 3 and profiles[-1] < logged.index(b256)
    assert logged.index("benchmarks/launch_floor.py") < logged.index(b256)
    # float32's step with its GEMV limit at 64 against the default, between the profiles and the launch floor
    fp32_gemv = ("--dtypes", "float32", "--batches", "64", "--setting", "", "--setting",
                 "igpt_fast.kernels.linear._FLOAT32_GEMV_MAX_M=64")
    at = logged.index(f"benchmarks/step_settings.py {' '.join(fp32_gemv)}")
    assert profiles[-1] < at < logged.index("benchmarks/launch_floor.py")
    if not torch.cuda.is_available():  # its settings parse (a renamed constant would fail the stage on the GPU)
        refused = run_benchmark_script("step_settings.py", *fp32_gemv)
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr, refused.stderr
    assert f"== benchmark time limit: {core_limit} s" in done.stdout
    warm = logged.index("benchmarks/warm_triton_cache.py")  # started before the tests, stopped before the benchmark
    assert logged.index(next(line for line in logged if "pip install" in line)) < warm < logged.index(core)
    assert "== warm cache: 0 kernel variants compiled ahead" in done.stdout  # the stand-in compiled nothing
    sweep_limit = int(sweep.split("--time-limit ")[1].split()[0])
    # 560 less what the stand-in stages took (a second or two), 10 s of gpu_check's margin, 15 of gpu_sweep's and
    # the 25 s the sweep keeps to write its tables
    assert 560 - 10 - 15 - 25 - 5 <= sweep_limit <= 560 - 10 - 15 - 25
    assert "/more/sweep/results.json" in verdicts
    assert summary == f"-m igpt_fast.benchmark --from-json {out}/results.json --out {out}"
    assert logged[-1] == summary  # the summary table is printed last
    assert "== install: this checkout is installed already" in done.stdout  # gpu_sweep.sh does not install again
    assert not any("pip install" in line for line in logged[logged.index(b256) - 1:])


def test_without_leaves_systems_out_of_the_plan():
    args = benchmark.parse_args(["--sizes", "core", "--without", "igpt-fast-no-pdl,transformers"])
    assert set(benchmark.make_plan(args).systems) == set(benchmark.SYSTEMS) - {"igpt-fast-no-pdl", "transformers"}


def test_the_cache_warmer_lists_what_the_gpu_checks_timed_stages_launch():
    """benchmarks/warm_triton_cache.py --dry-run: the variants it would compile ahead on a GPU, recorded on the CPU
    (the kernels compiled, not interpreted: a subprocess without TRITON_INTERPRET), the sweep's values among them."""
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "warm_triton_cache.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(*args, **extra_env):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              env={**env, **extra_env}, timeout=300)

    listed = run("--dry-run")
    assert listed.returncode == 0, listed.stderr[-3000:]
    lines = listed.stdout.splitlines()
    count = int(lines[0].split()[0])
    assert count == len(lines) - 1 > 100
    kernels = [line.split()[0] for line in lines[1:]]
    assert {"_decode_kernel", "_gemv_kernel", "_dot_kernel", "_sample_kernel", "_embed_kernel"} <= set(kernels)
    assert any("'USE_PDL': False" in line for line in lines)  # the no-PDL rows'
    assert any("_decode_kernel" in line and "'BLOCK_N': 16" in line for line in lines)  # a sweep value
    assert any("_dot_kernel" in line and "'BLOCK_K': 256" in line for line in lines)
    assert any("_gemv_kernel" in line and "'SPLITS': 4" in line for line in lines)  # the residual split-K sweep's
    assert any("_dot_kernel" in line and "'SPLITS': 2" in line for line in lines)
    fewer = run("--dry-run", "--no-sweeps")
    assert fewer.returncode == 0 and int(fewer.stdout.split()[0]) < count
    refused = run("--dry-run", TRITON_INTERPRET="1")
    assert refused.returncode == 2 and "TRITON_INTERPRET=1 is set" in refused.stderr
    if not torch.cuda.is_available():
        refused = run()
        assert refused.returncode == 2 and "needs a CUDA GPU" in refused.stderr
