# Source this file (". ./env.sh") after `make setup`: it activates the project's .venv (ROS 2 wheels,
# torch, FAISS, ...) and the colcon install of tscm_ros, exactly like sourcing a ROS workspace.
_tscm_root=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)
if [ ! -f "$_tscm_root/install/setup.bash" ]; then
  echo "tscm_ros is not built yet: run 'make setup' in $_tscm_root first" >&2
  return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
source "$_tscm_root/.venv/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
# shellcheck disable=SC1091
source "$_tscm_root/install/setup.bash"
# Without the ros2 CLI here, put the executables that `ros2 run tscm_ros <exe>` would find on PATH.
export PATH="$_tscm_root/install/tscm_ros/lib/tscm_ros:$PATH"
unset _tscm_root
