"""The benchmark's reports: results.json, the verdicts on shared/docs/performance.md's targets, the tables (the
generation table last) under the run's card and versions, and the plot of images/s against batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from igpt_fast.anchors import ANCHORS
from igpt_fast.bench_kernels import QUANTIZE_CLUSTERS, QUANTIZE_SIDE, SWEEPS, current_value
from igpt_fast.bench_measure import ENGINE, MODELS, SYSTEMS, TOP_K, Result

if TYPE_CHECKING:
    from igpt_fast.benchmark import Plan

# shared/docs/performance.md: fp16 on an H100, imagegpt-small, whole images, top_k=40.
TARGET_MS_PER_STEP = {1: 0.20, 8: 0.25, 64: 0.90, 256: 3.0}
TARGET_FP32_SPEEDUP = (8, 20.0)  # at batch 8 in float32, >= 20x transformers' float32 generate
TARGET_FIRST_CALL_S = {"cold": 15.0, "warm": 3.0}  # kernel compile + graph capture, empty / filled Triton cache


def write_json(path: Path, results: list[Result], plan: Plan) -> None:
    """results.json: the plan's settings (and top_k) and every result so far."""
    settings = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in dataclasses.asdict(plan).items()}
    settings["top_k"] = TOP_K
    rows = [dataclasses.asdict(r) for r in results]
    for row in rows:
        if row["task"] == "quantize":
            row["pixels_per_s"] = pixels_per_s(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "results": rows}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a reader (or a killed run) never sees half a file


def pixels_per_s(row: dict) -> float | None:
    """A quantize row's throughput in pixels (Result has no field for it: results.json and the table add it)."""
    return None if row["images_per_s"] is None else row["images_per_s"] * QUANTIZE_SIDE ** 2


def _key(row: dict) -> tuple:
    return row["task"], row["model"], row["dtype"], row["batch"]


def best_anchor_ms(rows: list[dict]) -> dict[tuple, tuple[str, float]]:
    """(task, model, dtype, batch) -> the fastest anchor's (system, ms)."""
    best = {}
    for r in rows:
        if r["system"] in ANCHORS and r["status"] == "ok" and (_key(r) not in best or r["ms"] < best[_key(r)][1]):
            best[_key(r)] = (r["system"], r["ms"])
    return best


def _card(rows: list[dict]) -> str:
    return next((r["environment"].get("card") or "" for r in rows if r.get("environment")), "")


def _other_card(rows: list[dict]) -> str:
    """'' on an H100 (or with no card recorded), else a note that the targets were set for one: an H200 moves bytes
    about 1.4x faster, so 'met' there does not say an H100 would meet it, and on a CPU no verdict speaks of them."""
    card = _card(rows)
    return f"; set for an H100, run on {card}" if card and "H100" not in card else ""


def target_verdict(row: dict, rows: list[dict]) -> str:
    """met / NOT met for the rows the performance targets speak about (they are set for an H100), else ''."""
    if row["task"] != "generate" or row["system"] != ENGINE or row["model"] != "small" or row["status"] != "ok":
        return ""
    if row["dtype"] == "float16" and row["batch"] in TARGET_MS_PER_STEP:
        target = TARGET_MS_PER_STEP[row["batch"]]
        return f"{'met' if row['ms'] <= target else 'NOT met'} (<= {target:.2f} ms{_other_card(rows)})"
    batch, speedup = TARGET_FP32_SPEEDUP
    if row["dtype"] == "float32" and row["batch"] == batch:
        hf = [r for r in rows if r["system"] == "transformers" and _key(r) == _key(row) and r["status"] == "ok"]
        if not hf:
            return f"unknown (needs transformers fp32 b{batch})"
        ratio = hf[0]["ms"] / row["ms"]
        return (f"{'met' if ratio >= speedup else 'NOT met'} "
                f"({ratio:.1f}x vs >= {speedup:.0f}x transformers{_other_card(rows)})")
    return ""


def _table(headers: list[str], lines: list[list[str]], numeric: range) -> str:
    """Columns aligned; those in `numeric` to the right."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = " | ".join(f"{{:{'>' if i in numeric else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*headers), "-+-".join("-" * w for w in widths)]
    return "\n".join(out + [fmt.format(*line) for line in lines])


def _num(value, spec: str, star: bool = False, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit + ("*" if star else "")


def _memory(row: dict) -> str:
    return "-" if row.get("peak_memory_bytes") is None else f"{row['peak_memory_bytes'] / 2**30:.2f} GiB"


def generation_table(rows: list[dict]) -> str:
    best = best_anchor_ms(rows)
    lines = []
    for r in rows:
        if r["task"] not in ("generate", "complete"):
            continue
        if r["status"] != "ok":
            lines.append([r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), r["status"], "", "", "",
                          "", "", r["note"][:60]])
            continue
        star = r["extrapolated"]
        anchor = best.get(_key(r))
        lines.append([
            r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), _num(r["ms"], ".3f", star),
            _num(r["images_per_s"], ".3g", star), _num(r["first_call_s"], ".2f", unit=" s"),
            f"{anchor[1] / r['ms']:.2f}x" if anchor else "-",
            f"{100 * r['floor_ms'] / r['ms']:.0f}%", _memory(r), target_verdict(r, rows),
        ])
    return _table(["task", "system", "model", "dtype", "batch", "ms/step", "images/s", "first call",
                   "vs best anchor", "% of floor", "peak mem", "target"], lines, range(5, 11))


def forward_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["task"] not in ("features", "likelihood"):
            continue
        if r["status"] != "ok":
            lines.append([r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), r["status"], "", "", "",
                          r["note"][:60]])
            continue
        reference = [a for a in rows if a["system"] == "reference-eager" and _key(a) == _key(r)
                     and a["status"] == "ok"]
        lines.append([r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), _num(r["ms"], ".2f"),
                      _num(r["images_per_s"], ".4g"), _num(r["first_call_s"], ".2f", unit=" s"),
                      f"{reference[0]['ms'] / r['ms']:.2f}x" if reference else "-", _memory(r)])
    return _table(["task", "system", "model", "dtype", "batch", "ms/call", "images/s", "first call",
                   "vs reference", "peak mem"], lines, range(5, 10))


def kernel_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["task"] != "kernel":
            continue
        if r["status"] != "ok":
            lines.append([r["system"], r["model"], r["dtype"], str(r["batch"]), r["status"], "", "", "", "",
                          r["note"][:60]])
            continue
        baseline = r["baseline_ms"]  # None in sweep rows
        lines.append([r["system"], r["model"], r["dtype"], str(r["batch"]), f"{1e3 * r['ms']:.1f}",
                      _num(r["gb_per_s"], ".4g"), f"{100 * r['floor_ms'] / r['ms']:.0f}%",
                      "-" if baseline is None else f"{1e3 * baseline:.1f}",
                      "-" if baseline is None else f"{baseline / r['ms']:.2f}x", r["baseline"] or "-"])
    return _table(["kernel", "model", "dtype", "batch", "us", "GB/s", "% of floor", "torch us", "speedup",
                   "torch equivalent"], lines, range(4, 9))


_SWEEP_STEP = re.compile(r"decode step \[(?P<name>\w+)=(?P<value>[^\]]+)\]")


def sweep_table(rows: list[dict]) -> str:
    """The sweep's whole-decode-step rows, the ones that decide a default: per heuristic, model, dtype and batch, each
    value's ms per step, the default (the value the code holds now) first and the others' change against it, then
    the fastest value."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        match = _SWEEP_STEP.fullmatch(r["system"]) if r["task"] == "kernel" and r["status"] == "ok" else None
        if match:
            groups.setdefault((match["name"], r["model"], r["dtype"], r["batch"]), {})[match["value"]] = r["ms"]
    defaults = {s.constant.strip("_"): str(current_value(s)) for s in SWEEPS}
    lines = []
    for (name, model, dtype, batch), ms in groups.items():
        default = defaults.get(name)
        cells = [f"{value}: {ms[value]:.4f}" + ("" if value == default or default not in ms else
                                                 f" ({100 * (ms[value] / ms[default] - 1):+.1f}%)")
                 for value in sorted(ms, key=lambda value: value != default)]
        fastest = min(ms, key=ms.get)
        lines.append([name, model, dtype, str(batch), ", ".join(cells),
                      f"{fastest} (default)" if fastest == default else fastest])
    return _table(["heuristic", "model", "dtype", "batch", "ms/step by value (default first)", "fastest"], lines,
                  range(3, 4))


def startup_verdict(row: dict, rows: list[dict]) -> str:
    """met / NOT met for each first-call target (set for imagegpt-small on an H100), else ''."""
    if row["model"] != "small":
        return ""
    seconds = {"cold": row["first_call_s"], "warm": row["warm_first_call_s"]}
    return ", ".join(f"{cache} {'met' if seconds[cache] <= limit else 'NOT met'} (<= {limit:.0f} s)"
                     for cache, limit in TARGET_FIRST_CALL_S.items()) + _other_card(rows)


def startup_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["task"] != "startup":
            continue
        if r["status"] != "ok":
            lines.append([r["system"], r["model"], r["dtype"], str(r["batch"]), r["status"], "", "", r["note"][:80]])
            continue
        lines.append([r["system"], r["model"], r["dtype"], str(r["batch"]), f"{r['first_call_s']:.2f} s",
                      f"{r['warm_first_call_s']:.2f} s", startup_verdict(r, rows), r["note"][:80]])
    return _table(["system", "model", "dtype", "batch", "cold cache", "warm cache", "target", "note"], lines,
                  range(4, 6))


def quantize_table(rows: list[dict]) -> str:
    quantize = [r for r in rows if r["task"] == "quantize"]
    processor = [r for r in quantize if r["system"].startswith("transformers") and r["status"] == "ok"]
    lines = []
    for r in quantize:
        if r["status"] != "ok":
            lines.append([r["system"], str(r["batch"]), r["status"], "", "", "", r["note"][:80]])
            continue
        vs = f"{pixels_per_s(r) / pixels_per_s(processor[0]):.3g}x" if processor else "-"
        lines.append([r["system"], str(r["batch"]), f"{r['ms']:.3f}", _num(r["images_per_s"], ".4g"),
                      _num(pixels_per_s(r), ".4g"), vs, r["note"][:80]])
    return _table(["system", "images", "ms/call", "images/s", "pixels/s", "vs transformers", "note"], lines,
                  range(1, 6))


def run_time(rows: list[dict]) -> str:
    """What each system (the kernel, quantize and startup rows as one each, by task) cost the run, building and
    compiling included, and how many rows the time limit cut: where to look when a limit cuts the rows after it."""
    spent: dict[str, float] = {}
    for r in rows:
        if r.get("wall_s") is not None:
            part = r["task"] if r["task"] in ("kernel", "quantize", "startup") else r["system"]
            spent[part] = spent.get(part, 0.0) + r["wall_s"]
    cut = sum(r["status"] == "skipped" and r["note"] == "time limit reached" for r in rows)
    parts = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in spent.items())
    return f"run time: {parts or 'not recorded'}; {cut} rows cut by the time limit"


def summary(rows: list[dict]) -> str:
    """Every table, the generation table last, with the run's card and versions."""
    env = next((r["environment"] for r in rows if r.get("environment")), {})
    header = (f"card: {env.get('card')} (driver {env.get('driver')}), copy bandwidth {env.get('copy_gb_per_s')} "
              f"GB/s; torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}; "
              f"commit {env.get('git_commit')}; {env.get('date')}")
    notes = ("ms/step: one decode step, compile and capture excluded (first call: apart, in this process, so it "
             "reuses kernels that earlier rows compiled); * timed over a window of "
             "steps in the middle of the image, images/s extrapolated; vs best anchor: the fastest anchor's "
             "ms/step over this row's; % of floor: the bytes a step must move at the copy bandwidth over the "
             "time; targets are set for an H100.")
    parts = [header, run_time(rows)]
    if any(r["task"] == "kernel" for r in rows):
        parts += ["", "Kernels (one decode step's launches; torch: the unfused PyTorch equivalent)",
                  kernel_table(rows)]
    if any(_SWEEP_STEP.fullmatch(r["system"]) for r in rows if r["task"] == "kernel" and r["status"] == "ok"):
        parts += ["", "Sweep: the whole decode step under each value of a launch heuristic (these rows decide "
                      "defaults; the kernel rows above say why)", sweep_table(rows)]
    if any(r["task"] == "quantize" for r in rows):
        parts += ["", f"Quantization throughput (uint8 {QUANTIZE_SIDE}x{QUANTIZE_SIDE} images to ids over "
                      f"{QUANTIZE_CLUSTERS} random clusters; the processor on the host CPU, the others on the card)",
                  quantize_table(rows)]
    if any(r["task"] == "startup" for r in rows):
        parts += ["", "First call in a fresh process (kernel compile, graph capture, first tokens; cold: an empty "
                      "Triton cache, warm: the cache the cold run filled)", startup_table(rows)]
    if any(r["task"] in ("features", "likelihood") for r in rows):
        parts += ["", "Whole-image forwards (features, likelihood)", forward_table(rows)]
    parts += ["", "Generation (top_k=40 sampling; complete: the second half of each image)", generation_table(rows),
              notes]
    return "\n".join(parts)


README_START, README_END = "<!-- measured:start -->", "<!-- measured:end -->"


def markdown_summary(rows: list[dict]) -> str:
    """The README's measured block: igpt-fast's generation rows against the best anchor and the targets, and the
    first call, under the run's card, date and versions."""
    env = next((r["environment"] for r in rows if r.get("environment")), {})
    best = best_anchor_ms(rows)
    out = [f"Measured {env.get('date')} on {env.get('card')} (driver {env.get('driver')}; torch {env.get('torch')}, "
           f"triton {env.get('triton')}, transformers {env.get('transformers')}; commit "
           f"{str(env.get('git_commit'))[:12]}), random weights, top_k={TOP_K}; * = timed over a window of steps:",
           "", "| task | model | dtype | batch | ms/step | images/s | best anchor, ms/step | speedup | target |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["task"] not in ("generate", "complete") or r["system"] != ENGINE or r["status"] != "ok":
            continue
        anchor = best.get(_key(r))
        star = "*" if r["extrapolated"] else ""
        anchor_ms = f"{anchor[0]} {anchor[1]:.2f}" if anchor else "-"
        speedup = f"{anchor[1] / r['ms']:.1f}x" if anchor else "-"
        out.append(f"| {r['task']} | {r['model']} | {r['dtype']} | {r['batch']} | {r['ms']:.3f}{star} | "
                   f"{r['images_per_s']:.3g}{star} | {anchor_ms} | {speedup} | {target_verdict(r, rows) or '-'} |")
    for r in rows:
        if r["task"] == "startup" and r["status"] == "ok":
            out += ["", f"First call in a fresh process ({r['model']}, {r['dtype']}, batch {r['batch']}): "
                        f"{r['first_call_s']:.1f} s with an empty Triton cache, {r['warm_first_call_s']:.1f} s "
                        f"with a filled one; targets: {startup_verdict(r, rows) or '-'}."]
    return "\n".join(out)


def readme_parts(readme: Path) -> tuple[str, str]:
    """The README's text before its measured block and after it; a ValueError unless both markers are there once,
    in order."""
    text = readme.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1 or text.index(README_START) > text.index(
            README_END):
        raise ValueError(f"{readme} needs a line {README_START} and, after it, a line {README_END}, once each, "
                         f"around the measured table")
    head, rest = text.split(README_START)
    return head, rest.split(README_END)[1]


def replace_readme_block(readme: Path, block: str) -> None:
    head, tail = readme_parts(readme)
    readme.write_text(f"{head}{README_START}\n{block}\n{README_END}{tail}")


def _system_order(system_dtype: tuple[str, str]) -> tuple:
    """The systems in SYSTEMS' order; one an older run measured and this version no longer has, after them."""
    system, dtype = system_dtype
    return (SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS), system, dtype)


def write_plot(rows: list[dict], path: Path) -> None:
    """images/s against batch, one line per (system, dtype), one panel per model; hollow markers are
    extrapolated."""
    from matplotlib.figure import Figure

    generate = [r for r in rows if r["task"] == "generate" and r["status"] == "ok"]
    models = sorted({r["model"] for r in generate}, key=list(MODELS).index) or ["(no results)"]
    fig = Figure(figsize=(6.5 * len(models), 5), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        lines = sorted({(r["system"], r["dtype"]) for r in generate if r["model"] == model},
                       key=_system_order)
        for system, dtype in lines:
            points = sorted((r["batch"], r["images_per_s"], r["extrapolated"]) for r in generate
                            if (r["model"], r["system"], r["dtype"]) == (model, system, dtype))
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{system} {dtype}",
                              linestyle="-" if system == ENGINE else "--")
            hollow = [p for p in points if p[2]]
            ax.plot([p[0] for p in hollow], [p[1] for p in hollow], "o", markerfacecolor="white",
                    color=line.get_color())
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in generate if r["model"] == model})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s (whole images, top_k=40)")
        ax.set_title(f"imagegpt-{model} (hollow: extrapolated from a window of steps)")
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"igpt-fast and anchors, {_card(rows)}")
    fig.savefig(path, dpi=120)


def report(rows: list[dict], out_dir: Path) -> str:
    """Write summary.txt and images_per_s.png; return the summary text."""
    text = summary(rows)
    (out_dir / "summary.txt").write_text(text + "\n")
    try:
        write_plot(rows, out_dir / "images_per_s.png")
    except ImportError:
        text += "\n(plot not written: matplotlib is not installed)"
    return text

