# tscm_ros: `make demo` and `make test` set everything up on a fresh machine (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Tests and the demo talk DDS on loopback only.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST

.PHONY: help setup test demo demo-train bench pretrain clean

help:
	@echo "make setup       create .venv (pinned deps) and colcon-build the package into install/"
	@echo "make test        setup, lint (ruff), then run the test suite"
	@echo "make demo        setup, render a route, build a map, run the node over DDS, evaluate"
	@echo "make demo-train  setup, then the whole TSCM pipeline: dataset, teacher, student, evaluation"
	@echo "make bench       benchmarks (minutes; see bench/)"
	@echo "make pretrain    re-train the shipped default student on rendered worlds (2 CPU cores: about an hour)"
	@echo "make clean       remove build/, install/, log/ (keeps .venv)"

setup:
	@bash tools/setup.sh

test: setup
	. ./env.sh && ruff check . && pytest

demo: setup
	. ./env.sh && bash tools/demo.sh

demo-train: setup
	. ./env.sh && bash tools/demo.sh --train

bench: setup
	. ./env.sh && for b in bench/*.py; do python "$$b" || exit 1; done

pretrain: setup
	. ./env.sh && python tools/pretrain_default.py

clean:
	rm -rf build install log
