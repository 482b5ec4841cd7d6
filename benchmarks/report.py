"""Markdown tables of images/s and the ratios that matter, from ``pytest --benchmark-json`` output.

Usage::

    pytest benchmarks --benchmark-only --benchmark-json=RESULTS.json [--vdm-model vit-b16 ...]
    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out TABLE.md]

Every case is reported by the ``case`` key the suite writes into ``extra_info``; images/s is the
batch over the median time per call (``--stat min``: the fastest call, the better estimate of what
the hardware does when other work shares the machine). Several files measured on the same model,
batch, device and dtype are merged case by case, keeping each case's fastest run ("best of N"). Ratios are throughput ratios on the same model, batch, device
and dtype: explain / plain per runtime, the engine / the original two-pass method, the engine /
each other explainer. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CASES", "RATIOS", "STATS", "Result", "family_table", "latency_rows", "levels_paired_table", "load_results", "merge", "paired_ratio",
           "ratio_rows", "ratio_rows_paired", "render", "main"]

#: case key -> (what it is, runtime), in table order.
CASES = {
    "plain/torch": ("plain inference (HF ViT, SDPA)", "PyTorch"),
    "plain/onnxruntime": ("plain inference (plain ViT export)", "onnxruntime"),
    "explain/torch-reference": ("explain: engine, reference kernels", "PyTorch"),
    "explain/torch-triton": ("explain: engine, Triton kernels", "PyTorch"),
    "explain/onnxruntime": ("explain: engine, fused graph (OnnxExplainer)", "onnxruntime"),
    "explain/torch-levels4": ("explain with K=4 levels (patch_rank), probe width D/4", "PyTorch"),
    "explain/torch-levels4-p8": ("explain with K=4 levels (patch_rank), probe width D/8", "PyTorch"),
    "explain/torch-levels4-p16": ("explain with K=4 levels (patch_rank), probe width D/16", "PyTorch"),
    "original/two-pass": ("original Vision-DiffMask (hooks, two passes)", "PyTorch"),
    "baseline/rollout": ("attention rollout", "PyTorch"),
    "baseline/gradcam": ("Grad-CAM (last block)", "PyTorch"),
    "baseline/chefer": ("Chefer et al. relevance", "PyTorch"),
    "baseline/ig50": ("Integrated Gradients, 50 steps (captum)", "PyTorch"),
    "train/step": ("one gate-training step", "PyTorch"),
}
_LATENCY = "latency/"  # latency/{plain|explain}/{runtime}/b{batch}: p50/p90/p99 ms and peak bytes in extra_info
_PAIRED = "paired/round"  # one round of back-to-back calls; extra_info["paired_times"] = {case: [s, ...]}
# plain, single-level and K=4 explain back to back (test_levels_paired); extra_info: best_{wall,cpu}_ms,
# ratio_{wall,cpu} and flop_ratio, each {case: value}
_LEVELS_PAIRED = "paired/levels"
#: The time a K-level explain call may take over plain inference's (the issue's 1.15x).
LEVELS_TARGET = 1.15

_ENGINE = "engine"  # placeholder in RATIOS for each PyTorch engine case present
_ENGINES = ("explain/torch-reference", "explain/torch-triton")

#: (label, numerator, denominator, target or None); throughput ratios (images/s over images/s).
RATIOS = [
    ("explain / plain, PyTorch (reference kernels)", "explain/torch-reference", "plain/torch", 0.93),
    ("explain / plain, PyTorch (Triton kernels)", "explain/torch-triton", "plain/torch", 0.93),
    ("explain / plain, onnxruntime", "explain/onnxruntime", "plain/onnxruntime", 0.93),
    # K=4 levels within 1.15x plain inference's time: throughput ratio >= 1 / 1.15
    ("explain K=4 levels / plain, PyTorch (probes D/4)", "explain/torch-levels4", "plain/torch", 0.87),
    ("explain K=4 levels / plain, PyTorch (probes D/8)", "explain/torch-levels4-p8", "plain/torch", 0.87),
    ("explain K=4 levels / plain, PyTorch (probes D/16)", "explain/torch-levels4-p16", "plain/torch", 0.87),
    ("{engine} / original two-pass method", _ENGINE, "original/two-pass", 1.9),
    ("{engine} / attention rollout", _ENGINE, "baseline/rollout", None),
    ("{engine} / Grad-CAM", _ENGINE, "baseline/gradcam", 3.0),
    ("{engine} / Chefer et al.", _ENGINE, "baseline/chefer", 3.0),
    ("{engine} / Integrated Gradients (50 steps)", _ENGINE, "baseline/ig50", 100.0),
    ("training step / plain inference, PyTorch", "train/step", "plain/torch", None),
]

_ENGINE_NAMES = {"explain/torch-reference": "engine (reference)", "explain/torch-triton": "engine (Triton)"}


STATS = ("median", "min")


@dataclass(frozen=True)
class Result:
    """One measured case: seconds per call (median and fastest) and images/s from the chosen stat."""

    case: str
    name: str
    median_s: float
    min_s: float
    images_per_s: float
    rounds: int
    extra: dict
    runs: int = 1


def _config_key(extra: dict) -> tuple:
    return (extra.get("model"), extra.get("batch"), extra.get("device"), extra.get("device_name"), extra.get("dtype"))


def load_results(path: str | Path, stat: str = "median") -> tuple[dict, dict[tuple, dict[str, Result]]]:
    """Read a ``--benchmark-json`` file; images/s uses ``stat`` (``median`` or ``min``) seconds per call.

    Returns:
        (machine_info, {config key: {case: Result}}); the config key is (model, batch, device,
        device name, dtype). Benchmarks without a ``case`` in extra_info (kernel micro-benchmarks)
        are left out.

    Raises:
        ValueError: the file is not pytest-benchmark JSON, or holds no case of this suite.
    """
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); expected the file written by --benchmark-json") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} has no 'benchmarks' list; expected the file written by pytest --benchmark-json")
    configs: dict[tuple, dict[str, Result]] = {}
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info") or {}
        case, stats = extra.get("case"), bench.get("stats") or {}
        if not case or "median" not in stats or "min" not in stats or "batch" not in extra:
            continue
        seconds = float(stats[stat])
        ips = float(extra["batch"]) / seconds if seconds > 0 else float("inf")
        # latency cases of every batch size share one table per model, device and dtype
        key = _config_key(dict(extra, batch="latency") if case.startswith(_LATENCY) else extra)
        configs.setdefault(key, {})[case] = Result(
            case, bench.get("name", case), float(stats["median"]), float(stats["min"]), ips,
            int(stats.get("rounds", 0)), extra,
        )
    if not configs:
        raise ValueError(
            f"{path} holds no benchmark of this suite (none has extra_info['case']); "
            "run `pytest benchmarks --benchmark-only --benchmark-json=PATH`"
        )
    return data.get("machine_info") or {}, configs


def merge(runs: list[dict[tuple, dict[str, Result]]]) -> dict[tuple, dict[str, Result]]:
    """Merge runs on the same configurations case by case, keeping each case's highest images/s."""
    merged: dict[tuple, dict[str, Result]] = {}
    for configs in runs:
        for key, results in configs.items():
            into = merged.setdefault(key, {})
            for case, r in results.items():
                old = into.get(case)
                runs_n = (old.runs if old else 0) + 1
                best = r if old is None or r.images_per_s > old.images_per_s else old
                into[case] = Result(best.case, best.name, best.median_s, best.min_s, best.images_per_s,
                                    best.rounds, best.extra, runs_n)
    return merged


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def paired_ratio(results: dict[str, Result], num: str, den: str) -> float | None:
    """Median over paired rounds of time(den) / time(num), or None without paired times for both."""
    paired = results.get(_PAIRED)
    times = (paired.extra.get("paired_times") or {}) if paired else {}
    a, b = times.get(num), times.get(den)
    if not a or not b or len(a) != len(b):
        return None
    return _median([tb / ta for ta, tb in zip(a, b) if ta > 0])


def ratio_rows(results: dict[str, Result]) -> list[tuple[str, float | None, float | None]]:
    """(label, throughput ratio or None when a side is missing, target or None) for every ratio."""
    return [(label, value, target) for label, value, _, target in ratio_rows_paired(results)]


def ratio_rows_paired(results: dict[str, Result]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(label, ratio of the separate cases, median paired ratio, target) for every ratio; None = missing."""
    rows = []
    for label, num, den, target in RATIOS:
        if num == _ENGINE:
            nums = [e for e in _ENGINES if e in results] or [_ENGINES[0]]
        else:
            nums = [num]
        for n in nums:
            text = label.format(engine=_ENGINE_NAMES.get(n, n))
            a, b = results.get(n), results.get(den)
            value = a.images_per_s / b.images_per_s if a and b and b.images_per_s > 0 else None
            rows.append((text, value, paired_ratio(results, n, den), target))
    return rows


def latency_rows(results: dict[str, Result]) -> list[dict]:
    """One row per (runtime, batch) with plain and explain p50/p90/p99 ms and peak call bytes side by side."""
    rows: dict[tuple[str, int], dict] = {}
    for case, r in results.items():
        if not case.startswith(_LATENCY):
            continue
        _, mode, runtime, b = case.split("/")
        row = rows.setdefault((runtime, int(b.lstrip("b"))), {"runtime": runtime, "batch": int(b.lstrip("b"))})
        row[mode] = {k: r.extra.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "peak_call_bytes")}
        row[mode]["min_ms"] = r.min_s * 1e3
    return [rows[k] for k in sorted(rows)]


def _latency_table(results: dict[str, Result]) -> list[str]:
    rows = latency_rows(results)
    if not rows:
        return []

    def ms(d, k):
        v = (d or {}).get(k)
        return f"{v:.2f}" if isinstance(v, (int, float)) else ""

    def mib(d):
        v = (d or {}).get("peak_call_bytes")
        return f"{v / 2**20:.1f}" if isinstance(v, (int, float)) else ""

    out = ["", "Latency per call (ms; p50/p90/p99 over the timed calls; explain/plain are time ratios, lower is "
                "better; peak MiB one call allocates, PyTorch only):", "",
           "| runtime | batch | plain p50 | p90 | p99 | explain p50 | p90 | p99 | explain/plain p50 | "
           "explain/plain min | peak MiB plain | explain | explain/plain peak |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        p, e = row.get("plain"), row.get("explain")
        r50 = _ratio(e["p50_ms"] / p["p50_ms"]) if p and e and p.get("p50_ms") and e.get("p50_ms") else ""
        rmin = _ratio(e["min_ms"] / p["min_ms"]) if p and e and p.get("min_ms") else ""
        pb, eb = (p or {}).get("peak_call_bytes"), (e or {}).get("peak_call_bytes")
        rmem = _ratio(eb / pb) if pb and eb else ""
        out.append(f"| {row['runtime']} | {row['batch']} | {ms(p, 'p50_ms')} | {ms(p, 'p90_ms')} | {ms(p, 'p99_ms')} | "
                   f"{ms(e, 'p50_ms')} | {ms(e, 'p90_ms')} | {ms(e, 'p99_ms')} | {r50} | {rmin} | {mib(p)} | {mib(e)} | {rmem} |")
    return out


def levels_paired_table(results: dict[str, Result]) -> list[str]:
    """Markdown lines for ``test_levels_paired``: each case's best round and its time over plain inference's
    (wall, CPU) beside its FLOPs ratio; empty without that case."""
    r = results.get(_LEVELS_PAIRED)
    best = r.extra.get("best_wall_ms") if r is not None else None
    if not best or "plain/torch" not in best:
        return []
    rounds = r.extra.get("rounds_timed", r.rounds)
    out = ["", f"K-level explain beside plain inference, called back to back in each of {rounds} rounds (best round "
                f"of each; the K-level cases' target: time <= {LEVELS_TARGET:g}x plain):", "",
           "| case | ms (best round) | / plain (wall) | / plain (CPU) | FLOPs / plain | within target (wall) |",
           "|---|---:|---:|---:|---:|:---:|"]
    for case, ms in best.items():
        what = CASES.get(case, (case,))[0]
        wall, cpu = r.extra.get("ratio_wall", {}).get(case), r.extra.get("ratio_cpu", {}).get(case)
        flops = r.extra.get("flop_ratio", {}).get(case)
        met = "" if "levels" not in case or wall is None else ("yes" if wall <= LEVELS_TARGET else "**no**")
        out.append(f"| {what} | {ms:.2f} | {_num(wall)} | {_num(cpu)} | {_num(flops)} | {met} |")
    return out


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "–"


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _ratio(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}"


def _machine_lines(machine: dict) -> list[str]:
    vdm = machine.get("vdm") or {}
    cpu = vdm.get("cpu_model") or (machine.get("cpu") or {}).get("brand_raw") or machine.get("processor") or "?"
    parts = [f"CPU: {cpu}, {vdm.get('cpu_count', '?')} cores"]
    if vdm.get("gpu"):
        parts.append(f"GPU: {vdm['gpu']}")
    versions = ", ".join(f"{k} {vdm[k]}" for k in ("torch", "transformers", "onnxruntime") if vdm.get(k))
    if versions:
        parts.append(versions)
    if vdm.get("torch_threads"):
        parts.append(f"torch threads {vdm['torch_threads']}")
    if vdm.get("date_utc"):
        parts.append(f"run {vdm['date_utc']}")
    return ["; ".join(parts)]


def render(machine: dict, configs: dict[tuple, dict[str, Result]], title: str | None = None,
           stat: str = "median") -> str:
    """Markdown: a machine line, then per configuration a throughput table and a ratio table."""
    out = [f"## {title}", ""] if title else []
    out += _machine_lines(machine) + [""]
    for (model, batch, device, device_name, dtype), results in configs.items():
        runs = max(r.runs for r in results.values())
        note = f", best of {runs} runs" if runs > 1 else ""
        if all(c.startswith(_LATENCY) for c in results):
            out += [f"### {model}, {device} ({device_name}), {dtype}: latency", ""] + _latency_table(results)[1:] + [""]
            continue
        out += [f"### {model}, batch {batch}, {device} ({device_name}), {dtype}", "",
                f"images/s from the {stat} time per call{note}.", ""]
        out += ["| case | runtime | ms / batch (median) | ms / batch (min) | images/s | rounds | load (1 min) |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for case, (what, runtime) in CASES.items():
            r = results.get(case)
            if r is None:
                out.append(f"| {what} | {runtime} | not run | | | | |")
                continue
            load = r.extra.get("loadavg_1m")
            load_text = f"{load:.1f}" if isinstance(load, (int, float)) else ""
            out.append(
                f"| {what} | {runtime} | {r.median_s * 1e3:.1f} | {r.min_s * 1e3:.1f} | {_fmt(r.images_per_s)} "
                f"| {r.rounds} | {load_text} |"
            )
        paired = results.get(_PAIRED)
        rounds_note = f"{len(next(iter(paired.extra.get('paired_times', {}).values()), []))} " if paired else ""
        out += ["", f"| ratio (images/s over images/s) | separate cases | paired ({rounds_note}rounds, median) "
                    "| target | met (paired if measured) |", "|---|---:|---:|---:|:---:|"]
        for label, value, pvalue, target in ratio_rows_paired(results):
            if value is None and pvalue is None:
                continue
            t = f">= {target:g}" if target is not None else ""
            decisive = pvalue if pvalue is not None else value
            met = "" if target is None else ("yes" if decisive >= target else "**no**")
            out.append(f"| {label} | {_ratio(value)} | {_ratio(pvalue)} | {t} | {met} |")
        out += _latency_table(results) + levels_paired_table(results)
        others = sorted(c for c in set(results) - set(CASES) - {_PAIRED, _LEVELS_PAIRED} if not c.startswith(_LATENCY))
        if others:
            out += ["", "Other cases in the file (micro-benchmarks; ms per call):", "",
                    "| case | ms (median) | ms (min) | rounds |", "|---|---:|---:|---:|"]
            out += [f"| {c} | {results[c].median_s * 1e3:.3f} | {results[c].min_s * 1e3:.3f} | {results[c].rounds} |"
                    for c in others]
        out.append("")
    out += family_table(configs)
    return "\n".join(out).rstrip() + "\n"


#: The explain / plain ratios compared across model families (label, numerator, denominator).
_FAMILY_RATIOS = (
    ("PyTorch (reference kernels)", "explain/torch-reference", "plain/torch"),
    ("PyTorch (Triton kernels)", "explain/torch-triton", "plain/torch"),
    ("onnxruntime", "explain/onnxruntime", "plain/onnxruntime"),
)


def family_table(configs: dict[tuple, dict[str, Result]]) -> list[str]:
    """Markdown lines: explain / plain per model family (``extra_info['family']``), one row per
    configuration that names its family; empty when none does."""
    rows = []
    for (model, batch, device, _, dtype), results in configs.items():
        family = next((r.extra.get("family") for r in results.values() if r.extra.get("family")), None)
        if family is None:
            continue
        cells = []
        for _, num, den in _FAMILY_RATIOS:
            n, d = results.get(num), results.get(den)
            cells.append(_ratio(n.images_per_s / d.images_per_s) if n and d and d.images_per_s > 0 else "")
        rows.append(f"| {family} | {model} | {batch} | {device} | {dtype} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = " | ".join(label for label, _, _ in _FAMILY_RATIOS)
    return ["### explain / plain per model family (images/s over images/s)", "",
            f"| family | model | batch | device | dtype | {head} |",
            "|---|---|---:|---|---|" + "---:|" * len(_FAMILY_RATIOS)] + rows + [""]


def main(argv=None) -> int:
    """``python -m benchmarks.report RESULTS.json [...] [--out FILE] [--title TEXT]``; exit 2 on bad input."""
    from vdm_engine._io import atomic_write_bytes
    from vdm_engine.cli._common import UsageError, run_cli

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by pytest --benchmark-json")
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--title", help="a heading for the report")
    parser.add_argument("--stat", choices=STATS, default="median",
                        help="seconds per call behind images/s: median (default) or min (fastest call)")
    args = parser.parse_args(argv)

    def body() -> int:
        runs, machine = [], {}
        for path in args.results:
            if not Path(path).is_file():
                raise UsageError(f"{path} does not exist; pass the file written by --benchmark-json")
            m, configs = load_results(path, args.stat)
            machine = machine or m
            runs.append(configs)
        text = render(machine, merge(runs), args.title, args.stat)
        if args.out:
            atomic_write_bytes(Path(args.out), text.encode())
        else:
            sys.stdout.write(text)
        return 0

    return run_cli("benchmarks.report", body)


if __name__ == "__main__":
    sys.exit(main())
