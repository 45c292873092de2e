"""analysis/studies/decoder_smollm2/compare.py on synthetic run folders: `link` keeps the runs at
each method's tuned rate, `build` and `report` give the paired AdaLoRA − LoRA rows that hand
arithmetic and scipy give."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import stats

from exp_utils import load_script

STUDY = Path(__file__).resolve().parents[1] / "analysis" / "studies" / "decoder_smollm2"
C = load_script(STUDY / "compare.py", "decoder_compare")

ACC = {("adalora", 0.001): [0.70, 0.72, 0.71], ("adalora", 0.004): [0.80, 0.83, 0.79],
       ("lora", 0.001): [0.78, 0.80, 0.82], ("lora", 0.004): [0.60, 0.61, 0.62]}


def _sweep(root: Path) -> None:
    k = 0
    for (method, lr), accs in ACC.items():
        for seed, acc in enumerate(accs):
            run = root / str(k)
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "config.yaml").write_text(f"trainer:\n  lr: {lr}\n")
            final = {s: {"accuracy": acc + (0.01 if s == "test" else 0), "exact_match": acc / 2} for s in ("val", "test")}
            (run / "summary.json").write_text(json.dumps({
                "status": "completed", "method": method, "seed": seed, "final": final, "params": {"adapter_end": 10},
                "final_ranks": {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.up_proj": 4}}))
            k += 1
    tuned = {"rotten_tomatoes_lm": {m: {"overrides": {"trainer.lr": lr}, "grid": [{"trainer.lr": 0.001}, {"trainer.lr": 0.004}],
                                        "val_mean": float(np.mean(ACC[(m, lr)])), "n": 3}
                                    for m, lr in (("adalora", 0.004), ("lora", 0.001))}}
    (root / "tuned.json").write_text(json.dumps(tuned))


def test_link_build_report_give_the_paired_rows_by_hand(tmp_path):
    _sweep(tmp_path / "compare")
    C.link(tmp_path / "compare", tmp_path / "chosen")
    assert sorted(p.name for p in (tmp_path / "chosen").iterdir()) == [f"{m}-s{s}" for m in ("adalora", "lora") for s in range(3)]
    df = C.build(tmp_path / "chosen", tmp_path / "out", tmp_path / "compare" / "tuned.json")
    assert set(zip(df.method, df.lr)) == {("adalora", 0.004), ("lora", 0.001)}
    text = C.report(tmp_path / "out")
    a, b = np.array(ACC[("adalora", 0.004)]) + 0.01, np.array(ACC[("lora", 0.001)]) + 0.01
    d = a - b                                                   # [0.02, 0.03, -0.03]
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    p = stats.ttest_rel(a, b).pvalue
    assert f"| test_accuracy | 3 | {d.mean():+.4f} | [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] | {p:.3f} |" in text
    assert "| adalora | 2.00 | 4.00 |" in text                  # q and ffn-in columns, mean final rank
