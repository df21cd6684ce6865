"""benchmarks/report.py: discovery, headline parsing, failures as rows, the markdown table.

Two tiny fake benchmarks live in a temporary package (`fakebench`): one good (it accepts
--quick and prints the headline), one that crashes; plus one that prints no headline.
"""
import re
import textwrap

import pytest

from benchmarks import report

GOOD = textwrap.dedent("""
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print("warming up")
    print("compile: 3.31 s in 2 programs (trace 0.5, lower 0.31, compile 2.5; f 3.31)")
    print(f"good: ours {'2.0' if a.quick else '4.0'} tok/s, peer 1.0 tok/s, ratio "
          f"{'2.00' if a.quick else '4.00'}")
""")
BAD = "print('starting')\nraise RuntimeError('kaboom: no accelerator')\n"
SILENT = "print('all done, no headline here')\n"


@pytest.fixture
def fake_benchmarks(tmp_path, monkeypatch):
    pkg = tmp_path / "fakebench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(GOOD)
    (pkg / "bad.py").write_text(BAD)
    (pkg / "silent.py").write_text(SILENT)
    (pkg / "report.py").write_text("raise SystemExit('the report must not run itself')\n")
    (pkg / "cap_isa.py").write_text("raise SystemExit('a runner of benchmarks is not one')\n")
    (pkg / "_helper.py").write_text("")
    monkeypatch.setattr(report, "BENCH_DIR", pkg)
    monkeypatch.setattr(report, "PACKAGE", "fakebench")
    monkeypatch.setattr(report, "jax_backend", lambda timeout=120: "cpu 1 x fake")
    return pkg


def test_parse_headline_uses_last_line_and_units_with_spaces():
    out = "noise: ours 1 x, peer 2 x, ratio 0.5\nmodel: ours 12.5 ms / step, peer 20 ms / step, ratio 1.60\n"
    assert report.parse_headline(out) == {"name": "model", "ours": "12.5 ms / step",
                                          "peer": "20 ms / step", "ratio": "1.60"}
    assert report.parse_headline("model: ours 1 x, peer 2 x, ratio 0.5\ntrailing text\n") is None
    assert report.parse_headline("") is None


def test_discover_skips_the_runners_and_private(fake_benchmarks):
    assert report.discover(fake_benchmarks) == ["bad", "good", "silent"]


def test_report_table_with_good_failing_and_silent(fake_benchmarks, tmp_path, capsys):
    out_md = tmp_path / "RESULTS.md"
    rc = report.main(["--quick", "--timeout", "60", "--out", str(out_md)],
                     bench_dir=fake_benchmarks, package="fakebench")
    assert rc == 0
    text = out_md.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln}
    # --quick was passed through (the good benchmark reports 2.0 only under --quick)
    assert rows["good"][:3] == ["2.0 tok/s", "1.0 tok/s", "2.00"]
    assert rows["good"][3] == "3.3 s, 2 programs" and rows["bad"][3] == "—"   # our compile
    assert rows["good"][4].startswith("ok, quick")
    assert rows["bad"][4].startswith("failed (rc 1)") and rows["bad"][0] == "—"
    assert rows["silent"][4].startswith("no headline")
    assert "kaboom: no accelerator" in text               # the failure reason is shown
    assert "cores:" in text and "jax backend: cpu 1 x fake" in text and "torch:" in text
    lines = text.splitlines()
    assert lines[0] == "### Benchmark results"                     # one block for the README
    assert lines[2] == "- Command: `python -m benchmarks.report --quick --timeout 60 " \
                       f"--out {out_md}`"
    assert re.fullmatch(r"- Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", lines[3])
    assert lines[4].startswith("- Machine: cpu: ")
    assert "smoke-test sizes" in text                                # --quick is said so
    assert report.format_markdown([], {"cpu": "x"}, "cmd").count("smoke-test") == 0


def test_timeout_is_a_row_not_a_crash(fake_benchmarks):
    (fake_benchmarks / "slow.py").write_text("import time\ntime.sleep(30)\n")
    r = report.run_benchmark("slow", timeout=1.0, package="fakebench", bench_dir=fake_benchmarks)
    assert r.status == "timeout (1 s)" and r.ours == ""


def test_kernels_avx2_runs_each_benchmark_under_the_cap(fake_benchmarks, tmp_path, monkeypatch):
    """--kernels avx2: each benchmark runs under benchmarks.cap_isa (it sees the cap; YNNPACK's
    word is capped before its code runs) and the machine line says so."""
    import os
    from pathlib import Path

    from benchmarks._host import cpu_flags
    from benchmarks.cap_isa import UP_TO_FMA3, expected_feature_word, why_unavailable
    if why_unavailable():
        pytest.skip(why_unavailable())
    (fake_benchmarks / "capcheck.py").write_text(textwrap.dedent("""
        import os
        from benchmarks.cap_isa import FeatureWord
        word = FeatureWord().word.value
        print(f"capcheck: ours {word} x, peer 1 x, ratio {os.environ.get('TEPO_BENCH_KERNEL_CAP', 'none')}")
    """))
    root = Path(report.__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out_md = tmp_path / "avx2.md"
    assert report.main(["--kernels", "avx2", "--only", "capcheck", "--out", str(out_md)],
                       bench_dir=fake_benchmarks, package="fakebench") == 0
    text = out_md.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| capcheck"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert int(cells[0].split()[0]) == expected_feature_word(cpu_flags()) & UP_TO_FMA3, row
    assert cells[2] == "AVX2+FMA", row
    assert "kernels: capped to AVX2+FMA" in text
