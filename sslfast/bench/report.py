"""Renders the results in ``benchmarks/results/*.jsonl``: ``benchmarks/REPORT.md``
with PNG plots, and the results table of the README.

    python -m sslfast.bench.report [--results DIR] [--out REPORT.md] [--no-readme] [--print]
                                   [--add PATH ...]

``--add`` first appends the result lines of other JSON-lines files or folders (a
GPU run's ``gpu_run.sh OUTDIR/results``) to the results, each line to the file
of its op, a line already there not again; lines that name no commit are refused.

REPORT.md, grouped by device: for every op the newest full run (a --quick run
only where no full run exists) as a table of every provider and case, plots of
time and peak memory against batch size (log scales, one line per provider,
out-of-memory and failed points marked), and the list of every run on record.
The README's table (between ``<!-- results:begin -->`` and
``<!-- results:end -->``) shows the same newest runs, sslfast's columns only.
"""

import argparse
import glob
import json
import os
import re

from sslfast.bench import harness

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# What a plot's x axis is for each op, and what else makes one line series.
X_AXIS = {"contrastive": ("rows", "rows per view N"), "queue": ("rows", "queries N"),
          "ema": ("numel", "elements"), "augment": ("rows", "images B"),
          "pretrain": ("rows", "images B")}
GROUP_BY = {"contrastive": ("model", "dim", "queue", "dtype"), "queue": ("queue", "dim", "dtype"),
            "ema": ("dtype",), "augment": ("model",), "pretrain": ("model",)}


def load(results_dir=None):
    records = []
    results_dir = results_dir or harness.RESULTS
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def add(paths, results_dir=None):
    """Appends the records of ``paths`` (JSON-lines files, or folders of them) to
    ``<results>/<op>.jsonl``, skipping lines already there; returns {op: added}.
    Raises ValueError, before writing anything, for a line without a commit."""
    results_dir = results_dir or harness.RESULTS
    files = []
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"{p}: no such file or folder")
        files += sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
    if not files:
        raise ValueError(f"no JSON-lines files in {', '.join(paths)}")
    new = {}
    for path in files:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                if not r.get("commit"):
                    raise ValueError(f"{path}:{n} names no commit (set SSLFAST_COMMIT where the "
                                     f"run has no git): nothing added")
                new.setdefault(r["op"], {}).setdefault(harness.record_line(r), r)
    added = {}
    for op, records in new.items():
        path = os.path.join(results_dir, f"{op}.jsonl")
        have = set()
        if os.path.exists(path):
            with open(path) as f:
                have = {line.rstrip("\n") for line in f}
        fresh = [r for line, r in records.items() if line not in have]
        harness.write_records(op, fresh, results_dir)
        added[op] = len(fresh)
    return added


def latest_runs(records):
    """{(op, device): records of the newest run}. A run's records share the
    date stamped when it started. Runs of the newest run's commit are merged
    (a sweep split over several calls, e.g. by --cases), the newest record of
    each (case, dtype, provider) kept; only for a clean commit (not None, not
    "-dirty": other code may have run under those)."""
    by_key = {}
    for r in records:
        by_key.setdefault((r["op"], r["device"]), []).append(r)
    out = {}
    for key, rs in by_key.items():
        full = [r for r in rs if not r.get("quick")] or rs
        newest = max(full, key=lambda r: r["date"])
        commit = newest.get("commit")
        if commit and not commit.endswith("-dirty"):
            same = [r for r in full if r.get("commit") == commit]
        else:
            same = [r for r in full if r["date"] == newest["date"]]
        pick = {}
        for r in same:
            k = _case_key(r)
            if k not in pick or r["date"] > pick[k]["date"]:
                pick[k] = r
        out[key] = [r for r in same if pick[_case_key(r)] is r]
    return out


def _case_key(r):
    # a pretrain_embedded line (tools/pretrain_acceptance.py) names no provider
    return r.get("model"), r.get("shape"), r.get("dtype"), r.get("provider")


def _dates(rs):
    """The run date, or the dates of the merged runs."""
    return ", ".join(sorted({r["date"] for r in rs}))


def _ms(v):
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _figure(rs):
    """(unit, record key) of the figure a run reports."""
    if any("views_per_s" in r for r in rs):
        return "views/s", "views_per_s"
    if any("images_per_s" in r for r in rs):
        return "images/s", "images_per_s"
    return ("GB/s", "gbps") if any("gbps" in r for r in rs) else ("TFLOP/s", "tflops")


def table(rs):
    unit, key = _figure(rs)
    case_of = (lambda r: r["model"]) if key == "gbps" else (lambda r: r.get("shape", r["model"]))
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


PRETRAIN_RUN = "pretrain_embedded"  # tools/pretrain_acceptance.py: one line per run


def _pretrain_run_text(r):
    return (f"**{r['op']}** on {r['device']}: torch {r['torch']}, commit `{r['commit']}`, "
            f"{r['date']}: `python -m sslfast.pretrain {' '.join(r['args'])}` "
            f"(`tools/pretrain_acceptance.py`) ran {r['steps']} steps "
            f"({r['images_per_s']:.0f} images/s) in {r['wall_seconds']:.0f} s end to end; kNN "
            f"accuracy (k = {r['knn_k']}) {100 * r['knn_accuracy']:.1f} % against "
            f"{100 * r['random_init_knn_accuracy']:.1f} % for the same backbone at random "
            f"init.\n")


def render(records):
    parts = []
    for (op, device), rs in sorted(latest_runs(records).items()):
        r0 = rs[0]
        if op == PRETRAIN_RUN:
            parts.append(_pretrain_run_text(r0))
            continue
        quick = " (quick run)" if r0.get("quick") else ""
        parts.append(
            f"**{op}** on {device}{quick}: torch {r0['torch']}, commit `{r0['commit']}`, "
            f"{_dates(rs)}; {_ceiling_text(r0)}.\n\n{table(rs)}\n"
        )
    if not parts:
        return "No results yet: run `make bench`.\n"
    return "\n".join(parts)


def update_readme(text, readme=None):
    readme = readme or os.path.join(harness.ROOT, "README.md")
    with open(readme) as f:
        content = f.read()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                 lambda _: f"{BEGIN}\n{text}{END}", content, flags=re.S)
    with open(readme, "w") as f:
        f.write(new)


# ---- REPORT.md and plots ------------------------------------------------------------------


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()[:60]


def _bytes(v):
    if v is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f} B"


def full_table(rs):
    """Every provider of every case of one run."""
    unit, key = _figure(rs)
    head = ["case", "dtype", "provider", "median ms", "p20–p80 ms", "peak memory", unit,
            "% of peak", "vs reference", "vs best other"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rs:
        if "median_ms" in r:
            cells = [_ms(r["median_ms"]), f"{_ms(r['p20_ms'])}–{_ms(r['p80_ms'])}",
                     _bytes(r.get("peak_mem_bytes")), f"{r[key]:.3g}",
                     f"{r['pct_of_peak']:.0f}%", _x(r.get("speedup_vs_reference")),
                     _x(r.get("speedup_vs_best_other"))]
        else:
            cells = ["OOM" if r.get("oom") else "failed"] + ["-"] * 6
        case = r.get("shape", r["model"])
        lines.append("| " + " | ".join([case, r["dtype"].replace("<", "&lt;"), r["provider"],
                                         *cells]) + " |")
    return "\n".join(lines)


def _series(rs, op):
    """{group label: {provider: [(x, record)]}} for one run's plots."""
    x_key = X_AXIS.get(op, ("rows", ""))[0]
    groups = {}
    for r in rs:
        if x_key not in r:
            continue
        label = ", ".join(f"{k}={r[k]}" for k in GROUP_BY.get(op, ("dtype",)) if k in r)
        groups.setdefault(label, {}).setdefault(r["provider"], []).append((r[x_key], r))
    return groups


def plot_run(rs, op, device, plots_dir):
    """PNG files (time and peak memory against the batch size) for one run; []
    without matplotlib or without a series of at least two sizes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    x_key, x_label = X_AXIS.get(op, ("rows", "rows"))
    paths = []
    for label, by_provider in _series(rs, op).items():
        if max(len({x for x, _ in pts}) for pts in by_provider.values()) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, y_key, y_label in ((axes[0], "median_ms", "median time (ms)"),
                                   (axes[1], "peak_mem_bytes", "peak memory (bytes)")):
            top = max((r.get(y_key) or 0 for pts in by_provider.values() for _, r in pts),
                      default=1) or 1
            for provider, pts in by_provider.items():
                pts = sorted(pts, key=lambda p: p[0])
                ok = [(x, r[y_key]) for x, r in pts if r.get(y_key)]
                if ok:
                    line, = ax.plot(*zip(*ok), marker="o", label=provider)
                    color = line.get_color()
                else:
                    color = None
                for x, r in pts:
                    if "median_ms" not in r:  # out of memory or failed: marked at the top
                        ax.plot([x], [top * 2], marker="x", markersize=10, color=color,
                                linestyle="none")
                        ax.annotate("OOM" if r.get("oom") else "failed", (x, top * 2),
                                    textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(x_label if x_key != "rows" else f"batch size ({x_label})")
            ax.set_ylabel(y_label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{op} on {device}: {label}", fontsize=10)
        fig.tight_layout()
        os.makedirs(plots_dir, exist_ok=True)
        path = os.path.join(plots_dir, f"{_slug(device)}_{op}_{_slug(label)}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def render_report(records, report_path, plots_dir=None):
    """The text of REPORT.md (plots written to plots_dir, linked relative to it)."""
    plots_dir = plots_dir or os.path.join(os.path.dirname(report_path), "plots")
    lines = ["# sslfast benchmark report", "",
             "Generated by `python -m sslfast.bench.report` from every JSON line in "
             "`benchmarks/results/`; do not edit. Per device and op: the newest full run "
             "(a quick run only where no full run exists), its plots, and every run on record.",
             ""]
    if not records:
        return "\n".join(lines + ["No results yet: run `python -m sslfast.bench`.", ""])
    latest = latest_runs(records)
    for device in sorted({r["device"] for r in records}):
        lines += [f"## {device}", ""]
        for op in sorted({r["op"] for r in records if r["device"] == device}):
            rs = latest[(op, device)]
            r0 = rs[0]
            if op == PRETRAIN_RUN:
                lines += [f"### {op}", ""]
                lines += [_pretrain_run_text(r) for r in records
                          if r["op"] == op and r["device"] == device]
                continue
            quick = " (quick run)" if r0.get("quick") else ""
            lines += [f"### {op}{quick}", "",
                      f"torch {r0['torch']}, Triton {r0.get('triton')}, CUDA {r0.get('cuda')}, "
                      f"commit `{r0['commit']}`, {_dates(rs)}; {_ceiling_text(r0)}.", "",
                      full_table(rs), ""]
            for path in plot_run(rs, op, device, plots_dir):
                rel = os.path.relpath(path, os.path.dirname(report_path))
                lines += [f"![{op}]({rel})", ""]
            runs = {}
            for r in records:
                if r["device"] == device and r["op"] == op:
                    key = (r["date"], r.get("commit"), bool(r.get("quick")))
                    runs[key] = runs.get(key, 0) + 1
            lines += ["Runs on record:", ""]
            lines += [f"- {d}, commit `{c}`{' (quick)' if q else ''}: {n} results"
                      for (d, c, q), n in sorted(runs.items(), key=lambda kv: kv[0][0])]
            lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=None, help=f"results folder (default {harness.RESULTS})")
    p.add_argument("--out", default=None, help="REPORT.md path (default next to the results)")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    p.add_argument("--print", action="store_true", help="print the README table only")
    p.add_argument("--add", nargs="+", default=None, metavar="PATH",
                   help="JSON-lines files or folders whose results to append first")
    a = p.parse_args(argv)
    if a.add:
        for op, n in add(a.add, a.results).items():
            print(f"{op}: {n} results added")
    records = load(a.results)
    text = render(records)
    if a.print:
        print(text)
        return
    results_dir = a.results or harness.RESULTS
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(results_dir)), "REPORT.md")
    with open(out, "w") as f:
        f.write(render_report(records, out))
    print(f"{out} written")
    readme = os.path.join(harness.ROOT, "README.md")
    if not a.no_readme and harness.IN_CHECKOUT and os.path.isfile(readme):
        update_readme(text, readme)
        print("README.md results updated")


if __name__ == "__main__":
    main()
