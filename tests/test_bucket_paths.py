"""Bucket workdirs (gs://...): the paths stay URLs, and the small files a run writes (metrics.jsonl, grids) go
through epath's fsspec backend. Here 'gs' is an fsspec filesystem over a local folder: no network. Orbax's arrays go
through TensorStore's own GCS driver, which this cannot stand in for (docs/multi_process.md)."""

from __future__ import annotations

import json
import sys

import fsspec
import numpy as np
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from jaxgen.eval.grids import save_grid
from jaxgen.paths import as_path, host_cache_dir, is_url
from jaxgen.train.reporting import MetricsWriter


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://<anything> -> tmp_path/bucket/<anything>; XDG_CACHE_HOME in tmp_path."""
    root = tmp_path / "bucket"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = "gs"

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem())

        def _join(self, path):  # strip the scheme epath passes along
            if isinstance(path, str):
                path = path.removeprefix("gs://")
            return super()._join(path)

    fsspec.register_implementation("gcs", FakeGCS, clobber=True)  # epath asks fsspec for "gcs"
    FakeGCS.clear_instance_cache()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield root
    sys.modules["fsspec.registry"]._registry.pop("gcs", None)  # `fsspec.registry` is the read-only view


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    assert is_url("gs://b/run") and not is_url("/data/run")
    assert str(as_path("gs://b/run") / "generator") == "gs://b/run/generator"
    monkeypatch.chdir(tmp_path)
    assert str(as_path("run")) == str(tmp_path / "run")
    assert host_cache_dir("tokens", "gs://b/run") != host_cache_dir("tokens", "gs://b/other")


def test_metrics_and_grids_written_to_a_bucket(bucket, tmp_path):
    writer = MetricsWriter("gs://runs/a")
    writer.write(1, {"loss": 2.0}, stage="generator")
    writer.write(2, {"loss": 1.5}, stage="generator")
    writer.close()
    rows = [json.loads(x) for x in (bucket / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [2.0, 1.5]
    again = MetricsWriter("gs://runs/a")  # a resumed run keeps the earlier rows (no append on object stores)
    again.write(3, {"loss": 1.0}, stage="generator")
    again.close()
    assert len((bucket / "runs" / "a" / "metrics.jsonl").read_text().splitlines()) == 3
    assert any((tmp_path / "cache" / "jaxgen" / "tensorboard").iterdir())  # events: this host's disk
    save_grid(np.zeros((4, 8, 8, 3)), "gs://runs/a/samples/s.png", nrow=2)
    assert (bucket / "runs" / "a" / "samples" / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
