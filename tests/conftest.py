import atexit
import faulthandler
import os
import shutil
import tempfile

import pytest

# Multi-device code is tested on 8 simulated CPU devices; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests (and the CLIs and notebooks they start as subprocesses, which inherit the environment)
# build the same tiny presets and compile the same programs: one compilation cache for the run turns
# every repeat into a disk read. Fresh per run, so no test sees a previous run's executables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="vishwam_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A test that hangs ends its worker after this long, with every thread's traceback, instead of
# running into CI's limit. jax's GPU interpreter is the known case: when one simulated thread raises,
# the others wait at their barriers forever. The slowest test takes about two minutes on two cores.
TEST_DEADLINE_S = 600


@pytest.fixture(autouse=True)
def _deadline():
    faulthandler.dump_traceback_later(TEST_DEADLINE_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
