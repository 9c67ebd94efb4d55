"""check_vjp's shard_map setting on several forced CPU devices, run by
tests/test_check_vjp_zoo.py in a fresh process.

Usage: ``python tests/scripts/check_vjp_shard_cases.py N_DEVICES``. The device count is fixed
before jax is imported. Runs every case of ``vjp_zoo.shard_cases()`` (our batch_norm and a
synchronised batch norm, right; three wrong rules) through ``check_vjp(settings=["shard_map"])``
and prints one JSON object on its last line: ``{case: {"right": bool, "outcome": str}}``,
outcome ``"passed"`` or the failure's first two lines.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

N_DEV = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEV}"
)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the zoo

import jax  # noqa: E402
import vjp_zoo  # noqa: E402

from jaxninja.testing import check_vjp  # noqa: E402

assert jax.device_count() == N_DEV, jax.devices()


def outcome(case: vjp_zoo.Case) -> str:
    try:
        report = check_vjp(
            case.f, case.reference, *case.args, settings=["shard_map"], **case.options
        )
    except AssertionError as e:
        return "\n".join(str(e).splitlines()[1:3])
    return "passed" if report.checked == ("shard_map",) else f"not run: {report.not_applicable}"


results = {
    c.name: {"right": c.setting is None, "outcome": outcome(c)} for c in vjp_zoo.shard_cases()
}
print(json.dumps(results))
