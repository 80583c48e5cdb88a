"""Markdown table and PNG plot of one results file."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

BASELINES = ("torch", "torch.compile")


def _by_case(rows):
    cases = OrderedDict()
    for r in rows:
        cases.setdefault((r["suite"], r["case"]), {})[r["impl"]] = r
    return cases


def markdown(result: dict) -> str:
    m = result["meta"]
    copy = m["copy_GBps"]
    lines = [
        f"GPU: {m['gpu']} (driver {m.get('driver', '?')}), torch {m['torch']}, CUDA {m['cuda']}, {m['date']}.",
        f"Ceilings measured in the same run: copy {copy / 1000:.2f} TB/s, bf16 matmul {m['matmul_bf16_TFLOPs']:.0f} TFLOP/s.",
        "",
        "| suite | case | fusedkernels µs | GB/s | % of copy | torch µs | torch.compile µs | vs torch | vs torch.compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (suite, case), impls in _by_case(result["rows"]).items():
        ours = impls.get("fusedkernels")
        if ours is None:
            continue
        cells = [suite, case, f"{ours['ms'] * 1e3:.1f}", f"{ours.get('GBps', 0):.0f}", f"{100 * ours.get('GBps', 0) / copy:.0f}%"]
        cells += [f"{impls[b]['ms'] * 1e3:.1f}" if b in impls else "—" for b in BASELINES]
        cells += [f"{impls[b]['ms'] / ours['ms']:.2f}×" if b in impls else "—" for b in BASELINES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = [(k, v) for k, v in _by_case(result["rows"]).items() if all("GBps" in r for r in v.values())]
    if not cases:
        return False
    impls = ["fusedkernels", *BASELINES]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cases)), 4.5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + (j - 1) * width for i in range(len(cases))]
        ax.bar(xs, [v.get(impl, {}).get("GBps", 0) / 1000 for _, v in cases], width, label=impl)
    copy = result["meta"]["copy_GBps"] / 1000
    ax.axhline(copy, color="k", linestyle="--", linewidth=1, label=f"device copy {copy:.2f} TB/s")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([k[1].replace(" bf16", "") for k, _ in cases], rotation=35, ha="right", fontsize=8)
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
