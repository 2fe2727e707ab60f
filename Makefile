# tscm_ros: `make demo` and `make test` set everything up on a fresh machine (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Tests and the demo talk DDS on loopback only.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST

.PHONY: help setup test demo demo-train bench clean

help:
	@echo "make setup       create .venv (pinned deps) and colcon-build the package into install/"
	@echo "make test        setup, lint (ruff), then run the test suite"
	@echo "make demo        setup, render a route, build a map, run the node over DDS, evaluate"
	@echo "make demo-train  setup, then the whole TSCM pipeline: dataset, teacher, student, evaluation"
	@echo "make bench       benchmarks (an hour and more; see bench/); REAL=DIR adds the real-photo track"
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
bench: setup
	. ./env.sh && python bench/descriptor_latency.py && python bench/map_search.py \
	  && python bench/node_throughput.py && python bench/node_soak.py \
	  && python bench/recognition.py $(if $(REAL),--real $(REAL)) && python bench/distillation.py \
	  && $(if $(REAL),python bench/descriptor_selection.py --real $(REAL),echo "bench/descriptor_selection.py needs REAL=DIR")

clean:
	rm -rf build install log
