"""What every tool shares: numeric options refuse NaN and infinity (and --max-pose-gap anything not above 0)
with one argparse error line and exit code 2, before any work."""

from __future__ import annotations

import pytest

from tscm_ros.cli import build_map, evaluate, extract_dataset, simulate_route


@pytest.mark.parametrize("tool, argv", [
    (build_map, ["--bag", "b", "--out", "m", "--min-distance", "nan"]),
    (build_map, ["--bag", "b", "--out", "m", "--min-interval", "inf"]),
    (build_map, ["--bag", "b", "--out", "m", "--max-pose-gap", "nan"]),
    (extract_dataset, ["--bag", "b", "--out", "d", "--every-m=-inf"]),
    (evaluate, ["--bag", "b", "--query-bag", "q", "--out", "e", "--radius-m", "nan"]),
    (simulate_route, ["--out", "r", "--route-length", "inf"]),
])
def test_numeric_options_refuse_nan_and_infinity(tool, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "expected a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("gap", ["0", "-1"])
def test_max_pose_gap_must_be_above_zero(gap, capsys):
    with pytest.raises(SystemExit):
        build_map.build_parser().parse_args(["--bag", "b", "--out", "m", "--max-pose-gap", gap])
    assert "--max-pose-gap: expected a number above 0" in capsys.readouterr().err


@pytest.mark.parametrize("tool, argv", [
    (build_map, ["--bag", "missing_bag", "--out", "{out}"]),
    (extract_dataset, ["--bag", "missing_bag", "--out", "{out}", "--no-progress"]),
    (evaluate, ["--bag", "missing_bag", "--query-bag", "missing_bag", "--out", "{out}"]),
    (evaluate, ["--data", "missing_data", "--model", "pretrained", "--out", "{out}"]),
    ("train", ["teacher", "--data", "missing_data", "--out", "{out}"]),
])
def test_an_output_under_a_file_is_refused_before_any_work(tool, argv, tmp_path, monkeypatch, capsys):
    if tool == "train":
        from tscm_ros.cli import train as tool
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("not a folder")
    assert tool.main([arg.format(out="afile.txt/sub") for arg in argv]) == 2
    assert capsys.readouterr().err == ("error: --out afile.txt/sub: cannot create it, afile.txt is a file, not a "
                                       "directory\n")  # not 'missing_bag': before the inputs are read
    assert tool.main([arg.format(out="afile.txt") for arg in argv]) == 2
    assert "afile.txt" in capsys.readouterr().err
    assert (tmp_path / "afile.txt").read_text() == "not a folder"
