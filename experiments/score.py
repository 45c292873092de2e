"""The scores of a model as loaded, without training (a decoder's zero-shot scores):

    python -m experiments.score model=smollm2_135m task=rotten_tomatoes_lm task.max_eval_samples=96
    python -m experiments.score ... model.quantize=nf4        # the NF4-stored base (no adapters)

Prints one JSON line: the test split's scores, the seconds taken, threads and versions.
"""
from __future__ import annotations

import json
import sys
import time

import torch


def score(overrides) -> dict:
    import adalora
    from hydra import compose, initialize_config_dir
    from . import lm
    from .loop import evaluate
    from .model import load_model, load_tokenizer, tokenize
    from .objective import for_task
    from .provenance import versions
    from .tasks import load_task
    from .train import CONF_DIR, to_run_config
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        rc = to_run_config(compose(config_name="config", overrides=list(overrides)))
    t0 = time.time()
    torch.manual_seed(rc.seed)
    data = load_task(rc.task)
    tok = load_tokenizer(rc.model)
    decoder = rc.task.objective != "classify"
    model = load_model(rc.model, data.num_labels, len(tok), decoder=decoder)
    if rc.model.quantize == "nf4":     # as build() does: every linear but the head and lm_head
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        adalora.quantize_model(model.backbone, skip=["classifier", "lm_head"], compute_dtype=compute)
    words = lm.label_words(rc.task, data.label_names) if rc.task.objective == "answer" \
        and data.label_names else None
    test = lm.tokenize_lm(tok, data.test, rc.task, words) if decoder else \
        tokenize(tok, data.test, rc.task.max_len)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = evaluate(model.to(device), test, rc, device, None,
                 for_task(rc.task, data.num_labels, tok, words))
    return {"model": rc.model.name, "task": rc.task.name, "quantize": rc.model.quantize,
            "n_test": len(data.test), "test": m, "seconds": round(time.time() - t0, 1),
            "threads": torch.get_num_threads(), "versions": versions()}


def main(argv: list[str]) -> int:
    from .config import ConfigError
    from .overrides import first_error
    from .train import override_error
    try:
        # the training command's checks first: Hydra reports these in many lines
        if (msg := first_error("config", argv, override_error)) is not None:
            raise ConfigError(msg)
        print(json.dumps(score(argv)), flush=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
