"""Stop signals: SIGTERM and SIGINT (what a preemption or Ctrl-C sends) become a request that every process
of the run agrees on, so all of them stop at the same step or outer-loop boundary and leave one complete
checkpoint behind.
"""
import os
import signal
import socket
import sys
import threading

import jax
import numpy as np
from jax import lax

from errors import Interrupted
from parallel import AXIS


class StopSignals:
    """A context that records a stop signal; a second one ends the process at once (exit 128 + signal).

    On a pod the signal reaches the processes at different moments, or only some of them, so no process
    stops on its own word: `received` is this process's request, `agreed` the largest signal any process
    passed on at the same boundary (with a step, or through `agree`), which is what all of them act on.
    A process that stopped alone would leave the others waiting at the next all-reduce forever.
    Enter it after jax.distributed.initialize, whose preemption notifier takes over SIGTERM otherwise.

    Signals are watched by a thread on Python's wakeup file, written the moment a signal arrives: a Python
    handler runs only when the main thread runs Python again, which inside a compiled outer loop can be
    minutes later, and two signals meanwhile would count as one.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.received, self.agreed, self.saved = None, None, False
        self.steps_done = None  # of the outer loop a stop cut short (the Python inner loop's)
        self.previous, self.wakeup = {}, None
        self._agree = jax.pmap(lambda signum: lax.pmax(signum, AXIS), axis_name=AXIS)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            # Python's handler only has to exist (so the signal is caught and written to the wakeup file);
            # the watcher acts on it.
            self.previous = {s: signal.signal(s, lambda signum, frame: None) for s in self.SIGNALS}
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self.wakeup = (reader, writer, signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False))
            threading.Thread(target=self.watch, args=(reader,), daemon=True, name="stop-signals").start()
        return self

    def watch(self, reader):
        """Every stop signal the moment it arrives, whatever the main thread is doing."""
        while data := reader.recv(64):
            for signum in (signal.Signals(n) for n in data if n in self.SIGNALS):
                if self.saved and signum == signal.SIGTERM:
                    continue  # see __exit__
                if self.received is None and not self.saved:
                    self.received = signum
                else:
                    print(f"stopped at once by a second {signum.name}; the last checkpoint written resumes the "
                          "run", file=sys.stderr, flush=True)
                    os._exit(128 + signum)

    def flags(self) -> np.ndarray:
        """This process's request for each of its devices (0: none), for a step to agree on."""
        return np.full(jax.local_device_count(), self.received or 0, np.int32)

    def agree(self) -> int | None:
        """Every process together (a collective): the largest signal any of them received, or None."""
        self.agreed = int(self._agree(self.flags())[0]) or None
        return self.agreed

    def __exit__(self, exception_type, *_):
        if self.previous and exception_type is Interrupted:
            # The work is saved and the process is about to exit 128 + signal, through jax's exit handlers,
            # which can take a while (errors.leave_after_a_stop). The watcher stays until the process ends: a
            # second Ctrl-C then ends it at once with the same exit code, not a kill by the default handler.
            # A SIGTERM that reaches this process only now (the other processes of a pod may get theirs late)
            # is ignored, by the OS: Python's teardown would put a Python handler back to the default.
            self.saved = True
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.wakeup:
            reader, writer, previous = self.wakeup
            signal.set_wakeup_fd(previous)
            writer.close()
            reader.shutdown(socket.SHUT_RDWR)  # ends the watcher
