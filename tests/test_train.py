"""The train system end to end on the embedded digits: the binary's outputs, exact resume after a kill, the NaN
stop, bad input, and the train step's algebra (accumulation, sharding)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from jaxgen.config_util import load_config
from jaxgen.families import FAMILIES, build_models
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import partition
from jaxgen.parallel.rules import rules_from_config
from jaxgen.sample import init_or_load, sampling_key
from jaxgen.train.generator_task import generator_task
from jaxgen.train.loop import TrainingError, train_and_evaluate
from jaxgen.train.optim import make_optimizer
from jaxgen.train.state import create_state
from jaxgen.train.step import LossContext, make_train_step
from jaxgen.train.tokenizer_task import tokenizer_task

REPO = Path(__file__).resolve().parents[1]


def _tiny_var(steps_tok=6, steps_gen=6, **data):
    """digits_var:smoke made smaller still: the tests' model."""
    cfg = load_config(str(REPO / "configs/digits_var.py:smoke"))
    cfg.vae.update(ch=32, vocab_size=32, z_channels=8)
    cfg.var.update(depth=1, embed_dim=32, num_heads=2)
    for name, steps in (("train_tokenizer", steps_tok), ("train_generator", steps_gen)):
        cfg[name].update(steps=steps, batch_size=16, log_every=2, ckpt_every=2, sample_every=0, keep_checkpoints=3)
    cfg.data.update(data)
    return cfg


def _run_main(args, log: Path | None = None):
    """Start the binary; output to a pipe (read it with communicate()) or, for runs that are waited on or killed,
    to the file `log` (a pipe that nobody reads would fill and block the child)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "jaxgen.main", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
    )


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalars in the event files under `logdir`, read as TFRecords with
    tensorboardX's Event proto (tensorboard itself, with its reader, is not a dependency)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos + 12 <= len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])  # after length + its crc
            pos += 12 + length + 4  # the data's crc
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return scalars


def _run_sample(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxgen.sample", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


# digits_var runs long enough for its samples to be recognisable: 200 tokenizer + 300 generator steps reached a class
# fidelity of 0.94 (chance: 0.1) on a 2-core CPU (seed 0, 2 x 80 samples); 120 + 200 steps reached 0.36.
_RUNS = {
    "digits_var": dict(steps=(200, 300), min_fidelity=0.6),
    "digits_llamagen": dict(steps=(10, 10), min_fidelity=None),  # the smoke variant: plumbing only
    "digits_maskgit": dict(steps=(10, 10), min_fidelity=None),  # the smoke variant: plumbing only
    "digits_hmar": dict(steps=(10, 10), min_fidelity=None),  # the smoke variant, both stages: plumbing only
}


@pytest.mark.parametrize("name", sorted(_RUNS))
def test_binary_trains_and_its_workdir_samples(tmp_path, name):
    """The binary end to end: checkpoints, PNGs, metrics.jsonl with step + metric names, TensorBoard events, a report
    and the generator export; VAR's samples are classified as the class they were asked for well above chance. Then
    `jaxgen.sample` in another process, with the same config and `--config.checkpoint=<workdir>`, draws the same
    tokens as the in-process sampler with the same key, from the exported EMA params. The digits FID is logged at
    eval.every and at the end (metrics.jsonl and TensorBoard) and reported above its real-data floor."""
    run = _RUNS[name]
    steps_tok, steps_gen = run["steps"]
    fid_every = steps_gen // 2  # two digits-FID evals of 20 samples (the smoke's eval.fid_samples: one grid)
    overrides = [
        f"--config.train_tokenizer.steps={steps_tok}", f"--config.train_generator.steps={steps_gen}",
        f"--config.train_tokenizer.ckpt_every={steps_tok}", f"--config.train_generator.ckpt_every={steps_gen}",
        "--config.train_tokenizer.log_every=5", "--config.train_generator.log_every=5",
        "--config.train_tokenizer.sample_every=0", "--config.train_generator.sample_every=0",
        "--config.eval.sample_batches=2", f"--config.eval.every={fid_every}",
    ]  # fmt: skip
    workdir = tmp_path / "run"
    proc = _run_main([f"--config=configs/{name}.py:smoke", *overrides, f"--workdir={workdir}"])
    err, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["generator"]["num_samples"] == 40 and report["generator"]["num_nonfinite"] == 0
    assert report["generator"]["classifier_accuracy_real"] > 0.85
    if run["min_fidelity"] is not None:
        assert report["generator"]["class_fidelity"] >= run["min_fidelity"], report["generator"]
    assert "psnr" in report["tokenizer"]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    stages = [
        "tokenizer",
        *(s.name for s in FAMILIES[load_config(str(REPO / f"configs/{name}.py")).family].generator_stages()),
    ]
    assert {x for s in stages for x in (s, f"{s}_eval")} == {x["stage"] for x in lines}
    for later in stages[2:]:  # HMAR's "mask": its report, digits-FID evals, checkpoints and grid as well
        assert report[later]["num_samples"] == 40 and f"{later}_eval" in [x["stage"] for x in lines]
        assert (workdir / later / "export" / "config.json").is_file() and (workdir / later / "samples").is_dir()
    assert all("step" in x and "loss" in x for x in lines if not x["stage"].endswith("_eval"))
    fid_rows = [x for x in lines if x["stage"] == "generator_eval"]
    assert [x["step"] for x in fid_rows] == [fid_every, steps_gen], fid_rows
    assert all(x["num_samples"] == 20 and x["digits_fid"] > 0 and x["digits_fid_real_floor"] > 0 for x in fid_rows)
    gen = report["generator"]
    floor = gen["digits_fid_real_floor"]
    assert gen["digits_fid_classifier_accuracy"] > 0.9 and "fid_inception" not in gen  # smoke: no Inception FID
    if run["min_fidelity"] is not None:
        # 300 steps: 67 at step 150 -> 10.2 at 300 (20 samples; the floor of 20 real: 15 +- 3.4); the report's 40
        # samples 10.3, the floor of 40 real 9.7 +- 1.7: as good as real digits, within the floor's spread
        assert fid_rows[-1]["digits_fid"] < 0.5 * fid_rows[0]["digits_fid"], fid_rows
        assert floor < gen["digits_fid"] + 3 * gen["digits_fid_real_floor_std"] and gen["digits_fid"] < 2 * floor, gen
    else:  # 10 steps: noise-like samples (~320; the floor ~10)
        assert gen["digits_fid"] > 10 * floor and all(x["digits_fid"] > 10 * floor for x in fid_rows), gen
    assert [set(x) >= {"psnr", "ssim", "codebook_usage"} for x in lines if x["stage"] == "tokenizer_eval"] == [True]
    assert any("psnr" in x and "codebook_usage" in x for x in lines if x["stage"] == "tokenizer")
    for stage, steps in (("tokenizer", steps_tok), ("generator", steps_gen)):
        assert ocp.CheckpointManager(workdir / stage / "checkpoints").latest_step() == steps
        assert len(list((workdir / stage / "samples").glob("*.png"))) == 1  # sample_every=0: the final grid only
        assert (workdir / stage / "export" / "config.json").is_file()
    tb = _tensorboard_scalars(workdir / "tensorboard")
    assert [step for step, _ in tb["generator_eval/digits_fid"]] == [fid_every, steps_gen]
    assert [v for _, v in tb["generator_eval/digits_fid"]] == pytest.approx([x["digits_fid"] for x in fid_rows])
    assert "generator/loss" in tb and "tokenizer_eval/psnr" in tb
    assert (workdir / "final_samples.png").is_file()
    assert "parameters:" in err and "total:" in err and "steps/s" in err

    out = tmp_path / "samples"
    res = _run_sample([f"--config=configs/{name}.py:smoke", f"--config.checkpoint={workdir}", f"--workdir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "grid.png").is_file()
    cfg = load_config(str(REPO / f"configs/{name}.py:smoke"))
    cfg.checkpoint = str(workdir)
    family, tokenizer, generator, params = init_or_load(cfg)
    labels = np.repeat(np.asarray(cfg.grid.classes, np.int32), cfg.grid.per_class)
    sampler = family.sampler(generator, tokenizer, cfg.sampling.to_dict())
    ours = sampler(params[family.generator_key], params[family.tokenizer_key], labels, sampling_key(cfg))
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["labels"], labels)
        np.testing.assert_array_equal(f["tokens"], np.asarray(ours.token_arrays()["tokens"]))
    # the export holds the EMA params of the final step, not the raw ones
    _, final = _final_params(workdir, stages[-1])  # the last stage's export is what jaxgen.sample reads
    ema = final["ema_params"]
    exported = params[family.generator_key]
    for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(exported), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _final_params(workdir: Path, stage: str):
    with ocp.CheckpointManager(workdir / stage / "checkpoints") as mngr:
        step = mngr.latest_step()
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]


def test_kill_and_resume_is_bit_exact(tmp_path):
    """Kill a run (SIGKILL, possibly mid-save) after its first checkpoint, rerun: the final state equals the
    state of an uninterrupted run bit for bit (CPU), data order included."""
    steps = 30
    overrides = [
        "--config.stages=('tokenizer',)", f"--config.train_tokenizer.steps={steps}",
        "--config.train_tokenizer.ckpt_every=5", "--config.train_tokenizer.log_every=5",
        "--config.train_tokenizer.sample_every=0", "--config.train_tokenizer.batch_size=16",
        "--config.vae.ch=32", "--config.vae.vocab_size=32",
    ]  # fmt: skip
    base = ["--config=configs/digits_var.py:smoke", *overrides]
    ref = _run_main([*base, f"--workdir={tmp_path / 'ref'}"], log=tmp_path / "ref.log")
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    killed = _run_main([*base, f"--workdir={tmp_path / 'resumed'}"], log=tmp_path / "killed.log")
    ckpts = tmp_path / "resumed" / "tokenizer" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    first = ocp.CheckpointManager(ckpts).latest_step()
    assert first is not None and first < steps, f"the run was not interrupted (latest step {first})"
    resumed = _run_main([*base, f"--workdir={tmp_path / 'resumed'}"])
    err, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from step" in err

    step_a, a = _final_params(tmp_path / "ref", "tokenizer")
    step_b, b = _final_params(tmp_path / "resumed", "tokenizer")
    assert step_a == step_b == steps
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _tiny_var(steps_tok=4)
    cfg.stages = ("tokenizer",)
    train_and_evaluate(cfg, tmp_path)  # 4 good steps, checkpointed
    cfg.train_tokenizer.update(steps=12, lr=1e30, warmup_steps=0)  # same optimizer chain, absurd step size
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*last good checkpoint \(step \d+\)"):
        train_and_evaluate(cfg, tmp_path)
    _, state = _final_params(tmp_path, "tokenizer")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_workdir_of_another_model_is_refused_untouched(tmp_path):
    cfg = _tiny_var(steps_tok=2)
    cfg.stages = ("tokenizer",)
    train_and_evaluate(cfg, tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    model_json = (tmp_path / "tokenizer" / "model.json").read_text()
    cfg.vae.vocab_size = 64
    with pytest.raises(ValueError, match=r"different model.*vae\.vocab_size: 32 -> 64.*Nothing was overwritten"):
        train_and_evaluate(cfg, tmp_path)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "tokenizer" / "model.json").read_text() == model_json


def test_image_size_that_does_not_fit_the_tokenizer(tmp_path):
    cfg = _tiny_var(image_size=32)
    with pytest.raises(ValueError, match=r"data.image_size=32 does not fit the tokenizer.*= 16 px"):
        train_and_evaluate(cfg, tmp_path)
    assert not any(tmp_path.iterdir())
    cfg = load_config(str(REPO / "configs/digits_llamagen.py:smoke"))
    cfg.data.image_size = 24
    with pytest.raises(ValueError, match=r"image_size=24 gives 36 tokens per image but gpt\.block_size=16"):
        train_and_evaluate(cfg, tmp_path)


def test_misspelled_override_is_named():
    proc = _run_main(["--config=configs/digits_var.py:smoke", "--workdir=/tmp/unused", "--config.train_tokenizr.lr=1"])
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "train_tokenizr" in err


def test_missing_data_folder_is_a_clear_error(tmp_path):
    cfg = _tiny_var(source=dict(kind="folder", path=str(tmp_path / "nope")))
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- the step's algebra -----------------------------------------------------------------------------------------


def _var_generator_setup(batch_size=16, seed=0, attn_backend="xla", scan_layers=False):
    cfg = _tiny_var()
    cfg.var.attn_backend = attn_backend
    cfg.var.scan_layers = scan_layers
    cfg.var.depth = 2 if scan_layers else cfg.var.depth
    family, tok, gen = build_models(cfg)
    task = generator_task(family, tok, gen)
    tok_params = tok.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
    tok_params = nn.unbox(tok_params)
    rng = np.random.default_rng(seed)
    seq = sum(p * p for p in cfg.vae.patch_nums)
    batch = {
        "tokens": jnp.asarray(rng.integers(0, cfg.vae.vocab_size, (batch_size, seq)), jnp.int32),
        "label": jnp.asarray(rng.integers(0, 10, (batch_size,)), jnp.int32),
    }
    return cfg, task, tok_params, batch


def _init_state(task, tc, seed=0):
    tx = make_optimizer(tc)
    key = jax.random.key(seed)
    params, model_state = nn.unbox(task.init(key))
    return tx, create_state(params, tx, jax.random.key_data(jax.random.fold_in(key, 1)), model_state)


def test_gradient_accumulation_matches_one_big_batch():
    """2 micro-batches of 8 == one batch of 16 (label dropout off so both see the same labels): the update differs
    only by float32 summation order (tolerance 1e-5 relative on params after 2 steps)."""
    cfg, task, tok_params, batch = _var_generator_setup()
    cfg.var.cond_drop_rate = 0.0
    family, tok, gen = build_models(cfg)
    task = generator_task(family, tok, gen)
    tc = cfg.train_generator
    tx, state = _init_state(task, tc)
    outs = []
    for accum in (1, 2):
        step = jax.jit(make_train_step(task.loss_fn, tx, ema_decay=0.9, accum_steps=accum))
        s = state
        for _ in range(2):
            s, m = step(s, batch, tok_params)
        outs.append((s, m))
    (s1, m1), (s2, m2) = outs
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn_backend,scan_layers", [("xla", False), ("pallas", False), ("xla", True)])
def test_sharded_step_equals_single_device_step(attn_backend, scan_layers):
    """A data=2 x fsdp=2 x tensor=2 step on 8 CPU devices gives the loss and params of the single-device step.
    Tolerance: 1e-5 relative / 1e-6 absolute, for float32 sums split across devices in another order; params are
    checked to be sharded as the rules say (the fsdp rule splits 'embed' dims). With the Pallas attention (interpret
    mode) the kernel runs per device under shard_map inside the sharded step. Scanned (2 blocks stacked), the
    block params keep their leading 'layers' axis replicated and their other dims sharded as unrolled."""
    cfg, task, tok_params, batch = _var_generator_setup(attn_backend=attn_backend, scan_layers=scan_layers)
    tc = cfg.train_generator
    tx, state = _init_state(task, tc)
    step = make_train_step(task.loss_fn, tx, ema_decay=0.9)
    single_state, single_m = jax.jit(step)(state, batch, tok_params)

    mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = rules_from_config(cfg.parallel.rules)
    key = jax.random.key(0)

    def init_boxed():
        params, model_state = task.init(key)
        return create_state(params, tx, jax.random.key_data(jax.random.fold_in(key, 1)), model_state)

    shardings = partition.tree_shardings(partition.abstract_boxed(init_boxed), mesh, rules)
    sharded = jax.device_put(state, shardings)
    sharded_batch = partition.shard_batch(jax.device_get(batch), mesh, rules)
    with partition.activation_rules(mesh, rules):
        new_state, m = jax.jit(step, out_shardings=(shardings, None))(sharded, sharded_batch, tok_params)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(new_state.params)}
    assert any("fsdp" in s for s in specs), specs
    assert any("tensor" in s for s in specs), specs
    if scan_layers:
        fc1 = new_state.params["blocks"]["ffn"]["fc1"]["kernel"]
        assert fc1.shape[0] == 2 and tuple(fc1.sharding.spec) == (None, "fsdp", "tensor"), fc1.sharding.spec
    np.testing.assert_allclose(m["loss"], single_m["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(single_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_tokenizer_task_reports_reconstruction_metrics():
    cfg = _tiny_var()
    _, tok, _ = build_models(cfg, training=True)
    task = tokenizer_task(tok)
    params, model_state = nn.unbox(task.init(jax.random.key(0)))
    img = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
    ctx = LossContext(rng=jax.random.key(1), step=jnp.int32(0), frozen=None, model_state=model_state)
    loss, (m, _) = task.loss_fn(params, {"image": img}, ctx)
    rec, vq_loss, _ = tok.apply({"params": params["tokenizer"]}, img)
    np.testing.assert_allclose(m["rec_loss"], np.mean(np.abs(np.asarray(rec) - np.asarray(img))), rtol=1e-6)
    np.testing.assert_allclose(loss, m["rec_loss"] + vq_loss, rtol=1e-6)
    mse = np.mean((np.clip(np.asarray(rec), -1, 1) - np.asarray(img)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(m["psnr"], np.mean(10 * np.log10(4 / mse)), rtol=1e-5)  # the mean per-image PSNR
    assert 0 < float(m["codebook_usage"]) <= 1


def test_generator_eval_scores_real_digits_as_faithful(tmp_path):
    """The eval plumbing (sampler output in [0, 1] -> classifier input in [-1, 1], labels, grid): real train-split
    digits standing in for the samples score near the classifier's real accuracy; shifted labels score low."""
    from jaxgen import data as data_lib
    from jaxgen.train.loop import _generator_eval, _real_digits

    cfg = _tiny_var()
    cfg.eval.sample_batches = 1
    real = data_lib.load_eval_arrays(cfg.data, cfg.data.train_split)
    labels = np.repeat(np.arange(10, dtype=np.int32), 4)
    picks = np.concatenate([np.flatnonzero(real["label"] == c)[:4] for c in range(10)])

    class RealDigits:  # returns real images for the requested labels, in the samplers' [0, 1] range
        def __init__(self, shift):
            self.shift = shift

        def __call__(self, gen_params, tok_params, want, key):
            assert np.array_equal(want, labels)
            idx = np.concatenate([np.flatnonzero(real["label"] == (c + self.shift) % 10)[:4] for c in range(10)])
            return type("Out", (), {"images": (real["image"][idx] + 1.0) / 2.0})()

    digits = _real_digits(cfg)  # fitted once, for both
    good = _generator_eval(cfg, RealDigits(0), None, None, labels, tmp_path, digits)
    bad = _generator_eval(cfg, RealDigits(1), None, None, labels, tmp_path, digits)
    assert len(picks) == 40 and good["num_samples"] == 40
    assert good["class_fidelity"] >= 0.9 and bad["class_fidelity"] <= 0.2
    # real digits: a digits FID about the floor; the same images drawn for the wrong labels: the same FID (FID does
    # not read labels, class fidelity does)
    assert 0 < good["digits_fid"] < 3 * good["digits_fid_real_floor"], good
    assert bad["digits_fid"] == pytest.approx(good["digits_fid"], rel=1e-4)
    assert (tmp_path / "final_samples.png").is_file()


def test_checkpoints_keep_latest_n_and_the_best(tmp_path):
    """keep=2 with losses 5, 1, 4, 3, 2 at steps 1..5: steps 4 and 5 (latest) and 2 (lowest loss) remain, and a
    restore brings back the state and the data iterator's position."""
    from jaxgen import data as data_lib
    from jaxgen.train import checkpoint as ckpt_lib

    cfg = _tiny_var()
    it = data_lib.make_train_iterator(cfg.data, global_batch_size=8, seed=0)
    mngr = ckpt_lib.make_manager(tmp_path, keep=2, best_metric="loss")
    for step, loss in enumerate([5.0, 1.0, 4.0, 3.0, 2.0], start=1):
        next(it)
        state = {"step": jnp.asarray(step, jnp.int32), "w": jnp.full((3,), float(step))}
        ckpt_lib.save_train_state(mngr, _Boxed(state), it, metrics={"loss": loss})
    assert sorted(mngr.all_steps()) == [2, 4, 5]
    expected_next = next(it)["label"]
    fresh = data_lib.make_train_iterator(cfg.data, global_batch_size=8, seed=0)
    target = jax.eval_shape(lambda: _Boxed({"step": jnp.zeros((), jnp.int32), "w": jnp.zeros((3,))}))
    restored = ckpt_lib.restore_train_state(mngr, target, fresh)
    assert int(restored.step) == 5 and np.allclose(restored.tree["w"], 5.0)
    np.testing.assert_array_equal(next(fresh)["label"], expected_next)
    mngr.close()


@jax.tree_util.register_pytree_node_class
class _Boxed:
    """A minimal state with a `.step` (what save_train_state reads) around a dict."""

    def __init__(self, tree):
        self.tree = tree

    @property
    def step(self):
        return self.tree["step"]

    def tree_flatten(self):
        return (self.tree,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0])
