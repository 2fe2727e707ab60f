"""Running a node until SIGINT or SIGTERM, shared by the package's nodes.

The nodes handle the signals themselves (not rclpy's handlers, whose KeyboardInterrupt could land anywhere):
the first one stops spinning, and any further one (``ros2 launch`` sends a second SIGINT, then SIGTERM) while
the node shuts down is only logged. A bad parameter, model or map (a ``TscmError`` while the node is made) is
one fatal line and exit code 2.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import rclpy
import rclpy.executors
from rclpy.signals import SignalHandlerOptions

from tscm_ros.errors import TscmError


def spin_until_signal(name: str, make_node: Callable[[], object], args=None) -> int:
    """Make the node (after ``rclpy.init(args)``), spin it until a signal, then call its ``shutdown()`` and
    destroy it; the exit code."""
    # A plain flag, not a threading.Event: a handler runs between two bytecodes of the main thread, so a second
    # signal can arrive inside the first handler's Event.set(), which would wait forever for its own lock.
    stopping = [False]

    def on_signal(signum, _frame) -> None:
        if stopping[0]:  # a plain write: ROS logging also publishes on /rosout, which must not run in a handler
            try:
                os.write(2, f"[{name}] {signal.Signals(signum).name} again: already shutting down\n".encode())
            except OSError:  # stderr gone (a closed pipe): the shutdown, and what it saves, must go on
                pass
        stopping[0] = True

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    executor = rclpy.executors.SingleThreadedExecutor()
    try:
        node = make_node()
        executor.add_node(node)
        while not stopping[0] and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)  # wakes up for the signal flag
    except TscmError as exc:
        rclpy.logging.get_logger(name).fatal(str(exc))
        return 2
    except rclpy.executors.ExternalShutdownException:
        pass
    finally:
        stopping[0] = True  # from here on, signals are only logged
        try:
            executor.shutdown()
            if node is not None:
                node.shutdown()
                node.destroy_node()
        finally:
            rclpy.try_shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0
