"""hybrid_distill.runtime.metrics: metrics.jsonl, console lines / progress bar, TensorBoard, loss.png, train.log."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from hybrid_distill.config import RunConfig
from hybrid_distill.runtime.metrics import (
    LOGGER_NAME,
    MetricsLogger,
    format_eta,
    format_eval_line,
    format_line,
    plot_losses,
    read_metrics,
    setup_logging,
)

VALUES = {"epoch": 0.5, "loss": 0.43214, "feature_loss": 0.3, "relation_loss": 0.13214, "lr": 1.2e-4,
          "grad_norm": 1.5, "keep_ratio": 0.34, "images_per_s": 850.4, "skipped_steps": 0, "time_data": 0.0123,
          "world_size": 2, "time_student": 0.25}


@pytest.fixture(autouse=True)
def _reset_logger():
    yield
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_line():
    line = format_line(120, 5000, VALUES)
    assert line == ("step 120/5000 | ep 0.50 | loss 0.4321 | feat 0.3000 | rel 0.1321 | lr 1.20e-04 | gnorm 1.500 | "
                    "keep 0.340 | 850 img/s | skipped 0 | world_size 2 | time(s) data 0.0123 student 0.25")
    assert format_line(1, 2, {"loss": float("nan")}) == "step 1/2 | loss nan"


def test_jsonl_tensorboard_plain_lines_and_png(tmp_path, capsys):
    import torch

    logger = MetricsLogger(tmp_path, RunConfig(tensorboard=True), is_main=True, total_steps=4)
    for step in (1, 2, 3):
        logger.log(step, dict(VALUES, loss=torch.tensor(1.0 / step), relation_loss=0.1 * step))
    logger.log(4, {"loss": float("nan"), "lr": 1e-5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] == 0.5 and rows[2]["relation_loss"] == pytest.approx(0.3)
    assert rows[0]["skipped_steps"] == 0 and isinstance(rows[0]["skipped_steps"], int)
    assert rows[3] == {"step": 4, "loss": None, "lr": 1e-5}  # non-finite -> null: strict JSON
    err = capsys.readouterr().err  # pytest's stderr is not a terminal: plain lines
    first = err.splitlines()[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 1/4 \| .* \| eta \d+:\d\d:\d\d", first), first
    assert first[20:].startswith("step 1/4 | ep 0.50 | loss 1.0000 | feat 0.3000 | rel 0.1000 | lr 1.20e-04")
    assert "step 4/4 | loss nan | lr 1.00e-05 | eta 0:00:00" in err
    logger.close()
    logger.close()  # idempotent
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    assert "train/relation_loss" in acc.Tags()["scalars"]


@pytest.mark.parametrize("rate, text", [(0.0421, "0.0421 img/s"), (1.5, "1.5 img/s"), (57.26, "57.3 img/s"),
                                        (850.4, "850 img/s"), (12345.6, "12346 img/s")])
def test_throughput_keeps_three_significant_digits_and_is_never_printed_as_zero(rate, text):
    assert format_line(1, 2, {"images_per_s": rate}) == f"step 1/2 | {text}"


def test_gpu_memory_has_its_label():
    assert format_line(3, 9, {"max_memory_gib": 71.234}) == "step 3/9 | mem 71.2GiB"


def test_eta_follows_the_step_rate_of_this_job(tmp_path, monkeypatch):
    clock = iter([100.0, 110.0, 120.0, 130.0])  # logger start, first row, later rows
    monkeypatch.setattr("hybrid_distill.runtime.metrics.time.monotonic", lambda: next(clock))
    logger = MetricsLogger(tmp_path, RunConfig(tensorboard=False), is_main=True, total_steps=100, initial_step=40)
    assert logger.eta(50) == pytest.approx(50 * 10 / 10)  # 10 steps in 10 s since the start: 50 left
    logger._first_row = False
    logger._clock = (110.0, 50)
    assert logger.eta(60) == pytest.approx(40 * 10 / 10)  # from the first training row on
    assert format_eta(3 * 3600 + 62) == "3:01:02" and format_eta(float("nan")) == "?"
    logger.close()


def test_eval_rows_get_their_group_in_tensorboard_and_a_compact_console_line(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, RunConfig(tensorboard=True), is_main=True, total_steps=8)
    logger.log(0, {"knn_cls_top1": 12.5, "attn_nmi_b1": 0.25, "attn_nmi_b0": 0.5, "attn_distance_b0": 101.0},
               group="eval")
    logger.log(2, {"loss": 1.0})
    logger.log(2, {"knn_cls_top1": 40.0}, group="eval")
    logger.close()
    err = capsys.readouterr().err
    assert "eval step 0/8 | knn_cls_top1 12.5 | attn_nmi 0.5 0.25 | attn_distance 101" in err
    assert read_metrics(tmp_path / "metrics.jsonl")[1] == {"step": 2, "loss": 1.0, "knn_cls_top1": 40.0}  # merged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "tensorboard").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/knn_cls_top1")] == [(0, 12.5), (2, 40.0)]
    assert "train/knn_cls_top1" not in acc.Tags()["scalars"]
    assert format_eval_line(5, 9, {"attn_distance_b10": 2.0, "attn_distance_b2": 1.0}) == \
        "eval step 5/9 | attn_distance 1 2"  # blocks in numeric order


def test_loss_png_gets_an_evaluation_panel(tmp_path):
    rows = [{"step": 0, "knn_cls_top1": 10.0}, {"step": 1, "loss": 1.0, "feature_loss": 0.9, "relation_loss": 0.1},
            {"step": 2, "loss": 0.5, "feature_loss": 0.45, "relation_loss": 0.05}, {"step": 2, "knn_cls_top1": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from PIL import Image

    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "with_eval.png")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:3]))
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "without.png")
    assert Image.open(tmp_path / "with_eval.png").height > Image.open(tmp_path / "without.png").height  # 4 vs 3 panels


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    logger = MetricsLogger(tmp_path, RunConfig(tensorboard=False), is_main=True, total_steps=10)
    logger.log(5, {"loss": 0.25})
    logger.close()
    out = tty.getvalue()
    assert "step 5/10" not in out  # no plain lines
    assert "5/10" in out and "loss=0.2500" in out
    assert not (tmp_path / "tensorboard").exists()


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "run", RunConfig(wandb=True), is_main=False, total_steps=10)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().err == ""


def test_wandb_requested_but_missing_warns(tmp_path, caplog):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        logger = MetricsLogger(tmp_path, RunConfig(wandb=True, tensorboard=False), is_main=True, total_steps=1)
    logger.close()
    assert "wandb is not installed" in caplog.text


def test_resumed_run_drops_rows_after_its_checkpoint_and_appends(tmp_path):
    runs = (({1: 1.0, 2: 0.9, 3: 0.8}, 0), ({3: 0.7, 4: 0.6}, 2))  # the 1st job died after step 3, ckpt at 2
    for losses, initial_step in runs:
        logger = MetricsLogger(tmp_path, RunConfig(tensorboard=False), is_main=True, total_steps=4,
                               initial_step=initial_step)
        for step, loss in losses.items():
            logger.log(step, {"loss": loss})
        logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(x)["step"], json.loads(x)["loss"]) for x in lines] == [(1, 1.0), (2, 0.9), (3, 0.7), (4, 0.6)]
    assert read_metrics(tmp_path / "metrics.jsonl") == [json.loads(x) for x in lines]


def test_read_metrics_last_row_wins_for_a_repeated_step(tmp_path):
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "loss": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path / "metrics.jsonl") == [rows[0], rows[2]]


TORN = '{"step": 7, "feature_loss": 0.12'  # the last row of a job killed mid-write (node crash, full disk)


def _write_torn_metrics(path, steps):
    rows = [{"step": s, "loss": 1.0 / s} for s in steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + TORN)  # no newline after the torn row
    return rows


def test_resume_drops_a_torn_last_line_and_appends_cleanly(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = _write_torn_metrics(path, range(1, 7))
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        logger = MetricsLogger(tmp_path, RunConfig(tensorboard=False), is_main=True, total_steps=8, initial_step=4)
    assert f"{path}:7" in caplog.text  # names the file and the line number
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:4]  # rows 5, 6 and the torn one gone
    logger.log(5, {"loss": 0.5})
    logger.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [*rows[:4], {"step": 5, "loss": 0.5}]  # every line parses
    assert read_metrics(path) == [json.loads(line) for line in lines]


def test_resume_after_the_last_good_row_still_removes_the_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = _write_torn_metrics(path, range(1, 4))
    MetricsLogger(tmp_path, RunConfig(tensorboard=False), is_main=True, total_steps=8, initial_step=6).close()
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)


def test_read_metrics_skips_a_torn_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = _write_torn_metrics(path, (1, 2, 3))
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        assert read_metrics(path) == rows
    assert f"{path}:4" in caplog.text and "unparsable" in caplog.text


def test_setup_logging_main_and_other_ranks(tmp_path, capsys):
    log = setup_logging(tmp_path, is_main=True, rank=0)
    setup_logging(tmp_path, is_main=True, rank=0)  # idempotent: no duplicated handlers
    log.info("hello %s", "world")
    MetricsLogger(tmp_path, RunConfig(tensorboard=False), is_main=True, total_steps=2).log(1, {"loss": 2.0})
    text = (tmp_path / "train.log").read_text()
    assert "[rank 0] INFO hello world" in text and "step 1/2 | loss 2.0000" in text
    err = capsys.readouterr().err
    assert err.count("hello world") == 1 and err.count("step 1/2") == 1

    other = tmp_path / "rank1"
    log = setup_logging(other, is_main=False, rank=1)
    log.info("quiet")
    log.warning("careful")
    err = capsys.readouterr().err
    assert "quiet" not in err and "[rank 1] WARNING careful" in err
    assert not other.exists()
