"""Progress bars: tqdm on a terminal, whole lines in logs (no carriage-return fragments)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import tscm_ros.progress
from tscm_ros.progress import progress

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_and_a_terminal_gets_the_bar(monkeypatch):
    log = io.StringIO()
    assert list(progress(range(3), desc="reading", unit="frame", stream=log)) == [0, 1, 2]
    assert "\r" not in log.getvalue() and log.getvalue().startswith("reading: 3/3 frame done in ")
    assert log.getvalue().count("\n") == 1  # one line for the stage

    monkeypatch.setattr(tscm_ros.progress, "PLAIN_INTERVAL_S", 0.0)  # a line on every update: long stages
    log = io.StringIO()
    with progress(total=4, desc="caching", unit="batch", stream=log) as bar:
        for _ in range(4):
            bar.update()
            bar.set_postfix(loss="0.1")
    lines = log.getvalue().splitlines()
    assert len(lines) == 5 and lines[1].startswith("caching: 2/4 batch (50 %) after ") and "loss 0.1" in lines[1]

    terminal = Terminal()
    list(progress(range(3), desc="reading", stream=terminal))
    assert "\r" in terminal.getvalue()  # tqdm redraws its bar in place
    quiet = io.StringIO()
    list(progress(range(3), stream=quiet, enabled=False))
    assert quiet.getvalue() == ""


def test_tools_run_without_a_terminal_write_no_bar_fragments(tmp_path, route_reference):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    render = subprocess.run([sys.executable, "-m", "tscm_ros.cli.simulate_route", "--out", str(tmp_path / "bag"),
                             "--frames", "8", "--width", "64", "--height", "48"],
                            capture_output=True, text=True, env=env, timeout=300)
    build = subprocess.run([sys.executable, "-m", "tscm_ros.cli.build_map", "--bag", str(route_reference), "--out",
                            str(tmp_path / "map"), "--min-distance", "20"], capture_output=True, text=True, env=env,
                           timeout=300)
    for result, stage in ((render, "rendering bag: 8/8 frame done in "), (build, "reading: 40/40 frame done in ")):
        assert result.returncode == 0, result.stderr
        assert "\r" not in result.stderr and "\r" not in result.stdout
        assert stage in result.stderr, result.stderr
