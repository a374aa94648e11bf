"""`python -m jaxgen.aot --config=CONFIG --topology=v5e:4x4 [--mesh=data=-1,fsdp=2] [--stage=generator]
[--sample_batch=N] [--num_slices=N] [--hbm_gib=G] [--out=FILE.json] [--config.<field>=...]` (docs/aot.md).

The command line of `jaxgen.aot`. Its flags live here, not in the package, so that importing `jaxgen.aot` (tests,
notebooks) defines no `--config` beside the other binaries'."""

from __future__ import annotations

import json
import logging as py_logging
import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgen import cli
from jaxgen.aot import (
    EXIT_DOES_NOT_FIT,
    TOPOLOGY_EXAMPLES,
    _gib,
    compile_for_topology,
    format_report,
    parse_mesh,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:variant]", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU topology, e.g. {TOPOLOGY_EXAMPLES}")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "slices of --topology (multi-slice over the data-center network)")
_MESH = flags.DEFINE_string("mesh", None, "AXIS=SIZE,... instead of config.parallel.mesh, e.g. data=-1,fsdp=2,tensor=1")
_STAGE = flags.DEFINE_list("stage", None, "stages to compile (default: config.stages), e.g. generator")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "sampler batch (default: the grid's; 0: no sampler)")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "GiB per device to hold the programs to (default: what XLA allows)")
_OUT = flags.DEFINE_string("out", None, "write the report as JSON to this file")


def run(config, source: str) -> int:
    """The binary's work: compile, print, write --out; returns the exit status (0, or EXIT_DOES_NOT_FIT)."""
    mesh_axes = parse_mesh(_MESH.value) if _MESH.value is not None else None
    if _OUT.value:
        out = Path(_OUT.value)
        cli.check_writable_dir(out.parent if str(out.parent) else Path("."), "--out")
    report = compile_for_topology(
        config,
        _TOPOLOGY.value,
        mesh_axes,
        _STAGE.value,
        num_slices=_NUM_SLICES.value,
        sample_batch=_SAMPLE_BATCH.value,
        hbm_gib=_HBM_GIB.value,
    )
    report = {"config": source, **report}
    print(format_report(report, source), flush=True)
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {_OUT.value}", flush=True)
    if report["fits"] is False:
        over = [p["name"] for p in report["programs"] if p.get("fits") is False]
        hw = report["hardware"]
        print(
            f"error: {', '.join(over)} do{'es' if len(over) == 1 else ''} not fit in {_gib(hw['hbm_bytes_per_device'])}"
            f" GiB of HBM per {hw['chip']} device ({hw['hbm_source']}): lower the batch (or raise accum_steps), shard "
            f"the params (--mesh with fsdp > 1) or use a bigger topology",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_DOES_NOT_FIT
    return 0


def _quiet_libraries(record) -> bool:
    """jaxgen's INFO lines (one per program compiled); other libraries' (optax, ...) from WARNING up only."""
    return record.levelno >= py_logging.WARNING or "jaxgen" in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    if "JAX_PLATFORMS" not in os.environ:  # nothing runs here: leave a local accelerator (e.g. a TPU VM's) alone
        import jax

        jax.config.update("jax_platforms", "cpu")
    source = config_flags.get_config_filename(flags.FLAGS["config"])
    sys.exit(cli.run_user_command(run, _CONFIG.value, source))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main, flags_parser=cli.parse_flags)
