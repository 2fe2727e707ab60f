# tscm_ros: `make demo` and `make test` set everything up on a fresh machine (see README.md).
SHELL := /bin/bash
, := ,
.DEFAULT_GOAL := help
# Tests and the demo talk DDS on loopback only.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST

.PHONY: help setup test demo demo-train bench clean

help:
	@echo "make setup       create .venv (pinned deps) and colcon-build the package into install/"
	@echo "make test        setup, lint (ruff), then run the test suite"
	@echo "make demo        setup, render a route, build a map, run the node over DDS, evaluate"
	@echo "make demo-train  setup, then the whole TSCM pipeline: dataset, teacher, student, evaluation"
	@echo "make bench       the quick benchmarks (see bench/); LONG=1 adds the long ones (hours),"
	@echo "                 REAL=DIR the real-photo track"
	@echo "make clean       remove build/, install/, log/ (keeps .venv)"

setup:
	@bash tools/setup.sh

test: setup
	. ./env.sh && ruff check . && pytest

demo: setup
	. ./env.sh && bash tools/demo.sh

demo-train: setup
	. ./env.sh && bash tools/demo.sh --train

# REAL: a folder of real revisit sets (ref/, query/, gt.csv), e.g. REAL=../shared/realdata
# LONG=1 adds the long runs: the 1M-keyframe map search (30 minutes and more, 16 GiB), a 10-minute soak,
# the full recognition benchmark with training (about 40 minutes), distillation (about 40 minutes) and,
# with REAL, the descriptor selection (10-17 minutes).
bench: setup
	. ./env.sh && python -m bench.descriptor_latency && python -m bench.map_search --sizes 1000,10000,100000 $(if $(REAL),--real $(REAL)) \
	  && python -m bench.node_throughput && python -m bench.node_soak --minutes $(if $(LONG),10,2) \
	  && python -m bench.recognition $(if $(REAL),--real $(REAL)) $(if $(LONG),,--no-training) \
	  $(if $(REAL),&& python -m bench.unmapped --real $(REAL)) \
	  $(if $(LONG),&& python -m bench.map_search --sizes 1000000 $(if $(REAL),--real $(REAL)) --configs pca512+hnsw+rerank16 \
	    --ef-search 512$(,)1024$(,)2048 && python -m bench.distillation \
	  $(if $(REAL),&& python -m bench.descriptor_selection --real $(REAL)))

clean:
	rm -rf build install log
