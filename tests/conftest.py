"""Test setup: 8 fake CPU devices and float32-exact matmuls, set before JAX initialises its backend; and the
`needs_fixture(path)` marker: a test whose reference fixture is absent is skipped, or fails when
`JAXGEN_REQUIRE_FIXTURES=1` (CI sets it in .ci/run, so a missing ../shared cannot pass as a run of skips)."""

import os
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # after the XLA flags are set

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One BLAS thread per pytest worker (`make test` runs one worker per core): two workers with a thread per core
    # each oversubscribe the cores, and scipy's 2048-d sqrtm (FID) then takes 4x longer (64 s vs 15 s, measured).
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
REQUIRE_FIXTURES = "JAXGEN_REQUIRE_FIXTURES"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture is set up: every `needs_fixture(path)` path must exist, or the test is skipped (locally)
    or failed (with JAXGEN_REQUIRE_FIXTURES=1), naming the path and where the fixtures are looked for."""
    missing = [Path(p) for m in item.iter_markers("needs_fixture") for p in m.args if not Path(p).exists()]
    if not missing:
        return
    where = ", ".join(str(p) for p in missing)
    if os.environ.get(REQUIRE_FIXTURES, "") not in ("", "0"):
        pytest.fail(
            f"reference fixture missing: {where} ({REQUIRE_FIXTURES}=1 makes this a failure: put the shared/ "
            f"fixtures beside the clone, or point JAXGEN_SHARED at them)",
            pytrace=False,
        )
    pytest.skip(f"reference fixture missing: {where} (set JAXGEN_SHARED to the shared/ folder that holds fixtures/)")
