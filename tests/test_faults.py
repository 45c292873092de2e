"""Faults and hostile input: SIGKILL during checkpoint writes, SIGINT pre-emption, non-finite
losses, a failing job inside a multirun, pickle-bearing checkpoints, malformed dataset files.

The SIGKILL test runs FAULT_INJECTIONS kills (default 4, two of them aimed at a checkpoint write;
set it higher for a longer soak)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors.torch import load_file

from exp_utils import REPO, TINY, read_jsonl, run_cli, run_inproc
from experiments import checkpoint as ckpt
from experiments.config import ConfigError, TaskConfig
from experiments.tasks import load_task

FAST = TINY + ["logger.tensorboard=false", "trainer.num_threads=1", "trainer.eval_every=0"]


def _launch(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_new_checkpoint(d: Path, proc, since_ns: int, timeout=60.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        p = d / ckpt.NAME
        if p.is_file() and p.stat().st_mtime_ns > since_ns:
            return True
        time.sleep(0.005)
    return False


def _kill_mid_write(d: Path, proc, timeout=5.0) -> None:
    """SIGKILL as soon as a checkpoint temp file exists, i.e. inside torch.save/fsync/replace."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(d.glob(f".{ckpt.NAME}.*.tmp")):
            break
    proc.kill()


@pytest.mark.long
def test_sigkill_during_checkpoint_writes_then_sigint_then_resume(tmp_path):
    """Kill -9 at random moments of a run that checkpoints every step (half the kills aimed at
    the moment a checkpoint is being written); after each kill the checkpoint on disk loads
    with weights_only=True and the next launch resumes from it. Then SIGINT (pre-emption):
    status interrupted plus a checkpoint. The final resumed run equals an uninterrupted run
    bitwise, and every step is logged exactly once."""
    n_kills = int(os.environ.get("FAULT_INJECTIONS", "4"))
    args = FAST + ["task.max_train_samples=64", f"trainer.epochs={7 * n_kills}",
                   "trainer.checkpoint_every=1", "trainer.batch_size=16",
                   "logger.log_every=1"]                  # 4 steps an epoch: 112 for 4 kills
    ref = run_inproc(tmp_path / "ref", args)
    total = ref["steps"]
    d = tmp_path / "run"
    rng = random.Random(0)
    last_step, survived, mid_write = 0, 0, 0
    for i in range(n_kills + 1):
        launch = args + ([f"trainer.resume={d}"] if i else [f"hydra.run.dir={d}"])
        since = (d / ckpt.NAME).stat().st_mtime_ns if i else 0
        proc = _launch(launch)
        assert _wait_for_new_checkpoint(d, proc, since), proc.communicate()[1][-3000:]
        if i == n_kills:                                  # pre-emption: SIGINT, clean stop
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
            s = json.loads((d / "summary.json").read_text())
            assert s["status"] == "interrupted" and s["steps"] < total
            assert ckpt.load(d)["step"] == s["steps"]
            break
        if i % 2:
            _kill_mid_write(d, proc)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
            proc.kill()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: make it longer"
        mid_write += bool(list(d.glob(f".{ckpt.NAME}.*.tmp")))
        state = ckpt.load(d)                              # the last complete checkpoint loads
        assert last_step <= state["step"] < total
        assert all(torch.isfinite(v).all() for v in state["model"].values())
        last_step = state["step"]
        survived += 1
    p = run_cli(args + [f"trainer.resume={d}"])
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == total
    assert not list(d.glob(f".{ckpt.NAME}.*.tmp"))        # stale temp files were cleaned up
    a, b = load_file(str(tmp_path / "ref" / "adapters.safetensors")), load_file(str(d / "adapters.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in read_jsonl(d / "metrics.jsonl") if m["split"] == "train"]
    assert steps == list(range(1, total + 1))
    assert read_jsonl(d / "ranks.jsonl") == read_jsonl(tmp_path / "ref" / "ranks.jsonl")
    print(f"\nSIGKILL injections survived: {survived} ({mid_write} with a checkpoint write in "
          "flight) + 1 SIGINT")
    assert survived == n_kills and mid_write >= 1


# ---- non-finite losses ----------------------------------------------------------------------
def nan_logits(monkeypatch, first: int, last: int = 10 ** 9) -> None:
    """Training forwards number first..last (1-based) return NaN logits: a test-side hook,
    no product knob."""
    import experiments.runner as R
    orig, calls = R.load_model, {"n": 0}

    def load_model(*a, **k):
        model = orig(*a, **k)
        forward = model.forward

        def nan_forward(*args, **kw):
            out = forward(*args, **kw)
            if model.training:
                calls["n"] += 1
                if first <= calls["n"] <= last:
                    return out * float("nan")
            return out
        model.forward = nan_forward
        return model
    monkeypatch.setattr(R, "load_model", load_model)


def graphs_on_the_cpu(monkeypatch) -> list:
    """``trainer.step_graph=true`` with the runner's checks as on a GPU: the CPU runs the graphs'
    bodies uncaptured, and a non-finite step is skipped on the device and read back later."""
    from experiments import step_graph as SG
    refuse = SG.refuse
    monkeypatch.setattr(SG, "refuse", lambda cfg, device, world: refuse(cfg, torch.device("cuda"), world))
    return ["trainer.step_graph=true", "model.dropout=0.0"]


@pytest.mark.parametrize("graphs", [False, True])
def test_persistent_nan_fails_cleanly_and_keeps_the_last_good_checkpoint(graphs, tmp_path, monkeypatch):
    d = tmp_path / "run"
    args = FAST + ["trainer.epochs=2", "trainer.checkpoint_every=2",        # 16 steps
                   "trainer.max_nonfinite_steps=3"] + (graphs_on_the_cpu(monkeypatch) if graphs else [])
    nan_logits(monkeypatch, first=6)                    # optimizer steps 6, 7, 8 (1-based)
    with pytest.raises(FloatingPointError, match="max_nonfinite_steps=3"):
        run_inproc(d, args)
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"].startswith("FloatingPointError: 3 consecutive")
    assert "checkpoint.pt (step 4) is kept" in s["error"]
    state = ckpt.load(d)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    monkeypatch.undo()                                   # the cause is gone: resume completes
    if graphs:
        graphs_on_the_cpu(monkeypatch)
    s = run_inproc(d, args + [f"trainer.resume={d}"])
    assert s["status"] == "completed" and s["steps"] == 16


@pytest.mark.parametrize("graphs", [False, True])
def test_transient_nan_steps_are_skipped_and_counted(graphs, tmp_path, monkeypatch):
    nan_logits(monkeypatch, first=3, last=4)
    s = run_inproc(tmp_path / "run", FAST + ["trainer.max_steps=10", "trainer.max_nonfinite_steps=3"]
                   + (graphs_on_the_cpu(monkeypatch) if graphs else []))
    assert s["status"] == "completed" and s["skipped_steps"] == 2
    assert sum(s["final_ranks"].values()) == s["schedule"]["target_budget"]


def test_a_signal_during_the_final_evaluation_checkpoints_and_the_resume_evaluates(tmp_path, monkeypatch):
    """SIGTERM while the validation split is scored: the run stops as interrupted with a
    checkpoint after its last step, logs no final line, and a resume runs no step but both
    final evaluations, each logged once."""
    from experiments import loop
    d, args = tmp_path / "run", FAST + ["trainer.max_steps=6"]
    handler = signal.getsignal(signal.SIGTERM)
    real = loop.evaluate
    calls = []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)       # the loop's handler only sets a flag
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    s = run_inproc(d, args)
    assert s["status"] == "interrupted" and s["steps"] == 6 and len(calls) == 1
    assert ckpt.load(d)["step"] == 6
    assert not [m for m in read_jsonl(d / "metrics.jsonl") if m["split"] != "train"]
    assert signal.getsignal(signal.SIGTERM) == handler                    # handlers restored
    monkeypatch.setattr(loop, "evaluate", real)
    s = run_inproc(d, args + [f"trainer.resume={d}"])
    assert s["status"] == "completed" and s["steps"] == 6 and set(s["final"]) == {"val", "test"}
    lines = read_jsonl(d / "metrics.jsonl")
    assert [m["split"] for m in lines if m["split"] != "train"] == ["val", "test"]
    assert [m["step"] for m in lines if m["split"] == "train"] == list(range(1, 7))
    with pytest.raises(ConfigError, match="already holds a completed run"):
        run_inproc(d, args)


def test_a_new_run_is_refused_in_a_folder_holding_an_unfinished_one(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(ConfigError, match=f"{d} already holds a run \\(status failed\\); continue it with "
                                          f"trainer.resume={d}"):
        run_inproc(d, FAST + ["trainer.max_steps=2"])
    assert sorted(p.name for p in d.iterdir()) == ["summary.json"]


# ---- multirun: one failing job never takes the others down ----------------------------------
@pytest.mark.long
def test_failing_jobs_of_a_multirun_leave_the_others_and_say_why(tmp_path):
    # job 0 is fine; job 1 diverges at runtime (NaN); job 2 is refused when its config is built.
    p = run_cli(["-m", *FAST, "task.max_train_samples=64", "trainer.max_steps=6",
                 "trainer.max_nonfinite_steps=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "trainer.lr=2e-3,1e30,-1", f"hydra.sweep.dir={tmp_path}"])
    assert p.returncode != 0
    s = [json.loads((tmp_path / str(i) / "summary.json").read_text()) for i in range(3)]
    assert s[0]["status"] == "completed" and s[0]["final"]["test"]["accuracy"] is not None
    assert s[1]["status"] == "failed" and "non-finite" in s[1]["error"]
    assert s[2]["status"] == "failed" and "trainer.lr" in s[2]["error"]
    assert s[2]["method"] == "adalora" and s[2]["seed"] == 0


# ---- hostile checkpoints --------------------------------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_bearing_checkpoint_is_refused_and_runs_no_code(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": Evil(str(marker))}, d / ckpt.NAME)
    with pytest.raises(ConfigError, match="refused") as e:
        ckpt.load(d)
    assert "\n" not in str(e.value) and not marker.exists()
    p = run_cli(FAST + [f"trainer.resume={d}"])
    assert p.returncode == 2 and not marker.exists()
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: ") and "pickled objects" in line[0]
    (d / ckpt.NAME).write_bytes(b"PK\x03\x04 truncated")     # a torn or foreign file
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        ckpt.load(d)


def test_fsdp_is_refused_with_a_clear_error():
    from exp_utils import compose
    with pytest.raises(ConfigError, match="fsdp is not supported yet"):
        compose(["trainer.strategy=fsdp"])


# ---- malformed dataset files (property-based, in-process) -----------------------------------
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=30)
LABELS = st.lists(st.text("abcxyz019", min_size=1, max_size=3), min_size=1, max_size=4, unique=True)


def _hash_split(text: str) -> str:
    """The documented split (experiments/tasks), recomputed here: SHA-1 of the text, its first 8
    bytes big-endian over 2**64; below 0.1 test, below 0.2 val, else train."""
    u = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return "test" if u < 0.1 else "val" if u < 0.2 else "train"


def _must_load(rows) -> bool:
    """A well-formed file must load exactly when it has a row, every text is non-blank, there
    are two labels or more and every split of the hash gets a row."""
    return (bool(rows) and all(t.strip() for t, _ in rows) and len({y for _, y in rows}) >= 2
            and {_hash_split(t) for t, _ in rows} == {"train", "val", "test"})


@st.composite
def dataset_files(draw):
    """(bytes, extension, fault, rows, bom) for a well-formed file (often one that must load),
    then maybe broken on purpose; any of them maybe prefixed with a UTF-8 byte-order mark."""
    ext = draw(st.sampled_from([".csv", ".tsv", ".jsonl"]))
    labels = draw(LABELS)
    fault = draw(st.sampled_from(["none"] * 4 + ["empty", "header_only", "no_text", "no_label", "non_utf8"]))
    if fault == "none" and draw(st.booleans()):   # non-blank texts, enough rows to fill every split
        rows = draw(st.lists(st.tuples(TEXT.map(lambda t: "r" + t), st.sampled_from(labels)),
                             min_size=30, max_size=60))
    else:
        rows = draw(st.lists(st.tuples(TEXT, st.sampled_from(labels)), min_size=0, max_size=60))
    cols = ["text", "label"]
    if fault in ("no_text", "no_label"):
        cols = ["review" if c == "text" and fault == "no_text" else
                "sentiment" if c == "label" and fault == "no_label" else c for c in cols]
    if ext == ".jsonl":      # no header: header_only is a file without records
        body = "" if fault == "header_only" else \
            "".join(json.dumps(dict(zip(cols, r))) + "\n" for r in rows)
    else:
        import csv
        import io
        buf = io.StringIO()
        # \r\n line ends (RFC 4180, Excel): the writer then quotes a field holding a bare \r too
        w = csv.writer(buf, delimiter="\t" if ext == ".tsv" else ",", lineterminator="\r\n")
        w.writerow(cols)
        if fault != "header_only":
            w.writerows(rows)
        body = buf.getvalue()
    data = body.encode("utf-8")
    if fault == "empty":
        data = draw(st.sampled_from([b"", b"\n", b"   \n\n"]))
    if fault == "non_utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80"])) + data[at:]
    bom = draw(st.booleans())                      # Excel's habit; the loaders strip it
    if bom:
        data = b"\xef\xbb\xbf" + data
    return data, ext, fault, rows, bom


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dataset_files())
def test_malformed_dataset_files_load_or_fail_in_one_line(tmp_path, case):
    """Every file either loads or fails with a one-line ConfigError, and which one is decided by
    the documented rules: a valid file (BOM or not) always loads, with every row in the split
    its hash names and its own label; a broken one never does."""
    data, ext, fault, rows, bom = case
    path = tmp_path / f"data{ext}"
    path.write_bytes(data)
    must_load = fault == "none" and _must_load(rows)
    event(f"must load: {must_load}, BOM: {bom}")     # pytest --hypothesis-show-statistics
    try:
        d = load_task(TaskConfig(dataset=f"file:{path}", max_len=32))
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg, msg
        assert not must_load, f"a valid {ext} file (BOM: {bom}) was refused: {msg}"
        if fault == "non_utf8":
            assert "not UTF-8" in msg
        if fault in ("no_text", "no_label") and rows:
            assert "no column" in msg
        return
    assert must_load, f"{fault} {ext} file (BOM: {bom}) was accepted"
    truth = {}
    for t, y in rows:
        truth.setdefault(t, set()).add(y)
    assert sorted(d.label_names) == sorted({y for _, y in rows})
    assert sorted(ex.text for ex in d.train + d.val + d.test) == sorted(t for t, _ in rows)
    for split, name in ((d.train, "train"), (d.val, "val"), (d.test, "test")):
        for ex in split:
            assert _hash_split(ex.text) == name and d.label_names[ex.label] in truth[ex.text]


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("bom", [False, True])
def test_valid_file_loads_with_or_without_a_byte_order_mark(tmp_path, ext, bom):
    rows = [(f"review number {i}", "pos" if i % 3 else "neg") for i in range(60)]
    assert _must_load(rows)
    sep = "\t" if ext == ".tsv" else ","
    body = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows) if ext == ".jsonl" else \
        "text" + sep + "label\n" + "".join(f"{t}{sep}{y}\n" for t, y in rows)
    path = tmp_path / f"data{ext}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))
    d = load_task(TaskConfig(dataset=f"file:{path}", max_len=32))
    assert d.label_names == ["neg", "pos"] and len(d.train) + len(d.val) + len(d.test) == 60
    assert d.train[0].text.startswith("review number")          # no BOM glued to any text or column


# Malformed rows that once crashed or became a class named "None": each is a one-line ConfigError.
@pytest.mark.parametrize("name, body", ids=lambda v: v if v.endswith(("l", "v")) else "", argvalues=[
    ("null_label.jsonl", "".join(json.dumps({"text": f"t{i}", "label": None if i == 3 else i % 2})
                                 + "\n" for i in range(60))),
    ("list_line.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n'),
    ("missing_key.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n'),
    ("short_row.csv", "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(60)) + "lonely\n"),
])
def test_known_malformed_rows_are_refused(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(ConfigError):
        load_task(TaskConfig(dataset=f"file:{path}", max_len=32))
