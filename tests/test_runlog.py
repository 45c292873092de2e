"""The run folder's TensorBoard events (experiments/runlog.py), read back by TensorBoard's own
reader: every number of ``metrics.jsonl`` and ``ranks.jsonl``, at its step, under its tag."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.runlog import RunWriter


def test_tensorboard_scalars_read_back_as_the_jsonl_records(tmp_path):
    w = RunWriter(tmp_path, tensorboard=True)
    metrics = [{"step": 10, "split": "train", "loss": 0.75, "orth": 0.125, "lr": 1e-3, "epoch": 0.5, "time_s": 2.0},
               {"step": 20, "split": "val", "accuracy": 0.625, "lr": 5e-4, "epoch": 1.0, "time_s": 4.0}]
    ranks = [{"step": 4, "budget": 9, "threshold": 0.25, "params_kept": 900, "ranks": {"a.q": 5, "a.v": 4}},
             {"step": 8, "budget": 6, "threshold": None, "params_kept": 600, "ranks": {"a.q": 2, "a.v": 4}}]
    for m in metrics:
        w.log_metrics(m)
    for r in ranks:
        w.log_ranks(r)
    w.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    want = {}
    for m in metrics:
        for k, v in m.items():
            if k not in ("step", "split", "epoch"):
                want.setdefault(f"{m['split']}/{k}", []).append((m["step"], v))
    for r in ranks:
        for k in ("budget", "params_kept", "threshold"):
            if r[k] is not None:
                want.setdefault(f"budget/{k}", []).append((r["step"], r[k]))
        for name, v in r["ranks"].items():
            want.setdefault(f"rank/{name}", []).append((r["step"], v))
    assert set(got) == set(want)
    for tag in want:      # TensorBoard stores fp32: these values are exact in it
        assert got[tag] == [(s, pytest.approx(v, rel=1e-7)) for s, v in want[tag]], tag
