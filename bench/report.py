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


def _baselines(rows, suite):
    seen = []
    for r in rows:
        if r["suite"] == suite and r["impl"] != "fusedkernels" and r["impl"] not in seen:
            seen.append(r["impl"])
    return seen


def markdown(result: dict) -> str:
    m = result["meta"]
    copy = m["copy_GBps"]
    lines = [
        f"GPU: {m['gpu']} (driver {m.get('driver', '?')}), torch {m['torch']}, CUDA {m['cuda']}, {m['date']}.",
        f"Ceilings measured in the same run: copy {copy / 1000:.2f} TB/s, bf16 matmul {m['matmul_bf16_TFLOPs']:.0f} TFLOP/s.",
    ]
    cases = _by_case(result["rows"])
    for suite in OrderedDict.fromkeys(r["suite"] for r in result["rows"]):
        base = _baselines(result["rows"], suite)
        bandwidth = any("GBps" in r for r in result["rows"] if r["suite"] == suite)  # not for host times
        lines += ["", f"### {suite}", "",
                  "| case | fusedkernels | " + ("GB/s | % of copy | " if bandwidth else "") + " | ".join(base) + " | "
                  + " | ".join(f"vs {b}" for b in base) + " |",
                  "|---" * (2 + 2 * bandwidth + 2 * len(base)) + "|"]
        for (s, case), impls in cases.items():
            if s != suite:
                continue
            ours = impls.get("fusedkernels")
            cells = [case]
            if ours is None:
                cells += ["—", "—", "—"] if bandwidth else ["—"]
            elif bandwidth:
                cells += [_ms(ours["ms"]), f"{ours.get('GBps', 0):.0f}", f"{100 * ours.get('GBps', 0) / copy:.0f}%"]
            else:
                cells.append(_ms(ours["ms"]))
            cells += [_ms(impls[b]["ms"]) + (f" ({impls[b]['GBps']:.0f} GB/s)" if ours is None and bandwidth else "")
                      if b in impls else "—" for b in base]
            cells += [f"{impls[b]['ms'] / ours['ms']:.2f}×" if (b in impls and ours) else "—" for b in base]
            lines.append("| " + " | ".join(cells) + " |")
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
