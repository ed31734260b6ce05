"""The results table (Markdown) and chart (PNG) made from a results JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.tools import OURS, PEERS

COLORS = {
    "s3mount": "#1f77b4",
    "s3mount-wb": "#6baed6",
    "s3fs": "#d62728",
    "rclone": "#2ca02c",
    "raw": "#7f7f7f",
}


def _tools(data: dict[str, Any]) -> list[str]:
    return [t for t, v in data["tools"].items() if v.get("results")]


def best_peer(data: dict[str, Any], workload: str) -> tuple[str, float] | None:
    """The fastest peer (s3fs, rclone) that measured ``workload`` without error."""
    best: tuple[str, float] | None = None
    for t in PEERS:
        r = data["tools"].get(t, {}).get("results", {}).get(workload)
        if r and r.get("seconds") is not None and (best is None or r["seconds"] < best[1]):
            best = (t, r["seconds"])
    return best


def _cell(r: dict[str, Any] | None, unit: str) -> str:
    if not r:
        return "—"
    if r.get("error"):
        return "error"
    s = f"{r['seconds']:.2f} s"
    if r.get("close_seconds") is not None and abs(r["close_seconds"] - r["seconds"]) > 0.005:
        s += f" (close {r['close_seconds']:.2f})"
    s += f" · {r['rate']:,.1f} {unit}"
    if r.get("rounds"):
        s += f" · {len(r['rounds'])} rounds {min(r['rounds']):.2f}–{max(r['rounds']):.2f} s"
    return s


def table(data: dict[str, Any]) -> str:
    """A Markdown table: one row per workload, one column per tool, plus the ratios."""
    tools = _tools(data)
    ours = [t for t in tools if t in OURS]
    head = ["workload", *tools] + [f"{t} ÷ best peer" for t in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, w in data["workloads"].items():
        row = [name]
        for t in tools:
            row.append(_cell(data["tools"][t]["results"].get(name), w["unit"]))
        best = best_peer(data, name)
        for t in ours:
            r = data["tools"][t]["results"].get(name)
            if best is None or not r or r.get("seconds") is None or best[1] <= 0:
                row.append("—")
            else:
                row.append(f"{r['seconds'] / best[1]:.2f}× ({best[0]})")
        lines.append("| " + " | ".join(row) + " |")
    rss = ["peak RSS of the daemon"]
    for t in tools:
        kib = data["tools"][t].get("peak_rss_kib")
        rss.append(f"{kib / 1024:.0f} MiB" if kib else "—")
    rss += ["—"] * len(ours)
    lines.append("| " + " | ".join(rss) + " |")
    lines.append("")
    lines.append(
        "Seconds: until the data is in S3 for writes (until the program returned in "
        "parentheses, when different); with several rounds, the median round (and the "
        "range of all); ratio < 1 means faster than the best peer."
    )
    return "\n".join(lines) + "\n"


def _requests_cell(r: dict[str, Any] | None) -> str:
    counts = (r or {}).get("server_requests")
    if counts is None:
        return "—"
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return " · ".join(f"{n:,} {op}" for op, n in ordered) or "none"


def requests_table(data: dict[str, Any]) -> str:
    """What each tool sent during each workload, as the S3 server counted it."""
    tools = _tools(data)
    lines = ["| workload | " + " | ".join(tools) + " |", "|" + "---|" * (len(tools) + 1)]
    for name in data["workloads"]:
        cells = [_requests_cell(data["tools"][t]["results"].get(name)) for t in tools]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "S3 requests the server answered while each workload ran (the median round), by "
        "operation; the harness's own set-up and checks are not counted."
    )
    return "\n".join(lines) + "\n"


def document(data: dict[str, Any]) -> str:
    """``results.md``: the times, then the requests (when the run counted them)."""
    counted = any(
        "server_requests" in r for v in data["tools"].values() for r in v["results"].values()
    )
    text = table(data) + ("\n" + requests_table(data) if counted else "")
    done, wanted = data["meta"].get("rounds_done", {}), data["meta"].get("rounds", 1)
    if any(n < wanted for n in done.values()):
        rounds = ", ".join(f"{t} {n}" for t, n in done.items())
        text = f"**Incomplete run** (rounds done of {wanted}: {rounds}).\n\n" + text
    return text


def chart(data: dict[str, Any], path: Path) -> bool:
    """Draw one bar panel per workload (seconds per tool); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e .[bench])", file=sys.stderr)
        return False
    tools = _tools(data)
    panels = list(data["workloads"]) + ["peak_rss"]
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels, strict=False):
        values = []
        for t in tools:
            if name == "peak_rss":
                kib = data["tools"][t].get("peak_rss_kib")
                values.append(kib / 1024 if kib else 0.0)
            else:
                r = data["tools"][t]["results"].get(name) or {}
                values.append(r.get("seconds") or 0.0)
        ypos = range(len(tools))
        ax.barh(list(ypos), values, color=[COLORS.get(t, "#999999") for t in tools])
        ax.set_yticks(list(ypos), tools, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name + (" (MiB)" if name == "peak_rss" else " (s, lower is better)"),
                     fontsize=9)  # fmt: skip
        ax.tick_params(axis="x", labelsize=7)
        for y, v in zip(ypos, values, strict=True):
            if v:
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
        ax.margins(x=0.25)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    meta = data["meta"]
    fig.suptitle(
        f"s3mount benchmark — scale {meta['scale']}, RTT {meta['rtt_ms']:g} ms, "
        f"{meta['machine']['nproc']} cores, moto {meta['versions'].get('moto', '?')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report results.json``: print the tables (and redraw the chart)."""
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0])
    data = json.loads(path.read_text())
    print(document(data))
    chart(data, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
