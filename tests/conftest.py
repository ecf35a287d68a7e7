"""Eight emulated CPU devices, set before anything imports jax."""
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"  # jax's own setting: it wins over any device count in XLA_FLAGS
# One persistent compilation cache for the session and the processes its tests start: most tests compile
# the same small programs again, and a cache hit takes a tenth of a compile here (16 s -> 4.4 s for a run).
# With pytest-xdist the main process sets it before its workers start, and they inherit it.
OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-compilation-cache-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
import xla_setup  # noqa: E402,F401

SHARED_EUROSAT = os.path.join(ROOT, "..", "shared", "eurosat", "EuroSAT_RGB")


def pytest_configure(config):
    config.addinivalue_line("markers", "draws_curves: the test's runs in this process draw curves.png as train.py "
                                       "does (without it, they skip the drawing)")


@pytest.fixture(autouse=True)
def curves_only_where_looked_at(request, monkeypatch):
    """A run's curves.png is about a second of matplotlib (a third of a short run in this process, and the
    suite makes dozens): runs in the tests' own processes skip it, except in tests marked draws_curves, which
    look at it. Runs in processes of their own (start_train, run_train, sweep.py) draw it as always."""
    if request.node.get_closest_marker("draws_curves") is None:
        import metrics
        monkeypatch.setattr(metrics, "write_curves", lambda path, records, config: None)


def pytest_sessionfinish(session):
    """The session's compilation cache goes with it, once any workers are done with it."""
    if OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The files of the slowest tests first: pytest-xdist hands tests to its workers in this order, so the many
# short ones at the end even out when the two workers finish.
SLOWEST_FIRST = ("test_faults.py", "test_train.py", "test_bench.py", "test_sweep.py", "test_batches.py",
                 "test_study.py", "test_model.py")


def pytest_collection_modifyitems(items):
    rank = {name: number for number, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: a file keeps its order
