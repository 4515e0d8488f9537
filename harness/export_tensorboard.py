"""Export a run as TensorBoard event files: per-epoch scalars per cell and each cell's hyper-parameters."""

from __future__ import annotations

import time
from pathlib import Path

from harness import confine
from harness.export_common import cell_name, epoch_series, params, scalars
from harness.results import read_records

# The hyper-parameters shown in TensorBoard's HParams dashboard (the rest are in the text of params()).
HPARAMS = ("task", "backend", "repeat", "seed", "device", "precision", "mode", "dataset", "synthetic", "epochs",
           "batch_size", "framework_version", "spec_hash")


# Our event files end with this, so that a second export of a folder replaces the first's files,
# and only those (TensorBoard would otherwise show every point twice).
SUFFIX = ".tribench"


def _writer(logdir: Path, *names: str):
    """An event writer in logdir/names (confine.make_dir: no symlink below LOGDIR), our earlier files there removed."""
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    folder = confine.make_dir(logdir, *names)
    for earlier in folder.glob(f"events.out.tfevents.*{SUFFIX}"):
        if confine.is_regular(earlier):
            earlier.unlink()
    return folder, EventFileWriter(str(folder), filename_suffix=SUFFIX)


def _scalar_event(tag: str, value: float, step: int):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary)


def _summary_event(summary):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    # The hparams helpers return TensorFlow's Summary class where TensorFlow is installed: same wire format.
    summary = summary_pb2.Summary.FromString(summary.SerializeToString())
    return event_pb2.Event(wall_time=time.time(), step=0, summary=summary)


def export(run_dir: Path, logdir: Path) -> list[Path]:
    """One event-file folder per record under `logdir` (task/backend/rN); returns those folders."""
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary as hp

    records = read_records(Path(run_dir))
    logdir = Path(logdir)
    metric_names = sorted({f"epoch/{n}" for r in records for n in epoch_series(r)} |
                          {f"final/{n}" for r in records for n in scalars(r)})
    logdir.mkdir(parents=True, exist_ok=True)
    _, root = _writer(logdir)
    root.add_event(_summary_event(hp.experiment_pb(
        hparam_infos=[api_pb2.HParamInfo(name=h) for h in HPARAMS],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metric_names])))
    root.close()
    folders = []
    for record in records:
        # task and backend are safe names (harness.schema checked every record read): one folder each.
        folder, writer = _writer(logdir, record["task"], record["backend"], f"r{record['repeat']}")
        values = params(record)
        writer.add_event(_summary_event(hp.session_start_pb(
            hparams={h: values[h] for h in HPARAMS if h in values}, group_name=cell_name(record))))
        for name, points in epoch_series(record).items():
            for step, value in points:
                writer.add_event(_scalar_event(f"epoch/{name}", value, step))
        for name, value in scalars(record).items():
            writer.add_event(_scalar_event(f"final/{name}", value, 0))
        status = api_pb2.STATUS_SUCCESS if record.get("status") == "ok" else api_pb2.STATUS_FAILURE
        writer.add_event(_summary_event(hp.session_end_pb(status)))
        writer.close()
        folders.append(folder)
    return folders
