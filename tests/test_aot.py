"""`jaxgen.aot`: a config's real train step and sampler, and the Pallas TPU kernels, compiled for a TPU topology on a
CPU-only machine (libtpu's compile-only client); the binary's fit / error exits. A tiny VAR keeps the compiles to a
few seconds each."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgen import aot

REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
# digits_var:smoke shrunk to a one-block VAR on a 16-code VQVAE; only the generator stage (the tokenizer's conv step
# takes far longer to compile).
TINY = [
    "--config=configs/digits_var.py:smoke",
    "--config.stages=('generator',)",
    "--config.var.depth=1",
    "--config.var.embed_dim=32",
    "--config.var.num_heads=2",
    "--config.vae.z_channels=4",
    "--config.vae.vocab_size=16",
    "--config.train_generator.batch_size=8",
]


@pytest.fixture(autouse=True)
def _libtpu():
    """libtpu (the TPU compiler) is needed: `make setup` installs it in .venv/libtpu. Without it these tests skip,
    or fail where fixtures are required (CI: JAXGEN_REQUIRE_FIXTURES=1)."""
    from jaxgen.tpu_library import use_side_installed_libtpu

    if use_side_installed_libtpu() is None:
        message = "libtpu is not installed (make setup puts it in .venv/libtpu): no TPU compiler"
        if os.environ.get("JAXGEN_REQUIRE_FIXTURES", "") not in ("", "0"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _tiny_config():
    spec = importlib.util.spec_from_file_location("digits_var", REPO / "configs" / "digits_var.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("smoke")
    cfg.stages = ("generator",)
    cfg.var.update(depth=1, embed_dim=32, num_heads=2)
    cfg.vae.update(z_channels=4, vocab_size=16)
    cfg.train_generator.batch_size = 8
    return cfg


def _aot(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen(
        [sys.executable, "-m", "jaxgen.aot", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _one_error_line(err: str) -> str:
    """stderr is one `error:` line besides jaxgen's progress log lines: no traceback, no libtpu start-up noise."""
    assert "Traceback" not in err, err[-3000:]
    log_line = re.compile(r"[IW]\d{4} .* (__init__|__main__)\.py:\d+\] ")  # jaxgen.aot's own progress lines
    lines = [x for x in err.splitlines() if x.strip() and not log_line.match(x)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def test_topologies_and_chips():
    def hbm(chip):  # GiB per device: the chip's, and what XLA lets a program use (a little less)
        return chip["chip_hbm_bytes_per_device"] / aot.GIB, round(chip["usable_hbm_bytes_per_device"] / aot.GIB, 2)

    v5e = aot.chip_of(aot.topology_devices("v5e:4x4"))
    assert (v5e["chip"], v5e["devices"], v5e["hosts"], hbm(v5e)) == ("v5e", 16, 4, (16, 15.75))
    assert (v5e["hbm_bytes_per_device"], v5e["hbm_source"]) == (v5e["usable_hbm_bytes_per_device"], "XLA")
    v4 = aot.chip_of(aot.topology_devices("v4:2x2x1"))  # megacore: one device per chip
    assert (v4["chip"], v4["devices"], hbm(v4)) == ("v4", 4, (32, 30.75))
    v3 = aot.chip_of(aot.topology_devices("v3:2x2"))  # one device per TensorCore
    assert (v3["devices"], v3["chips"], hbm(v3)) == (8, 4, (16, 15.48))
    v5p = aot.chip_of(aot.topology_devices("v5p:2x2x1"), hbm_gib=90)
    assert (v5p["chip"], v5p["devices"], hbm(v5p)) == ("v5p", 4, (95, 95.74))
    assert (v5p["hbm_bytes_per_device"], v5p["hbm_source"]) == (90 * aot.GIB, "--hbm_gib")
    assert aot.chip_of(aot.topology_devices("v5e:1x1"))["devices"] == 1
    two = aot.topology_devices("v5e:2x2", num_slices=2)
    assert aot.chip_of(two)["slices"] == 2
    mesh = aot.topology_mesh({"data": -1, "fsdp": 2}, two)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match=r"--topology=v9:2x2: JAX does not know it .*valid examples: v5e:2x2"):
        aot.topology_devices("v9:2x2")
    with pytest.raises(ValueError, match="looks like a Cloud accelerator type"):
        aot.topology_devices("v5litepod-16")
    assert aot.parse_mesh("data=-1, fsdp=2") == {"data": -1, "fsdp": 2}


def test_count_collectives_and_oom_message():
    hlo = """
  %all-gather-start = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %p), replica_groups={{0,1,2,3}}
  %all-gather-done = f32[16]{0} all-gather-done((f32[4]{0}, f32[16]{0}) %all-gather-start)
  %ar = f32[]{:T(128)} all-reduce(f32[]{:T(128)} %x), to_apply=%add
  %rs = f32[4]{0} reduce-scatter(f32[16]{0} %y), dimensions={0}
  %fusion = f32[4]{0} fusion(f32[4]{0} %all-reduce.1), kind=kLoop, calls=%fused_computation
"""
    assert aot.count_collectives(hlo) == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-to-all": 0,
        "collective-permute": 0,
    }
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (37.26G) "
        "exceeds available HBM (15.75G)."
    )
    report = aot.DoesNotFit(message, 1.0, 2.0).report()
    assert report["fits"] is False
    assert report["oom"] == {
        "what": "HLO temporaries",
        "required_bytes": int(37.26 * aot.GIB),
        "available_bytes": int(15.75 * aot.GIB),
    }


def test_train_step_and_sampler_compile_for_a_tpu_topology():
    report = aot.compile_for_topology(_tiny_config(), TOPOLOGY, {"data": 2, "fsdp": 2}, sample_batch=4)
    assert report["hardware"]["device_kind"] == "TPU v5 lite" and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    step, sampler = report["programs"]
    assert (step["name"], step["batch"], step["batch_split"]) == ("generator/train_step", 8, 4)
    assert step["inputs"] == {"tokens": [8, 30], "label": [8]}  # 1 + 4 + 9 + 16 ids per image
    assert sampler["name"] == "generator/sampler" and "error" not in sampler, sampler
    for p in (step, sampler):
        m = p["memory"]
        assert m["argument_bytes"] > 0 and m["peak_bytes"] > 0 and p["flops_per_device"] > 0, p
        assert p["fits"] is True and 0 < p["hbm_fraction"] < 0.01 and p["compile_s"] > 0
    # Params over fsdp=2: the step gathers them and reduce-scatters (or all-reduces) the gradients.
    assert step["collectives"]["all-gather"] + step["collectives"]["all-reduce"] > 0, step["collectives"]
    # The donated state comes back in place.
    assert step["memory"]["alias_bytes"] > 0
    assert report["fits"] is True
    text = aot.format_report(report, "tiny")
    assert "generator/train_step" in text and "yes" in text


def test_binary_exits_3_when_it_does_not_fit_and_one_line_errors(tmp_path):
    out = tmp_path / "aot.json"
    procs = {
        "small_hbm": _aot(*TINY, f"--topology={TOPOLOGY}", "--sample_batch=0", "--hbm_gib=1e-6", f"--out={out}"),
        "bad_topology": _aot(*TINY, "--topology=v5litepod:4x4"),
        "bad_mesh": _aot(*TINY, f"--topology={TOPOLOGY}", "--mesh=data=3"),
        "no_stage": _aot("--config=configs/var_tiny.py", f"--topology={TOPOLOGY}"),
    }
    results = {name: _finish(p) for name, p in procs.items()}

    rc, stdout, err = results["small_hbm"]
    assert rc == aot.EXIT_DOES_NOT_FIT, err[-3000:]
    assert "generator/train_step does not fit in 0.00 GiB of HBM per v5e device (--hbm_gib)" in _one_error_line(err)
    assert "generator/train_step" in stdout and " NO " in stdout
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["programs"][0]["fits"] is False
    assert report["config"] == "configs/digits_var.py:smoke" and report["hardware"]["hbm_source"] == "--hbm_gib"

    rc, _, err = results["bad_topology"]
    line = _one_error_line(err)
    assert rc == 1 and "--topology=v5litepod:4x4: JAX does not know it" in line and "v5e:4x4" in line, line

    rc, _, err = results["bad_mesh"]
    line = _one_error_line(err)
    assert rc == 1 and "--mesh on --topology=v5e:2x2 (4 devices)" in line and "needs 3 devices" in line, line

    rc, _, err = results["no_stage"]
    line = _one_error_line(err)
    assert rc == 1 and "no stages to compile" in line, line


def _custom_calls(compiled) -> int:
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def test_pallas_tpu_kernels_compile_forward_and_backward():
    """The block-sparse (VAR's scale-causal mask, GQA) and axial kernels' real TPU lowering (not interpret mode):
    forward and the two backward kernels per op, each device on its batch shard (Mosaic calls are not partitioned
    by XLA, so under shard_map as the models run them)."""
    from pallas_kernels.axial_attention import axial_attention
    from pallas_kernels.block_sparse_attention import block_sparse_attention
    from pallas_kernels.block_sparse_attention import mask as mask_lib

    mesh = aot.topology_mesh({"data": -1}, aot.topology_devices(TOPOLOGY))
    split = NamedSharding(mesh, P("data"))
    scale_causal = mask_lib.scale_causal((1, 2, 3, 4, 5, 6, 8, 10))  # 255 tokens, padded to 256

    def sharded(op):
        return jax.shard_map(op, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)

    def block_sparse_loss(q, k, v):
        op = sharded(lambda q, k, v: block_sparse_attention(q, k, v, scale_causal, backend="tpu"))
        return op(q, k, v).astype(jnp.float32).sum()

    def axial_loss(q, k, v):
        op = sharded(lambda q, k, v: axial_attention(q, k, v, axis="row", causal=True))
        return op(q, k, v).astype(jnp.float32).sum()

    q = jax.ShapeDtypeStruct((4, 4, 255, 64), jnp.bfloat16, sharding=split)
    kv = jax.ShapeDtypeStruct((4, 2, 255, 64), jnp.bfloat16, sharding=split)
    grid = jax.ShapeDtypeStruct((4, 2, 8, 8, 64), jnp.bfloat16, sharding=split)
    for loss, args in ((block_sparse_loss, (q, kv, kv)), (axial_loss, (grid, grid, grid))):
        # conftest sets jax_default_matmul_precision="highest", which the kernels' bf16 dots inherit and Mosaic
        # rejects ("Bad lhs type"); training runs at the default precision.
        with jax.default_matmul_precision("default"):
            lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args)
        assert lowered.as_text().count("tpu_custom_call") == 3, loss.__name__
        compiled = lowered.compile()
        assert _custom_calls(compiled) == 3, loss.__name__
        assert compiled.memory_analysis().argument_size_in_bytes > 0
