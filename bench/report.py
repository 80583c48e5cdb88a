"""Markdown table and PNG plot of one results file."""

from __future__ import annotations

import json
import os
from collections import OrderedDict



def _by_case(rows):
    cases = OrderedDict()
    for r in rows:
        cases.setdefault((r["suite"], r["case"]), {})[r["impl"]] = r
    return cases


# Implementations a TFLOP/s suite's ours is compared against in its ratio columns, where a table has them.
REFERENCES = {"attention": ("torch-sdpa-flash", "torch-sdpa-cudnn", "fusedkernels-nobias"),
              "gemm": ("torch", "torch-cublaslt", "torch-stacked")}
RATIO_HEADS = {"fusedkernels-nobias": "speed with bias / without"}
SHORT = {"torch-sdpa-flash": "flash", "torch-sdpa-cudnn": "cuDNN", "torch-sdpa-efficient": "efficient",
         "torch-flex": "flex", "torch-eager": "eager", "fusedkernels-nobias": "ours, no bias",
         "fusedkernels-sm90": "ours, plain Hopper fwd",
         "torch-cublaslt": "cuBLASLt", "torch-matmul": "matmul only", "torch-stacked": "eager, stacked W"}


def _flops_tables(suite: str, rows: list, meta: dict) -> list[str]:
    """Suites timed in TFLOP/s (attention): one table per group of cases that share a set of impls (extra
    `group`), a row per case (fwd and fwd+bwd next to each other), each impl's TFLOP/s and time, ours' fraction
    of the matmul ceiling, ours' layout, and ours against the references; then extra peak memory, and why a
    row has no time."""
    ceiling = meta.get("matmul_bf16_TFLOPs")
    lines, notes = [], {}  # (impl, why) -> [cases]
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(r.get("group", ""), []).append(r)
    for group, grows in groups.items():
        if not any("TFLOPs" in r or "skipped" in r for r in grows):  # a group timed in bandwidth (BatchNorm)
            lines += ["", f"{group} cases (time, bandwidth by the minimum traffic):", ""]
            lines += _time_table(grows, meta["copy_GBps"])
            continue
        cases = _by_case(grows)
        impls = list(OrderedDict.fromkeys(r["impl"] for r in grows))
        others = [i for i in impls if i != "fusedkernels"]
        refs = [b for b in REFERENCES.get(suite, ()) if b in impls]
        layouts = any("layout" in r for r in grows)  # ours offers more than one entry point (attention)
        if len(groups) > 1:
            lines += ["", f"{group} cases:"]
        lines += ["",
                  "| case | fusedkernels | % of matmul | " + " | ".join(SHORT.get(i, i) for i in others) + " | "
                  + " | ".join(RATIO_HEADS.get(b, f"vs {SHORT.get(b, b)}") for b in refs)
                  + (" | ours' layout |" if layouts else " |"),
                  "|---" * (3 + len(others) + len(refs) + layouts) + "|"]
        for (_, case), by_impl in cases.items():
            ours = by_impl.get("fusedkernels")
            timed = ours if ours is not None and "ms" in ours else None
            cells = [case, _flops_cell(ours, notes, case)]
            cells.append(f"{ours['pct_matmul']:.0f}%" if timed is not None and "pct_matmul" in timed else "—")
            cells += [_flops_cell(by_impl.get(i), notes, case) for i in others]
            for b in refs:
                ref = by_impl.get(b)
                ok = timed is not None and ref is not None and "ms" in ref
                cells.append(f"{ref['ms'] / timed['ms']:.2f}×" if ok else "—")
            if layouts:
                cells.append(timed.get("layout", "").split(" ")[0] if timed is not None else "—")
            lines.append("| " + " | ".join(cells) + " |")
    peaks = [(case, by_impl) for (s, case), by_impl in _by_case(rows).items()
             if any("peak_MiB" in r for r in by_impl.values())]
    if peaks:
        cols = list(OrderedDict.fromkeys(i for _, by_impl in peaks for i, r in by_impl.items() if "peak_MiB" in r))
        lines += ["", "Extra peak memory of one call (max allocated minus the inputs), MiB:", "",
                  "| case | " + " | ".join(SHORT.get(i, i) for i in cols) + " |", "|---" * (1 + len(cols)) + "|"]
        for case, by_impl in peaks:
            cells = [f"{by_impl[i]['peak_MiB']:.0f}" if "peak_MiB" in by_impl.get(i, {}) else "—" for i in cols]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    head = [f"Cells: TFLOP/s (time). % of matmul: ours against the bf16 matmul measured in this run"
            + (f" ({ceiling:.0f} TFLOP/s)" if ceiling else "") + "; `vs X`: X's time over ours (above 1: ours is"
            " faster)."]
    if notes:
        lines += ["", "Not timed:", ""]
        for i, ((impl, why), where) in enumerate(notes.items()):
            lines.append(f"{i + 1}. {impl}: {why} ({where[0] if len(where) == 1 else f'{len(where)} cases'})")
    return head + lines


def _flops_cell(r, notes: dict, case: str) -> str:
    if r is None:
        return "—"
    if "ms" not in r:
        key = (r["impl"], r.get("skipped", "no time"))
        notes.setdefault(key, []).append(case)
        return f"skipped ({list(notes).index(key) + 1})"
    return f"{r.get('TFLOPs', 0):.0f} ({_ms(r['ms'])})"


def _time_table(rows: list, copy: float) -> list[str]:
    """Cases timed in µs (with GB/s where the rows have them; host times have not): ours' time, bandwidth and
    fraction of the copy ceiling, each baseline's time, and the baselines' time over ours."""
    base = list(OrderedDict.fromkeys(r["impl"] for r in rows if r["impl"] != "fusedkernels"))
    bandwidth = any("GBps" in r for r in rows)
    lines = ["| case | fusedkernels | " + ("GB/s | % of copy | " if bandwidth else "") + " | ".join(base) + " | "
             + " | ".join(f"vs {b}" for b in base) + " |",
             "|---" * (2 + 2 * bandwidth + 2 * len(base)) + "|"]
    for (_, case), impls in _by_case(rows).items():
        ours = impls.get("fusedkernels")
        cells = [case]
        if ours is None:
            cells += ["—", "—", "—"] if bandwidth else ["—"]
        elif bandwidth:
            cells += [_ms(ours["ms"]), f"{ours.get('GBps', 0):.0f}", f"{100 * ours.get('GBps', 0) / copy:.0f}%"]
        else:
            cells.append(_ms(ours["ms"]))
        if ours is not None and "peak_MiB" in ours:  # suites that measure memory: time (peak)
            cells[-1] += f" ({ours['peak_MiB']:.0f} MiB)"
        cells += [_ms(impls[b]["ms"]) + (f" ({impls[b]['GBps']:.0f} GB/s)" if ours is None and bandwidth else "")
                  + (f" ({impls[b]['peak_MiB']:.0f} MiB)" if "peak_MiB" in impls[b] else "")
                  if b in impls else "—" for b in base]
        cells += [f"{impls[b]['ms'] / ours['ms']:.2f}×" if (b in impls and ours) else "—" for b in base]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    m = result["meta"]
    copy = m["copy_GBps"]
    lines = [
        f"GPU: {m['gpu']} (driver {m.get('driver', '?')}), torch {m['torch']}, CUDA {m['cuda']}, {m['date']}.",
        f"Ceilings measured in the same run: copy {copy / 1000:.2f} TB/s, bf16 matmul {m['matmul_bf16_TFLOPs']:.0f} TFLOP/s.",
    ]
    cases = _by_case(result["rows"])
    for suite in OrderedDict.fromkeys(r["suite"] for r in result["rows"]):
        suite_rows = [r for r in result["rows"] if r["suite"] == suite]
        if any("TFLOPs" in r or "skipped" in r for r in suite_rows):
            lines += ["", f"### {suite}", ""] + _flops_tables(suite, suite_rows, m)
            continue
        lines += ["", f"### {suite}", ""] + _time_table(suite_rows, copy)
    return "\n".join(lines) + "\n"


def _ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.2f} ms"


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = [(k, v) for k, v in _by_case(result["rows"]).items() if all("GBps" in r for r in v.values())]
    impls = list(OrderedDict.fromkeys(r["impl"] for (s, _), v in cases for r in v.values()))
    if not cases:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(cases)), 5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, [v.get(impl, {}).get("GBps", 0) / 1000 for _, v in cases], width, label=impl)
    copy = result["meta"]["copy_GBps"] / 1000
    ax.axhline(copy, color="k", linestyle="--", linewidth=1, label=f"device copy {copy:.2f} TB/s")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([k[1] for k, _ in cases], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("TB/s (minimum traffic)")
    ax.set_title(f"{result['meta']['gpu']}: memory-bound suites")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(json_path: str) -> list[str]:
    with open(json_path) as f:
        result = json.load(f)
    base = os.path.splitext(json_path)[0]
    with open(base + ".md", "w") as f:
        f.write(markdown(result))
    written = [json_path, base + ".md"]
    if plot(result, base + ".png"):
        written.append(base + ".png")
    return written
