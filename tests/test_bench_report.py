"""bench/REPORT.md generation from saved results: the table, the commands, the schema checks (nothing timed)."""

import json

import pytest

from bench import report
from bench.common import emit, record

MACHINE = {"cpus": 2, "cpu_model": "Test CPU @ 1.00GHz", "ram_gib": 7.8, "os": "Linux-test", "python": "3.11.0"}


def synthetic() -> list[dict]:
    lim = record("toy.limit.w1", "tokens_per_s", 2000.0, "tokens/s", config={"what": "limit"})
    ours = record("toy.build.w1", "tokens_per_s", 1500.0, "tokens/s", lim,
                  config={"goal": ">= 0.85 x limit", "meets_goal": False, "command": "python -m data_pipeline build"})
    rss = record("toy.growth.peak_rss.1x", "peak_rss", 512.0, "MB", config={"command": "python -m data_pipeline build"})
    return [lim, ours, rss]


def test_report_from_emitted_results(tmp_path, capsys):
    emit(synthetic(), "toy-quick", results_dir=tmp_path, command="python -m bench.toy --quick")
    emit([record("toy.only_full", "seconds", 1.0, "s")], "toy", results_dir=tmp_path, command="python -m bench.toy")
    (tmp_path / "machine.json").write_text(json.dumps(MACHINE))
    capsys.readouterr()

    out = report.write_report(quick=True, results_dir=tmp_path, out=tmp_path / "REPORT.md")
    text = out.read_text()
    assert "**Quick mode**" in text and "toy.only_full" not in text  # quick report: quick results only
    assert "2 cores, Test CPU @ 1.00GHz, 7.8 GiB RAM" in text
    assert "Produced by `python -m bench.toy --quick` at " in text
    assert "| `toy.build.w1` | 1,500.0 | tokens/s | `toy.limit.w1` | 0.75 | >= 0.85 x limit | **no** |" in text
    assert "- `python -m data_pipeline build` → `toy.build.w1`, `toy.growth.peak_rss.1x`" in text
    assert "Goals met: 0 of 1 (not met: `toy.build.w1`)" in text

    full = report.write_report(quick=False, results_dir=tmp_path, out=tmp_path / "FULL.md").read_text()
    assert "Full runs" in full and "`toy.only_full`" in full and "toy.build.w1" not in full


def test_sections_without_results_here_are_carried_over(tmp_path):
    emit(synthetic(), "toy", results_dir=tmp_path, command="python -m bench.toy")
    out = tmp_path / "REPORT.md"
    report.write_report(quick=False, results_dir=tmp_path, out=out)
    (tmp_path / "toy.json").rename(tmp_path / "elsewhere.json.bak")  # measured on another machine, not here
    emit([record("zz.new", "seconds", 2.0, "s", config={"goal": "< 3 s", "meets_goal": True})], "zz",
         results_dir=tmp_path, command="python -m bench.zz")
    text = report.write_report(quick=False, results_dir=tmp_path, out=out).read_text()
    assert "## toy" in text and "| `toy.build.w1` | 1,500.0 |" in text and "Produced by `python -m bench.toy`" in text
    assert "## zz" in text and text.index("## toy") < text.index("## zz")
    assert "Goals met: 1 of 2 (not met: `toy.build.w1`)" in text


def test_table_rows_and_escaping():
    r = record("a.b", "seconds", 0.5, "s", config={"goal": "x | y"})
    table = report.markdown_table([r]).splitlines()
    assert table[0].startswith("| figure | value |")
    assert table[2] == "| `a.b` | 0.5 | s | - | - | x \\| y |  |"


@pytest.mark.parametrize("bad, message", [
    ({"name": "x", "metric": "m", "value": 1.0}, "record keys"),
    ({**record("x", "m", 1.0, "u"), "value": "fast"}, "value must be a number"),
    ({**record("x", "m", 1.0, "u"), "ratio": "2"}, "ratio must be a number"),
    ({**record("x", "m", 1.0, "u"), "config": []}, "config must be a dict"),
])
def test_schema_errors_name_the_file(tmp_path, bad, message):
    (tmp_path / "broken-quick.json").write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match=message) as e:
        report.load_results(tmp_path, quick=True)
    assert "broken-quick.json" in str(e.value)
    assert report.main(["--quick", "--results", str(tmp_path), "--out", str(tmp_path / "R.md")]) == 1
    assert not (tmp_path / "R.md").exists()


def test_duplicate_names_and_non_list_are_rejected(tmp_path):
    (tmp_path / "dup.json").write_text(json.dumps([record("x", "m", 1.0, "u")] * 2))
    with pytest.raises(ValueError, match="duplicated"):
        report.load_results(tmp_path, quick=False)
    (tmp_path / "dup.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="JSON list"):
        report.load_results(tmp_path, quick=False)
