"""Stop signals: SIGTERM and SIGINT (what a preemption or Ctrl-C sends) become a request that every process
of the run agrees on, so all of them stop at the same step or outer-loop boundary and leave one complete
checkpoint behind.
"""
import signal
import threading

import jax
import numpy as np
from jax import lax

from errors import Interrupted
from parallel import AXIS


class StopSignals:
    """A context that records stop signals; a second one stops at once (KeyboardInterrupt).

    On a pod the signal reaches the processes at different moments, or only some of them, so no process
    stops on its own word: `received` is this process's request, `agreed` the largest signal any process
    passed on at the same boundary (with a step, or through `agree`), which is what all of them act on.
    A process that stopped alone would leave the others waiting at the next all-reduce forever.
    Enter it after jax.distributed.initialize, whose preemption notifier takes over SIGTERM otherwise.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.received, self.agreed = None, None
        self.previous = {}
        self._agree = jax.pmap(lambda signum: lax.pmax(signum, AXIS), axis_name=AXIS)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {s: signal.signal(s, self.record) for s in self.SIGNALS}
        return self

    def record(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def flags(self) -> np.ndarray:
        """This process's request for each of its devices (0: none), for a step to agree on."""
        return np.full(jax.local_device_count(), self.received or 0, np.int32)

    def agree(self) -> int | None:
        """Every process together (a collective): the largest signal any of them received, or None."""
        self.agreed = int(self._agree(self.flags())[0]) or None
        return self.agreed

    def __exit__(self, exception_type, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.previous and exception_type is Interrupted:
            # The work is saved and the process is about to exit 128 + signal; the other processes of a pod
            # may get their SIGTERM only now, and the default handler would turn the exit into a kill.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
