"""``logger: tensorboard``: the event files hold the same numbers as the JSON-lines files,
and the alpha images are the softmax(alpha) matrices that search/alphas.jsonl records."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import jsonl, tb_events

from diffnas.cli import main
from diffnas.config import ConfigError, load_config
from diffnas.report.plots import alpha_snapshot_image

pytest.importorskip("tensorboard", reason="pip install 'diffnas[tensorboard]'")

TINY_RUN = [
    "data.name=digits", "data.train_subset=48", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=2",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.epochs=1", "retrain.batch_size=16", "retrain.train_subset=48",
    "retrain.network={C: 4, layers: 3}", "retrain.auxiliary_weight=0", "retrain.cutout=0",
    "progress=false",
]


def test_tensorboard_logs_match_the_json_lines(tmp_path):
    import matplotlib.image as mpimg

    assert main(["search", f"out_dir={tmp_path}", "name=tb", "logger=tensorboard",
                 *TINY_RUN]) == 0
    run = tmp_path / "tb"
    search = tb_events(run / "tensorboard" / "search")
    rows = jsonl(run / "search" / "metrics.jsonl")
    for key in ("loss", "val_acc", "lr", "seconds"):  # (seconds: the epoch's wall clock)
        got = [(e.step, e.value) for e in search.Scalars(f"search/{key}")]
        assert got == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    alphas = jsonl(run / "search" / "alphas.jsonl")
    for group in ("normal", "reduce"):
        images = search.Images(f"alphas/{group}")
        assert [im.step for im in images] == [0, 1]
        for im, rec in zip(images, alphas, strict=True):
            pixels = (mpimg.imread(io.BytesIO(im.encoded_image_string)) * 255).round()
            expected = alpha_snapshot_image(np.asarray(rec[group]))
            assert pixels.shape[:2] == (5 * 12, 8 * 12)  # 5 edges x 8 ops, 12 px each
            # float32 JSON vs float32 tensor may differ in the last bit: 1 colour level
            assert np.abs(pixels[..., :3] - expected).max() <= 1
    retrain = tb_events(run / "tensorboard" / "retrain")
    test_acc = [e.value for e in retrain.Scalars("retrain/test_acc")]
    assert test_acc == [pytest.approx(r["test_acc"])
                        for r in jsonl(run / "retrain" / "metrics.jsonl")]


def test_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match="logger"):
        load_config(None, ["logger=wandb"])


def test_default_logger_writes_no_event_files(tmp_path):
    assert main(["search", f"out_dir={tmp_path}", "name=plain", *TINY_RUN,
                 "search.epochs=1", "retrain.enabled=false"]) == 0
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert (tmp_path / "plain" / "search" / "metrics.jsonl").is_file()
