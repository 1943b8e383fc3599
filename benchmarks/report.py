"""Renders the README's results tables from ``benchmarks/results/*.jsonl``.

For every (op, device) the newest full run is shown (a --quick run only where
no full run exists). The tables replace the text between the markers
``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md.

    python benchmarks/report.py [--print]
"""

import argparse
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load(results_dir=RESULTS):
    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def latest_runs(records):
    """{(op, device): records of the newest run}. A run's records share the
    date stamped when it started."""
    by_key = {}
    for r in records:
        by_key.setdefault((r["op"], r["device"]), []).append(r)
    out = {}
    for key, rs in by_key.items():
        full = [r for r in rs if not r.get("quick")] or rs
        newest = max(r["date"] for r in full)
        out[key] = [r for r in full if r["date"] == newest]
    return out


def _ms(v):
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def table(rs):
    unit = "GB/s" if any("gbps" in r for r in rs) else "TFLOP/s"
    key = "gbps" if unit == "GB/s" else "tflops"
    case_of = (lambda r: r.get("shape", r["model"])) if key == "tflops" else (lambda r: r["model"])
    providers = list(dict.fromkeys(r["provider"] for r in rs))
    cases = list(dict.fromkeys((case_of(r), r["dtype"]) for r in rs))
    head = ["case", "dtype", *[f"{p} (ms)" for p in providers],
            f"sslfast {unit}", "% of peak", "vs reference", "vs best other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, dtype in cases:
        row = {r["provider"]: r for r in rs if case_of(r) == case and r["dtype"] == dtype}
        ours = row.get("sslfast")
        cells = [case, dtype.replace("<", "&lt;")]
        cells += [_cell(row[p]) if p in row else "-" for p in providers]
        if ours and "median_ms" in ours:
            fig = ours[key]
            cells += [f"{fig:.0f}" if fig >= 10 else f"{fig:.2g}", f"{ours['pct_of_peak']:.0f}%",
                      _x(ours.get("speedup_vs_reference")), _x(ours.get("speedup_vs_best_other"))]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(r):
    if r.get("oom"):
        return "OOM"
    return _ms(r["median_ms"]) if "median_ms" in r else "failed"


def _x(v):
    return f"{v:.2f}x" if v is not None else "-"


def _ceiling_text(r):
    if "ceiling_gbps" in r:
        return f"peak memory bandwidth measured in the run {r['ceiling_gbps']:.0f} GB/s"
    return f"matmul rate measured in the run {r['ceiling_tflops']:.2g} TFLOP/s"


def render(records):
    parts = []
    for (op, device), rs in sorted(latest_runs(records).items()):
        r0 = rs[0]
        quick = " (quick run)" if r0.get("quick") else ""
        parts.append(
            f"**{op}** on {device}{quick}: torch {r0['torch']}, commit `{r0['commit']}`, "
            f"{r0['date']}; {_ceiling_text(r0)}.\n\n{table(rs)}\n"
        )
    if not parts:
        return "No results yet: run `make bench`.\n"
    return "\n".join(parts)


def update_readme(text, readme=os.path.join(ROOT, "README.md")):
    with open(readme) as f:
        content = f.read()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                 lambda _: f"{BEGIN}\n{text}{END}", content, flags=re.S)
    with open(readme, "w") as f:
        f.write(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print", action="store_true", help="print instead of updating README.md")
    a = p.parse_args(argv)
    text = render(load())
    if a.print:
        print(text)
    else:
        update_readme(text)
        print("README.md results updated")


if __name__ == "__main__":
    main()
