#!/usr/bin/env bash
# The end-to-end demo (filled in as the pieces land).
echo "demo: not built yet: simulate_route, build_map, the node and the evaluation are still to come" >&2
exit 1
