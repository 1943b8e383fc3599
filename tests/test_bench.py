"""The benchmark suite itself (sslfast.bench): --check, JSON lines, reports,
pytest-benchmark, the quick pass, providers that are not installed."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import sslfast.functional
from sslfast.bench import OPS, check, harness, report
from sslfast.bench.__main__ import main
from tests.utils import ROOT

FIXTURE = os.path.join(ROOT, "tests", "data", "bench_results.jsonl")
CPU = torch.device("cpu")

# Fields every result line carries (plus gbps for bandwidth-bound ops, tflops for the others).
FIELDS = ("device", "device_type", "torch", "triton", "cuda", "python", "commit", "date", "op",
          "provider", "model", "shape", "dtype", "quick", "median_ms", "p20_ms", "p80_ms",
          "peak_mem_bytes", "pct_of_peak", "ceilings", "speedup_vs_reference",
          "speedup_vs_best_other")


def test_check_passes_on_the_real_ops():
    results = check.run_checks(["queue", "ema"], CPU, quick=True)
    assert all(r["ok"] for rows in results.values() for r in rows)


def test_check_fails_loudly_on_a_wrong_op(monkeypatch, capsys, tmp_path):
    """A deliberately wrong loss fails its check; its benchmark does not run, the
    others do, and the command exits with 1."""
    real = sslfast.functional.ntxent_loss
    monkeypatch.setattr(sslfast.functional, "ntxent_loss",
                        lambda *a, **k: real(*a, **k) * 1.01)
    code = main(["--check", "--quick", "--ops", "contrastive,queue", "--device", "cpu",
                 "--results", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert any(line.startswith("ntxent_loss") and " FAIL " in line for line in out.splitlines())
    assert any(line.startswith("clip_loss") and " pass " in line for line in out.splitlines())
    assert "CHECK FAILED for contrastive" in err
    assert "==== contrastive ====" not in out and "==== queue ====" in out
    assert os.listdir(tmp_path) == ["queue.jsonl"]


def test_check_reports_an_op_that_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(sslfast.functional, "enqueue_", broken)
    rows = check.run_checks(["queue"], CPU, quick=True)["queue"]
    assert not any(r["ok"] for r in rows)
    assert "RuntimeError: kernel exploded" in rows[0]["detail"]
    assert check.print_table({"queue": rows}) == ["queue"]


def test_quick_pass_on_cpu_writes_every_field_in_under_two_minutes(tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sslfast.bench", "--quick", "--device", "cpu",
                          "--results", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-3000:]
    assert elapsed < 120, f"--quick took {elapsed:.0f} s"
    for op in OPS:
        assert f"==== {op} ====" in out.stdout
    total = sum(len(__import__(OPS[op], fromlist=["cases"]).cases(CPU, True)) for op in OPS)
    assert f"] {total}/{total} " in out.stderr  # the progress bar reached the end
    seen = set()
    for name in sorted(os.listdir(tmp_path)):
        with open(tmp_path / name) as f:
            for line in f:
                r = json.loads(line)
                seen.add(r["op"])
                missing = [k for k in FIELDS if k not in r]
                assert not missing, (r["op"], r["provider"], missing)
                assert ("gbps" in r) != ("tflops" in r)
                assert r["quick"] is True and r["device_type"] == "cpu"
    assert seen == set(OPS)
    # appends, never overwrites
    before = sum(1 for _ in open(tmp_path / "queue.jsonl"))
    assert main(["--quick", "--ops", "queue", "--device", "cpu", "--results", str(tmp_path)]) == 0
    assert sum(1 for _ in open(tmp_path / "queue.jsonl")) == 2 * before


def test_report_renders_from_a_fixture(tmp_path):
    records = report.load(os.path.dirname(FIXTURE))
    assert len(records) == 14
    out = tmp_path / "REPORT.md"
    text = report.render_report(records, str(out), str(tmp_path / "plots"))
    assert "## Fixture GPU" in text and "### contrastive" in text and "### ema" in text
    # the newest run only in the table; both runs listed
    assert "| ntxent: 2N=4096 D=128 | bfloat16 | sslfast | 0.5 | 0.475–0.525 |" in text
    assert "| ntxent: 2N=65536 D=128 | bfloat16 | reference | OOM |" in text
    assert "commit `fedcba9`" in text and "commit `0123abc`" in text
    pngs = sorted(os.listdir(tmp_path / "plots"))
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    assert all(os.path.getsize(tmp_path / "plots" / p) > 10_000 for p in pngs)
    for p in pngs:
        assert f"(plots/{p})" in text
    readme_table = report.render(records)
    assert "| ntxent: 2N=65536 D=128 | bfloat16 | OOM | OOM | 50 |" in readme_table


def test_report_renders_the_results_on_record(tmp_path):
    """What `python -m sslfast.bench.report` reads in the checkout: every op's file in
    benchmarks/results, the acceptance run's lines (no provider) included."""
    records = report.load(os.path.join(ROOT, "benchmarks", "results"))
    assert {r["op"] for r in records} >= {"ema", "contrastive", report.PRETRAIN_RUN}
    text = report.render_report(records, str(tmp_path / "REPORT.md"), str(tmp_path / "plots"))
    assert f"### {report.PRETRAIN_RUN}" in text
    assert "kNN accuracy" in report.render(records)


def test_report_command_writes_report_and_readme(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    with open(FIXTURE) as src, open(results / "contrastive.jsonl", "w") as dst:
        dst.write(src.read())
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nend\n")
    report.main(["--results", str(results), "--out", str(tmp_path / "REPORT.md"), "--no-readme"])
    assert (tmp_path / "REPORT.md").read_text().startswith("# sslfast benchmark report")
    report.update_readme(report.render(report.load(str(results))), str(readme))
    new = readme.read_text()
    assert "old" not in new and "Fixture GPU" in new and new.endswith("end\n")


def test_missing_provider_is_skipped_with_a_note(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly.loss", None)  # import fails
    from sslfast.bench import contrastive, queue

    provs = contrastive.providers(("ntxent", 16, 8, 0, torch.float32), CPU)
    assert "lightly" not in provs and "sslfast" in provs
    provs = queue.providers((8, 64, 8, torch.float32), CPU)
    assert set(provs) == {"reference", "sslfast"}
    assert capsys.readouterr().out.count("lightly not installed: skipped") == 2


def test_pretrain_providers_train_the_same_model_and_the_step_checks():
    """Both pretrain providers start from the same weights (built lazily, workers
    only on the first step), and --check's step from JPEG bytes matches the float64
    NT-Xent; without lightly only sslfast runs."""
    from sslfast.bench import pretrain

    case = pretrain.cases(CPU, True)[0]
    tv, ours = pretrain.TorchvisionLightly(case, CPU), pretrain.Sslfast(case, CPU)
    assert tv.loader is None and ours.loader is None
    tv.start()
    ours.start()
    a, b = list(tv.model.parameters()), list(ours.method.encoder.parameters())
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    tv.close()
    ours.close()
    rows = pretrain.check(CPU, quick=True)
    assert rows and all(r["ok"] for r in rows), rows


def test_pretrain_without_lightly_runs_sslfast_only(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightly.loss", None)  # import fails
    from sslfast.bench import pretrain

    assert set(pretrain.providers(pretrain.cases(CPU, True)[0], CPU)) == {"sslfast"}
    assert "lightly not installed: skipped" in capsys.readouterr().out


def test_harness_measures_and_records(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", str(tmp_path))
    x = torch.randn(1 << 16)
    m = harness.measure(lambda: x.mul_(1.0), CPU, quick=True)
    assert m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]
    ceil = harness.ceilings(CPU, quick=True)
    assert ceil["mem_gbps"] > 0 and ceil["matmul_float32_tflops"] > 0
    sample = [{"provider": "reference", "median_ms": 4.0, "peak_mem_bytes": 100},
              {"provider": "lightly", "median_ms": 2.0, "peak_mem_bytes": 50},
              {"provider": "big", "oom": True},
              {"provider": "sslfast", "median_ms": 1.0, "peak_mem_bytes": 10}]
    harness.add_speedups(sample)
    assert sample[3]["speedup_vs_reference"] == 4.0 and sample[3]["speedup_vs_best_other"] == 2.0
    assert sample[3]["mem_vs_reference"] == 0.1 and "speedup_vs_reference" not in sample[2]
    path = harness.write_records("ema", [{"a": 1}])
    harness.write_records("ema", [{"a": 2}])
    assert [json.loads(line)["a"] for line in open(path)] == [1, 2]


def test_peak_memory_counts_reused_memory():
    """The CPU figure counts what a call holds at its peak even when freed
    memory is reused (glibc keeps it): two live 10 MB tensors -> >= 20 MB."""
    from sslfast._memory import peak_memory

    def twice():
        a = torch.ones(1000, 2500)
        b = a * 2
        return float(b[0, 0])

    peak_memory(twice, CPU)
    assert peak_memory(twice, CPU)[1] >= 19e6


def test_pytest_benchmark_runs_the_same_benchmarks():
    pytest.importorskip("pytest_benchmark")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_benchmarks.py", "--benchmark-only",
         "-q", "-k", "queue or (contrastive and ntxent)", "--benchmark-max-time=0.05",
         "--benchmark-min-rounds=1", "--benchmark-warmup=off", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "passed" in out.stdout and "sslfast" in out.stdout


def test_cases_option_runs_only_the_matching_cases(capsys, tmp_path):
    import importlib

    module = importlib.import_module(OPS["contrastive"])
    every = module.cases
    assert main(["--quick", "--ops", "contrastive", "--cases", "moco,float32", "--device", "cpu",
                 "--results", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "contrastive.jsonl")]
    assert rows and all(r["model"] == "moco" for r in rows)
    with pytest.raises(SystemExit):
        main(["--quick", "--ops", "contrastive", "--cases", "no-such-case", "--device", "cpu",
              "--no-write"])
    assert "no case of ['contrastive'] matches" in capsys.readouterr().err
    assert module.cases is every  # the module is left as it was
    cases = [("ntxent", 8192, torch.bfloat16), ("ntxent", 819, torch.float16)]
    assert harness.selected(cases, ["float16"]) == [cases[1]]  # words, not substrings
    assert harness.selected(cases, ["ntxent", "8192"]) == [cases[0]]
    assert harness.selected(cases, None) == cases


def test_report_merges_the_parts_of_one_commits_sweep():
    base = {"op": "contrastive", "device": "GPU", "commit": "abc", "quick": False}
    older = {**base, "commit": "old", "date": "2026-01-01", "shape": "s1", "dtype": "bfloat16",
             "provider": "sslfast"}
    part1 = {**base, "date": "2026-01-02", "shape": "s1", "dtype": "bfloat16", "provider": "sslfast"}
    part2 = {**base, "date": "2026-01-03", "shape": "s1", "dtype": "float32", "provider": "sslfast"}
    again = {**part1, "date": "2026-01-04"}
    runs = report.latest_runs([older, part1, part2])[("contrastive", "GPU")]
    assert runs == [part1, part2]
    runs = report.latest_runs([older, part1, part2, again])[("contrastive", "GPU")]
    assert runs == [part2, again]
    assert report._dates(runs) == "2026-01-03, 2026-01-04"
    dirty = [{**r, "commit": "abc-dirty"} for r in (part1, part2)]  # other code may have run
    assert report.latest_runs(dirty)[("contrastive", "GPU")] == [dirty[1]]


def test_report_add_appends_each_line_to_its_ops_file_once(tmp_path):
    results, run = tmp_path / "results", tmp_path / "run"
    results.mkdir()
    run.mkdir()
    old = {"op": "ema", "commit": "abc", "date": "2026-01-01", "provider": "sslfast"}
    (results / "ema.jsonl").write_text(json.dumps(old, sort_keys=True) + "\n")
    ema = {**old, "date": "2026-01-02"}
    con = {"op": "contrastive", "commit": "abc", "date": "2026-01-02", "provider": "sslfast"}
    (run / "ema.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (old, ema, ema)))
    (run / "contrastive.jsonl").write_text(json.dumps(con) + "\n\n")
    assert report.add([str(run)], str(results)) == {"contrastive": 1, "ema": 1}
    assert report.add([str(run / "ema.jsonl")], str(results)) == {"ema": 0}  # idempotent
    assert [json.loads(x) for x in (results / "ema.jsonl").read_text().splitlines()] == [old, ema]
    assert [json.loads(x) for x in (results / "contrastive.jsonl").read_text().splitlines()] == [con]


def test_report_add_refuses_lines_without_a_commit(tmp_path):
    results, run = tmp_path / "results", tmp_path / "run.jsonl"
    good = {"op": "ema", "commit": "abc", "date": "2026-01-02"}
    run.write_text(json.dumps(good) + "\n" + json.dumps({**good, "commit": None}) + "\n")
    with pytest.raises(ValueError, match=r"run.jsonl:2 names no commit .*nothing added"):
        report.add([str(run)], str(results))
    assert not results.exists()
    with pytest.raises(ValueError, match="results: no such file or folder"):
        report.add([str(tmp_path / "results")], str(results))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no JSON-lines files"):
        report.add([str(tmp_path / "empty")], str(results))


def test_results_name_the_given_commit_where_git_is_not(monkeypatch):
    monkeypatch.setattr(harness, "_git", lambda *a: None)
    monkeypatch.setenv("SSLFAST_COMMIT", "0123abc")
    assert harness.environment(torch.device("cpu"))["commit"] == "0123abc"
    monkeypatch.delenv("SSLFAST_COMMIT")
    assert harness.environment(torch.device("cpu"))["commit"] is None
