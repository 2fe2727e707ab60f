#!/usr/bin/env bash
# The end-to-end demo, run by `make demo` (and `make demo-train` with --train) after `make setup` and
# `. ./env.sh`:
#   1. render two traversals of a small simulated route (cached in .cache/demo/, rendered once);
#   2. build a keyframe map from traversal 1 with the default model (training-free VLAD, which fits its
#      vocabulary on the map's own images);
#   3. start the real place_recognition_node and pose_graph_node, replay traversal 2 to them over DDS (its
#      odometry drifted for the back-end) and print the loop candidates as they arrive; stop both;
#   4. evaluate every method on the same traversals (pretrained GeM baseline, the default model, ORB bag of
#      words, plus the trained teacher and student with --train) and print the table; close each method's
#      loops at the node's defaults in the pose-graph back-end on traversal 2's odometry with drift added,
#      and print the trajectory errors.
# --train first renders two more traversals of the demo town and runs the README's training commands on
# them and the reference (teacher, then the distilled student, on the CPU); the season revisit that is
# evaluated is never trained on. Then steps 2-4 with them.
# Outputs go to demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."

TRAIN=0
case "${1:-}" in
  "") ;;
  --train) TRAIN=1 ;;
  *) echo "usage: tools/demo.sh [--train]" >&2; exit 2 ;;
esac

# Rendered routes are cached per version of the simulator (re-rendered when tscm_ros/sim/*.py change).
CACHE=.cache/demo/$(cat tscm_ros/sim/*.py | sha256sum | cut -c1-12)
OUT=demo_output
FRAMES=${DEMO_FRAMES:-120}
# The simulated camera at 320x240: 70 degree vertical field of view. Geometric verification then fits the
# essential matrix and the node's candidates carry a relative pose.
INTRINSICS="171.38 171.38 160 120"
# The installed executables (also what `ros2 run tscm_ros ...` runs).
export PATH="$PWD/install/tscm_ros/lib/tscm_ros:$PATH"
# A DDS domain of this demo's own, discovery on this machine only.
export ROS_DOMAIN_ID=$(( $$ % 100 + 1 ))
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
started=$SECONDS
step=0

say() {
  step=$((step + 1))
  echo
  echo "=== demo step $step ($((SECONDS - started)) s): $*"
}

# render WORLD_SEED TRAVERSAL CONDITION: a route bag in the cache, rendered only if missing. The towns have
# look-alike street blocks (--aliasing 0.3), so that recognising a place takes more than matching corners.
render() {
  local dir="$CACHE/world$1_t$2_$3"
  if [ -d "$dir" ]; then
    echo "using the cached $dir"
  else
    simulate_route --out "$dir" --seed "$1" --traversal "$2" --condition "$3" --aliasing 0.3 --frames "$FRAMES"
  fi
}

mkdir -p "$CACHE" "$OUT"
say "render the demo route (world 0): traversal 1 (reference, day) and traversal 2 (revisit in another season, 1-2 m to the side)"
render 0 0 day
render 0 1 season
REFERENCE="$CACHE/world0_t0_day"
QUERY="$CACHE/world0_t1_season"

STUDENT_ARGS=()
EVAL_MODELS=()
MAP_MODEL="default model"
if [ "$TRAIN" = 1 ]; then
  say "render two more traversals of the demo town for site training (a dusk drive and a day drive); the season revisit stays held out"
  render 0 2 auto
  render 0 3 day
  say "extract a training dataset (the README's command: frames every 2 m, split chosen from the data)"
  extract_dataset --bag "$REFERENCE" --bag "$CACHE/world0_t2_auto" --bag "$CACHE/world0_t3_day" --out "$OUT/dataset" \
    --every-m 2 --overwrite --no-progress
  rm -rf "$OUT/runs"
  say "train the teacher on the CPU (frozen backbones, cached augmented features, triplet loss)"
  # The README's commands with fewer epochs, so the demo stays a few minutes.
  train teacher --data "$OUT/dataset" --out "$OUT/runs/teacher" --set epochs=4 --no-progress
  say "distil the student from it (L_hard + L_soft + L_cm)"
  train student --data "$OUT/dataset" --teacher "$OUT/runs/teacher/best.pt" --out "$OUT/runs/student" \
    --set epochs=6 --no-progress
  STUDENT_ARGS=(--model "$OUT/runs/student/best.pt")
  MAP_MODEL="distilled student"
  EVAL_MODELS=(--model "teacher (trained)=$OUT/runs/teacher/best.pt" --model "student (distilled)=$OUT/runs/student/best.pt")
fi

say "build a keyframe map from traversal 1 with the $MAP_MODEL"
build_map --bag "$REFERENCE" --out "$OUT/map" --force --device cpu "${STUDENT_ARGS[@]}"

say "start place_recognition_node and pose_graph_node (ROS_DOMAIN_ID=$ROS_DOMAIN_ID) and replay traversal 2 to them over DDS, its odometry drifted for the back-end"
model_param=()
[ "$TRAIN" = 1 ] && model_param=(-p "model_path:=$OUT/runs/student/best.pt")
# The node at its shipped defaults (config/place_recognition.yaml): only the map, the CPU, the intrinsics and
# the robot's odometry (the replay's drifted /odom, as the back-end gets it: the sequence evidence follows the
# distance travelled).
place_recognition_node --ros-args -p "map_path:=$OUT/map" -p device:=cpu -p "camera_intrinsics:=$INTRINSICS" \
  -p pose_topic:=/odom "${model_param[@]}" > "$OUT/node.log" 2>&1 &
node_pid=$!
stop_node() {
  if kill -0 "$node_pid" 2>/dev/null; then
    kill -INT "$node_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$node_pid" 2>/dev/null; then
      echo "the node did not stop within 10 s of SIGINT: sending SIGTERM"
      kill -TERM "$node_pid" 2>/dev/null || true
    fi
    local code=0
    wait "$node_pid" 2>/dev/null || code=$?
    echo "node stopped (exit code $code; its log: $OUT/node.log)"
  fi
}
# The pose-graph back-end behind it, on the revisit's odometry with drift added (the replay publishes it).
pose_graph_node --ros-args -p odom_topic:=/odom > "$OUT/pose_graph.log" 2>&1 &
graph_pid=$!
stop_graph() {
  if kill -0 "$graph_pid" 2>/dev/null; then
    kill -INT "$graph_pid" 2>/dev/null || true
    wait "$graph_pid" 2>/dev/null || true
    echo "pose graph stopped: $(grep -o "pose graph: {.*}" "$OUT/pose_graph.log" | tail -1)"
  fi
}
trap 'stop_node; stop_graph' EXIT
python tools/replay_bag.py "$QUERY" --rate 4 --odometry-drift 0.3,0.1,0.02 \
  || { echo "demo: the replay failed; node log:" >&2; cat "$OUT/node.log" >&2; exit 1; }
stop_node
stop_graph
trap - EXIT

say "evaluate all methods on the same traversals: map from traversal 1, every frame of traversal 2 as a query; each method's loops at the node's defaults closed by the pose-graph back-end on traversal 2's odometry with drift added"
evaluate --bag "$REFERENCE" --query-bag "$QUERY" --out "$OUT/evaluation" --pose-graph \
  --overwrite --device cpu --intrinsics "${INTRINSICS// /,}" "${EVAL_MODELS[@]}"

echo
echo "=== demo done in $((SECONDS - started)) s. Outputs in $OUT/:"
echo "  map/                        keyframe map of traversal 1 (build_map)"
echo "  node.log, pose_graph.log    the nodes' logs"
echo "  evaluation/loop_closure.md  the table above; loop_closure.json, queries_*.csv per query"
echo "  evaluation/pr_curve.png     top-1 precision-recall curves"
echo "  evaluation/trajectories.png trajectories with true (green) and false (red) loop closures"
echo "  evaluation/matches.png      the worst false matches and a few true ones, query next to keyframe"
echo "  evaluation/pose_graph.png   ground truth, drifted odometry and the path the back-end corrected with each"
echo "                              method's loops (pose_graph.md: the ATE table)"
[ "$TRAIN" = 1 ] && echo "  dataset/, runs/teacher/, runs/student/  training data, checkpoints, learning curves"
exit 0
