"""Real rclpy plumbing for tests: an isolated DDS domain on loopback and a spin-until helper."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor


def isolated_context() -> Context:
    """An initialised rclpy context on a DDS domain of this process's own, discovery on localhost only."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    context = Context()
    rclpy.init(context=context, domain_id=1 + os.getpid() % 100)
    return context


def spin_until(executor: SingleThreadedExecutor, done: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Spin ``executor`` until ``done()`` is true or ``timeout_s`` passes; returns ``done()``."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return done()
