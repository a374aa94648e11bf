"""Ahead-of-time compile of a config's real train step (and sampler) for a TPU topology, on a machine without one.

    python -m jaxgen.aot --config=configs/var_imagenet.py:d16 --topology=v5e:4x4
    python -m jaxgen.aot --config=configs/llamagen_imagenet.py:B --topology=v5p:2x2x1 --out=aot.json
    python -m jaxgen.aot --config=configs/digits_var.py:smoke --topology=v5e:2x2 --mesh=data=2,fsdp=2 \\
        --stage=generator --config.train_generator.batch_size=256 --sample_batch=8
    python -m jaxgen.aot --config=configs/var_imagenet.py:d30 --topology=v5e:16x16 --num_slices=2 --mesh=data=2,fsdp=-1

For each stage (default: the config's `stages`; `--stage=a,b` picks some) it builds the models, the stage's
`jaxgen.train.loop.plan_stage` (the train step `train_stage` runs, with its shardings and donated state) on the
topology's mesh (`parallel.mesh` of the config, or `--mesh`), lowers and compiles it for the TPU with abstract
inputs (nothing is allocated), then does the same for the stage's sampler (generator stages; batch `--sample_batch`,
default the config's grid). It prints, per program, the per-device memory of `compiled.memory_analysis()`
(arguments, outputs, temporaries, donated aliases), the FLOPs of `compiled.cost_analysis()` (per device), the
collectives in the compiled HLO by kind and the lower / compile times, and whether the peak fits the HBM the TPU
compiler lets a program use on that chip (`usable_hbm_bytes`, a little under the chip's in `CHIPS`; `--hbm_gib`
overrides). `--out=FILE.json` writes the same report.

Exit status: 0 when everything fits, 3 when a program does not fit (the report is still printed and written), 1
with one `error: ...` line on stderr for a topology JAX does not know, a mesh that does not divide the devices, a
config without a stage, a batch that does not split over the mesh, and the like; 2 for a bad flag.

Topology names are JAX's (`jax.experimental.topologies.get_topology_desc`): `<chip>:<AxB>` for the 2D tori (v2,
v3, v5e, v6e) and `<chip>:<AxBxC>` for the 3D ones (v4, v5p, tpu7x), in chips; e.g. v5e:4x4 is a v5litepod-16 (16
chips, 4 hosts), v4:2x2x2 a v4-16, v5p:2x2x1 a v5p-8. A device is a chip except on v2 / v3 / tpu7x (a TensorCore);
v4 is compiled as megacore (one device per chip), as Cloud TPU VMs run it. `--num_slices=N` compiles for N such
slices joined by the data-center network (the mesh's 'data' axis, else 'fsdp', spans the slices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from jaxgen import cli

GIB = 1 << 30
EXIT_DOES_NOT_FIT = 3
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v6e:4x4, v4:2x2x1, v4:2x2x2, v5p:2x2x1, v5p:2x2x2, v3:2x2, tpu7x:2x2x1"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # Cloud TPU's name
    hbm_gib: float  # HBM per chip
    cores: int  # TensorCores per chip (a JAX device is one core, or the whole chip when megacore)


# device_kind -> chip. HBM per chip from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/:
# v3 32 GiB, v4 32 GiB, v5e 16, v5p 95, v6e 32, tpu7x 192 GiB); v2: 16 GiB (8 per core), from "A Domain Specific
# Supercomputer for Training Deep Neural Networks" (the v2 page gives none).
CHIPS: dict[str, Chip] = {
    "TPU v2": Chip("v2", 16, 2),
    "TPU v3": Chip("v3", 32, 2),
    "TPU v4": Chip("v4", 32, 2),
    "TPU v5 lite": Chip("v5e", 16, 1),
    "TPU v5": Chip("v5p", 95, 2),
    "TPU v5p": Chip("v5p", 95, 2),
    "TPU v6 lite": Chip("v6e", 32, 1),
    "TPU7x": Chip("tpu7x", 192, 2),
}

_MEGACORE = {"v4"}  # compiled with one device per chip (chip_config_name="megacore"); v5p is megacore already
_NAME = re.compile(r"^\s*([A-Za-z0-9_ ]+)[=_:]((?:\d+x)+\d+)(_twisted|_untwisted)?\s*$")


# ---- the topology --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """Hold what C++ writes to stderr (fd 2) in a temp file and log it at debug level: libtpu's start-up warnings
    ("could not determine TPU accelerator type ...") mean nothing for a compile-only client."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            noise = tmp.read().decode(errors="replace").strip()
            if noise:
                logging.debug("libtpu's stderr while describing the topology:\n%s", noise)


def _bad_topology(name: str, why: str) -> ValueError:
    hint = ""
    if re.fullmatch(r"\s*v\w+-\d+\s*", name):
        hint = (
            " (that looks like a Cloud accelerator type, which counts chips or cores; give the chip grid instead, "
            "e.g. v5litepod-16 = v5e:4x4, v4-16 = v4:2x2x2, v5p-8 = v5p:2x2x1, v6e-16 = v6e:4x4)"
        )
    return ValueError(f"--topology={name}: {why}{hint}; valid examples: {TOPOLOGY_EXAMPLES}")


@functools.cache
def topology_devices(topology: str, num_slices: int = 1) -> tuple[Any, ...]:
    """The abstract devices of `num_slices` slices of the TPU topology `topology` (e.g. "v5e:4x4"): what a mesh is
    built from and jit compiles for, with no TPU attached. Raises ValueError (one line, with examples) for a name
    JAX does not know."""
    from jax.experimental import topologies

    if num_slices < 1:
        raise ValueError(f"--num_slices={num_slices}: must be at least 1")
    m = _NAME.match(topology)
    if not m:
        raise _bad_topology(topology, "not a TPU topology name <chip>:<AxB> or <chip>:<AxBxC>")
    chip, dims = m.group(1).strip().lower(), [int(d) for d in m.group(2).split("x")]
    if 0 in dims:
        raise _bad_topology(topology, "a dimension of 0")
    kwargs: dict[str, Any] = {}
    if chip in _MEGACORE:
        kwargs["chip_config_name"] = "megacore"
    dims3 = [*dims, 1, 1][:3]
    host = tuple(min(d, h) for d, h in zip(dims3, (2, 2, 1), strict=True))
    if host != (2, 2, 1) and all(d % h == 0 for d, h in zip(dims3, host, strict=True)):
        kwargs["chips_per_host_bounds"] = host  # fewer than 2x2 chips: one host holds them all
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    from jaxgen.tpu_library import use_side_installed_libtpu

    if use_side_installed_libtpu() is None:
        raise ValueError(
            "no TPU compiler (libtpu) here: run `make setup` (it installs libtpu into .venv/libtpu), or `pip install "
            "libtpu` (the version jax[tpu] pins), or set TPU_LIBRARY_PATH to a libtpu.so"
        )
    # A compile-only client opens no TPU: let several processes load libtpu at once (else the second one fails on
    # /tmp/libtpu_lockfile, e.g. this tool while a test process or another compile holds it).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _stderr_to_log():
            desc = topologies.get_topology_desc(topology.strip(), platform="tpu", **kwargs)
    except Exception as e:  # JaxRuntimeError: "INVALID_ARGUMENT: Invalid TPU external name: TPU v9"
        text = cli.one_line(str(e)).removeprefix("INVALID_ARGUMENT: ")
        raise _bad_topology(topology, f"JAX does not know it ({text})") from None
    return tuple(desc.devices)


_AVAILABLE = re.compile(r"exceeds available HBM \((?P<have>[\d.]+)(?P<hu>[KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}
_usable: dict[tuple[str, int], int | None] = {}


def usable_hbm_bytes(device: Any) -> int | None:
    """The HBM XLA lets one program use on `device` (a little under the chip's: the runtime keeps some), read off
    the error of compiling a program that needs 768 GiB of temporaries (fractions of a second; cached per kind).
    None when the compiler says something else."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    key = (device.device_kind, int(getattr(device, "num_cores", 1) or 1))
    if key not in _usable:
        n = 1 << 18
        x = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=SingleDeviceSharding(device))
        probe = jax.jit(lambda x: jnp.sort(jnp.broadcast_to(x, (n, n)) * x[:, None], axis=0))
        try:
            probe.lower(x).compile()
            _usable[key] = None
        except jax.errors.JaxRuntimeError as e:
            m = _AVAILABLE.search(str(e))
            _usable[key] = int(float(m["have"]) * _UNITS[m["hu"]]) if m else None
    return _usable[key]


def chip_of(devices: Sequence[Any], hbm_gib: float | None = None) -> dict:
    """What the report says about the hardware: chip, devices, hosts, slices; HBM per device in bytes: the chip's
    (`CHIPS`, None for a chip not in it), what XLA lets a program use (`usable_hbm_bytes`), and the limit the
    programs are held to (`hbm_gib` if given, else XLA's, else the chip's)."""
    d0 = devices[0]
    chip = CHIPS.get(d0.device_kind)
    cores_per_device = int(getattr(d0, "num_cores", 1) or 1)
    spec = None if chip is None else int(chip.hbm_gib * GIB * min(cores_per_device, chip.cores) / chip.cores)
    usable = usable_hbm_bytes(d0)
    if hbm_gib is not None:
        limit, source = int(float(hbm_gib) * GIB), "--hbm_gib"
    elif usable is not None:
        limit, source = usable, "XLA"
    else:
        limit, source = spec, "jaxgen.aot.CHIPS" if spec else None
    per_chip = 1 if chip is None else max(1, chip.cores // cores_per_device)
    return {
        "chip": chip.name if chip else d0.device_kind,
        "device_kind": d0.device_kind,
        "devices": len(devices),
        "chips": len(devices) // per_chip,
        "hosts": len({(getattr(d, "slice_index", 0), d.process_index) for d in devices}),
        "slices": len({getattr(d, "slice_index", 0) for d in devices}),
        "chip_hbm_bytes_per_device": spec,
        "usable_hbm_bytes_per_device": usable,
        "hbm_bytes_per_device": limit,
        "hbm_source": source,
    }


def parse_mesh(text: str) -> dict[str, int]:
    """'data=-1,fsdp=2,tensor=1' -> {'data': -1, 'fsdp': 2, 'tensor': 1} (the axes are checked by `mesh_shape`)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(f"--mesh={text}: expected AXIS=SIZE[,AXIS=SIZE...], e.g. data=-1,fsdp=2,tensor=1")
        axes[name.strip()] = int(value)
    return axes


def topology_mesh(axes: Mapping[str, int], devices: Sequence[Any]):
    """The ('data', 'fsdp', 'tensor') mesh of `axes` over the topology's devices: `create_mesh` for one slice; over
    several slices, a hybrid mesh whose 'data' axis (else 'fsdp') spans the slices."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from jaxgen.parallel import mesh as mesh_lib

    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return mesh_lib.create_mesh(axes, devices=devices)
    shape = mesh_lib.mesh_shape(axes, len(devices))
    dcn = [1] * len(shape)
    for i in range(len(shape) - 1):  # 'data', then 'fsdp': the axes whose traffic is once per step
        if shape[i] % slices == 0:
            dcn[i] = slices
            break
    else:
        sizes = dict(zip(mesh_lib.MESH_AXES, shape, strict=True))
        raise ValueError(
            f"mesh {sizes} over {slices} slices: neither 'data' nor 'fsdp' is a multiple of the {slices} slices, "
            f"so no axis can span them; make one of them a multiple of {slices}"
        )
    ici = [s // c for s, c in zip(shape, dcn, strict=True)]
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=list(devices))
    return Mesh(np.asarray(grid), mesh_lib.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


# ---- what a compiled program reports -------------------------------------------------------------------------------


_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """The collective instructions of an HLO module's text by kind (an async pair `*-start` / `*-done` counts
    once; a collective inside a loop body counts once, whatever the trip count)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        _, eq, rhs = line.partition(" = ")
        if not eq:
            continue
        m = _OPCODE.search(" " + rhs)
        if m is None:
            continue
        op = m.group(1).removesuffix("-start")
        if op in counts:
            counts[op] += 1
    return counts


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def program_report(compiled, *, hbm_bytes: int | None, lower_s: float, compile_s: float) -> dict:
    """Per-device memory, FLOPs, collectives and times of a compiled program, and whether it fits `hbm_bytes`."""
    mem = compiled.memory_analysis()
    memory = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),  # outputs written into donated arguments
        "temp_bytes": int(mem.temp_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
    }
    memory["peak_bytes"] = (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
        + memory["generated_code_bytes"]
    )
    cost = _cost(compiled)
    text = compiled.as_text()
    out = {
        "memory": memory,
        "flops_per_device": float(cost.get("flops", 0.0)),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "collectives": count_collectives(text),
        "pallas_kernels": text.count('custom_call_target="tpu_custom_call"'),  # Mosaic kernels in the program
        "lower_s": round(lower_s, 3),
        "compile_s": round(compile_s, 3),
    }
    if hbm_bytes:
        out["hbm_fraction"] = round(memory["peak_bytes"] / hbm_bytes, 4)
        out["fits"] = memory["peak_bytes"] <= hbm_bytes
    else:
        out["hbm_fraction"], out["fits"] = None, None
    return out


_OOM = re.compile(
    r"required for (?P<what>[\w \-]+?) \((?P<need>[\d.]+)(?P<nu>[KMGT]?)\) exceeds available HBM "
    r"\((?P<have>[\d.]+)(?P<hu>[KMGT]?)\)"
)


class DoesNotFit(Exception):
    """XLA refused to compile: the program needs more HBM than the chip has (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, lower_s: float, compile_s: float):
        super().__init__(message)
        self.lower_s, self.compile_s = lower_s, compile_s

    def report(self) -> dict:
        """What the report says instead of the memory analysis: the compiler's numbers, when its message has them."""
        text = str(self)
        m = _OOM.search(text)
        out: dict[str, Any] = {"fits": False, "compile_error": cli.one_line(text, 600)}
        if m:
            out["oom"] = {
                "what": m["what"],
                "required_bytes": int(float(m["need"]) * _UNITS[m["nu"]]),
                "available_bytes": int(float(m["have"]) * _UNITS[m["hu"]]),
            }
        return {**out, "lower_s": round(self.lower_s, 3), "compile_s": round(self.compile_s, 3)}


def _lower_and_compile(lower) -> tuple[Any, float, float]:
    import jax

    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(str(e), t1 - t0, time.perf_counter() - t1) from None
    return compiled, t1 - t0, time.perf_counter() - t1


# ---- the kernels: Pallas TPU, not interpret mode -------------------------------------------------------------------


@contextlib.contextmanager
def tpu_kernels() -> Iterator[None]:
    """While tracing for a TPU from a CPU host: the models' attention (`jaxgen.models.attention`) picks the Pallas
    kernels' real TPU lowering (not interpret mode, which it picks when JAX's default backend is the CPU), and the
    block-sparse op its TPU kernel (it chooses by `jax.default_backend()` otherwise). Only matters for
    `attn_backend='pallas'`."""
    import pallas_kernels.block_sparse_attention as bsa
    from jaxgen.models import attention

    saved = attention._platform, bsa.block_sparse_attention
    attention._platform = lambda: "tpu"
    bsa.block_sparse_attention = functools.partial(saved[1], backend="tpu")
    try:
        yield
    finally:
        attention._platform, bsa.block_sparse_attention = saved


# ---- a config's stages ---------------------------------------------------------------------------------------------


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


def _batch_shards(sharding) -> int:
    spec = sharding.spec[0] if len(sharding.spec) else None
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _select_stages(config, family, stages: Sequence[str] | None) -> list[str]:
    known = ["tokenizer", *[s.name for s in family.generator_stages()]]
    chosen = list(stages) if stages else list(config.get("stages", ()))
    if not chosen:
        raise ValueError(
            f"the config has no stages to compile (config.stages is empty or missing): set config.stages or pass "
            f"--stage, one of {tuple(known)}"
        )
    bad = [s for s in chosen if s not in known]
    if bad:
        raise ValueError(f"stages {bad} are not stages of family {family.name!r}: choose from {tuple(known)}")
    if "tokenizer" in chosen and not family.trains_tokenizer:
        raise ValueError(f"family {family.name!r} models pixels: its tokenizer has no train step; drop 'tokenizer'")
    missing = [f"train_{s}" for s in chosen if f"train_{s}" not in config]
    if missing:
        raise ValueError(f"the config has no {', '.join(missing)} section for the stages {chosen}: add it")
    return chosen


def _train_step(plan, batch: dict, frozen: Any, mesh, rules, hbm: int | None) -> dict:
    from jaxgen.parallel import partition

    frozen_abstract = None if frozen is None else _with_shardings(frozen, plan.frozen_shardings)
    try:
        with partition.activation_rules(mesh, rules), tpu_kernels():
            step = plan.jit_step()
            compiled, lower_s, compile_s = _lower_and_compile(
                lambda: step.lower(plan.abstract_state, batch, frozen_abstract)
            )
    except DoesNotFit as e:
        return e.report()
    return program_report(compiled, hbm_bytes=hbm, lower_s=lower_s, compile_s=compile_s)


def _sampler_program(family, generator, tokenizer, tok_abstract, settings, batch, mesh, rules, hbm) -> dict:
    """The stage's sampler (`ClassConditionalSampler`'s jitted function) for `batch` labels: generator params
    sharded as training shards them, tokenizer params and key replicated, labels split over the batch axes (when
    they divide)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxgen.parallel import partition

    sampler = family.sampler(generator, tokenizer, settings)
    fn = getattr(sampler, "_fn", None)
    if fn is None:
        raise TypeError(f"{type(sampler).__name__} has no jitted `_fn` to lower (not a ClassConditionalSampler)")
    boxed = partition.abstract_boxed_params(generator, jax.random.key(0), *family.generator_inputs(generator))
    gen = _with_shardings(partition.strip_boxes(boxed), partition.tree_shardings(boxed, mesh, rules))
    replicated = NamedSharding(mesh, P())
    tok = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), tok_abstract)
    label_spec = partition.fit_spec(partition.batch_sharding(mesh, rules, 1).spec, (batch,), mesh)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, label_spec))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    try:
        with partition.activation_rules(mesh, rules), tpu_kernels():
            compiled, lower_s, compile_s = _lower_and_compile(lambda: fn.lower(gen, tok, labels, key))
    except DoesNotFit as e:
        out = e.report()
    else:
        out = program_report(compiled, hbm_bytes=hbm, lower_s=lower_s, compile_s=compile_s)
    return {"batch": batch, "labels_split": _batch_shards(labels.sharding), **out}


def compile_for_topology(
    config,
    topology: str,
    mesh_axes: Mapping[str, int] | None = None,
    stages: Sequence[str] | None = None,
    *,
    num_slices: int = 1,
    sample_batch: int | None = None,
    hbm_gib: float | None = None,
) -> dict:
    """Compile `config`'s train steps (and samplers) for `topology` and report memory, FLOPs, collectives, times.

    `mesh_axes` replaces `config.parallel.mesh`; `stages` the config's stages; `sample_batch`: the sampler's batch
    (None: the grid's `len(classes) * per_class`; 0: no sampler); `hbm_gib`: HBM per device instead of the chip's.
    Returns the report (what `--out` writes): {"topology", "hardware", "mesh", "programs": [...], "fits"}; each
    program has "name", "stage", "kind" ('train_step' | 'sampler') and its numbers, or "error" when a sampler
    cannot be lowered (reported, not raised). Raises ValueError for a topology, mesh or config that cannot work."""
    import jax
    import jax.numpy as jnp

    from jaxgen.families import family_models, model_sections, param_shapes
    from jaxgen.models.lpips import lpips_param_shapes
    from jaxgen.parallel.rules import rules_from_config
    from jaxgen.train import checks
    from jaxgen.train.generator_task import generator_task
    from jaxgen.train.loop import _class_grid_labels, plan_stage
    from jaxgen.train.tokenizer_task import TokenizerLossConfig, tokenizer_task

    family, sections = model_sections(config)
    chosen = _select_stages(config, family, stages)
    cli.require_sections(config, ["parallel", "data"], "the config")
    devices = topology_devices(topology, num_slices)
    hardware = chip_of(devices, hbm_gib)
    hbm = hardware["hbm_bytes_per_device"]
    axes = dict(mesh_axes) if mesh_axes is not None else dict(config.parallel.mesh)
    try:
        mesh = topology_mesh(axes, devices)
    except ValueError as e:
        where = "--mesh" if mesh_axes is not None else "config.parallel.mesh"
        text = str(e).replace(" (jax.device_count())", "")
        raise ValueError(f"{where} on --topology={topology} ({len(devices)} devices): {text}") from None
    rules = rules_from_config(config.parallel.rules)
    batch_rule = dict(rules).get("batch")
    batch_axes = () if batch_rule is None else (batch_rule,) if isinstance(batch_rule, str) else tuple(batch_rule)
    batch_sizes = {a: int(mesh.shape[a]) for a in batch_axes}
    generating = [s for s in chosen if s != "tokenizer"]
    inference_tok, generator = family_models(family, sections)
    family.check(inference_tok, generator if generating else None, int(config.data.image_size))

    report: dict[str, Any] = {
        "family": family.name,
        "topology": topology,
        "num_slices": num_slices,
        "hardware": hardware,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "jax": jax.__version__,
        "programs": [],
    }
    image_size = int(config.data.image_size)
    for stage_name in chosen:
        tc = config[f"train_{stage_name}"]
        checks.check_train_section(tc, f"train_{stage_name}", batch_sizes, num_processes=hardware["hosts"])
        b = int(tc.batch_size)
        if stage_name == "tokenizer":
            t = config.train_tokenizer
            tokenizer, _ = family_models(family, sections, tokenizer_dtype=t.compute_dtype, training=True)
            loss_cfg = TokenizerLossConfig.from_section(config.get("tokenizer_loss"))
            frozen = {"lpips": lpips_param_shapes()} if loss_cfg.perceptual_weight > 0 else None
            task = tokenizer_task(tokenizer, loss_cfg, image_size=image_size, frozen=frozen)
            data = {"image": jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)}
        else:
            stage = next(s for s in family.generator_stages() if s.name == stage_name)
            plain_tok, gen = family_models(family, sections, generator_dtype=tc.compute_dtype)
            shapes = param_shapes(family, inference_tok, generator)
            frozen = shapes[family.tokenizer_key] if family.trains_tokenizer else {}
            # A later stage starts from the previous stage's export (`stage.start`); the train step reads only the
            # shapes, which are the fresh init's: compile from the fresh init instead of materialising those params.
            plan_as = dataclasses.replace(stage, start=None)
            task = generator_task(family, plain_tok, gen, frozen, plan_as)
            images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
            ids = jax.eval_shape(
                lambda p, x: inference_tok.apply({"params": p}, x, method="encode_ids"), frozen, images
            )
            data = {"tokens": jax.ShapeDtypeStruct((b, *ids.shape[1:]), jnp.int32)}
        plan = plan_stage(task, tc, mesh=mesh, rules=rules, seed=int(config.get("seed", 0)))
        data["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=plan.batch_shardings[k]) for k, v in data.items()}
        entry = {
            "name": f"{stage_name}/train_step",
            "stage": stage_name,
            "kind": "train_step",
            "batch": b,
            "batch_split": _batch_shards(plan.batch_shardings["label"]),
            "accum_steps": int(tc.accum_steps),
            "compute_dtype": str(tc.compute_dtype),
            "inputs": {k: list(v.shape) for k, v in data.items()},
            "params": sum(math.prod(x.shape) for x in jax.tree.leaves(plan.abstract_state.params)),
        }
        logging.info("compiling %s for %s", entry["name"], topology)
        entry.update(_train_step(plan, batch, frozen, mesh, rules, hbm))
        if entry.get("flops_per_device") and int(tc.accum_steps) > 1:
            # The micro-batches run in a lax.scan, whose body XLA's cost analysis counts once.
            entry["flops_per_device_step_estimate"] = entry["flops_per_device"] * int(tc.accum_steps)
        report["programs"].append(entry)

        if stage_name == "tokenizer" or sample_batch == 0 or "sampling" not in config:
            continue
        n = sample_batch if sample_batch is not None else len(_class_grid_labels(config, generator.config.num_classes))
        entry = {"name": f"{stage_name}/sampler", "stage": stage_name, "kind": "sampler"}
        logging.info("compiling %s for %s", entry["name"], topology)
        try:
            settings = stage.sampling(checks.plain_dict(config.sampling))
            entry.update(_sampler_program(family, gen, plain_tok, frozen, settings, n, mesh, rules, hbm))
        except Exception as e:  # a family's sampler that cannot be lowered generically: say so, keep the rest
            logging.debug("sampler of %s", stage_name, exc_info=True)
            entry.update(batch=n, error=f"{type(e).__name__}: {cli.one_line(str(e), 400)}")
        report["programs"].append(entry)

    verdicts = [p.get("fits") for p in report["programs"] if "error" not in p]
    report["fits"] = False if False in verdicts else (True if verdicts and None not in verdicts else None)
    return report


# ---- the binary ----------------------------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _size(n: float) -> str:
    """Bytes with a binary unit: 512B, 3.1K, 47.2M, 12.34G."""
    for unit, scale in (("G", GIB), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'G' else 1}f}{unit}"
    return f"{int(n)}B"


def _flops(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_report(report: dict, source: str = "") -> str:
    """The report as the lines the binary prints."""
    hw = report["hardware"]
    hbm = hw["hbm_bytes_per_device"]
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    slices = f" x {report['num_slices']} slices" if report["num_slices"] > 1 else ""
    lines = [
        f"{source or report['family']} on {report['topology']}{slices}: {hw['devices']} devices ({hw['chips']} "
        f"{hw['chip']} chips, {hw['hosts']} hosts), HBM per device {_gib(hw['chip_hbm_bytes_per_device'])} GiB "
        f"({_gib(hbm)} GiB the limit, from {hw['hbm_source']}); mesh {mesh}",
        f"{'program':<22}{'batch':>6}{'args':>9}{'out':>9}{'alias':>9}{'temp':>9}{'peak':>9}{'HBM%':>6}  {'fits':<5}"
        f"{'FLOP/dev':>9}{'lower s':>8}{'compile s':>10}  collectives",
    ]
    for p in report["programs"]:
        if "error" in p:
            lines.append(f"{p['name']:<22}{p.get('batch', ''):>6}  not compiled: {p['error']}")
            continue
        if "compile_error" in p:
            oom = p.get("oom")
            why = (
                f"XLA needs {_size(oom['required_bytes'])} for {oom['what']}, {_size(oom['available_bytes'])} available"
                if oom
                else p["compile_error"]
            )
            lines.append(f"{p['name']:<22}{p['batch']:>6}  NO: does not compile ({why}); lower {p['lower_s']:.1f} s")
            continue
        m = p["memory"]
        frac = "-" if p["hbm_fraction"] is None else f"{100 * p['hbm_fraction']:.0f}"
        fits = "-" if p["fits"] is None else "yes" if p["fits"] else "NO"
        coll = ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"
        estimate = p.get("flops_per_device_step_estimate")
        flops = f"~{_flops(estimate)}" if estimate else _flops(p["flops_per_device"])
        lines.append(
            f"{p['name']:<22}{p['batch']:>6}{_size(m['argument_bytes']):>9}{_size(m['output_bytes']):>9}"
            f"{_size(m['alias_bytes']):>9}{_size(m['temp_bytes']):>9}{_size(m['peak_bytes']):>9}{frac:>6}  {fits:<5}"
            f"{flops:>9}{p['lower_s']:>8.1f}{p['compile_s']:>10.1f}  {coll}"
        )
    lines.append(
        "memory per device (compiled.memory_analysis; peak = args + out - alias + temp + code); FLOPs per device "
        "(~: the scanned micro-batch's x accum_steps)"
    )
    if report["fits"] is None:
        lines.append(f"fits: unknown ({hw['device_kind']!r} is not in jaxgen.aot.CHIPS: pass --hbm_gib)")
    return "\n".join(lines)
