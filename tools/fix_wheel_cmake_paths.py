"""Point the ROS wheels' exported CMake files at this environment's Python.

About 15 of the Kilted wheels' ``share/*/cmake/*Export.cmake`` files name the wheel builder's Python
(``/opt/python/cp311-cp311/...``), which makes ``find_package`` fail at configure time. This rewrites
those two paths to the running interpreter's include dir and site-packages. Idempotent.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

BUILDER_PYTHON = "/opt/python/cp311-cp311"
REPLACEMENTS = {
    f"{BUILDER_PYTHON}/include/python3.11": sysconfig.get_paths()["include"],
    f"{BUILDER_PYTHON}/lib/python3.11/site-packages": sysconfig.get_paths()["purelib"],
}


def main() -> int:
    share = Path(sys.prefix) / "share"
    fixed = []
    for cmake_file in sorted(share.glob("*/cmake/*.cmake")):
        text = cmake_file.read_text(encoding="utf-8")
        new_text = text
        for old, new in REPLACEMENTS.items():
            new_text = new_text.replace(old, new)
        if new_text != text:
            cmake_file.write_text(new_text, encoding="utf-8")
            fixed.append(cmake_file.name)
    leftover = [p for p in share.glob("*/cmake/*.cmake") if BUILDER_PYTHON in p.read_text(encoding="utf-8")]
    if leftover:
        print(f"error: still naming {BUILDER_PYTHON}: {', '.join(map(str, leftover))}", file=sys.stderr)
        return 1
    print(f"fixed the builder's Python paths in {len(fixed)} CMake files under {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
