"""Decoder language-model pieces against hand references, on tiny random Llama and GPT-2 with
the real MiniLM tokenizer: tokenization (loss on the answer only), the loss on scored positions
against the full logits, batched greedy generation against one row at a time, label-word
log-likelihoods by hand, exact match, default targets, prompt/response files, module names."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from experiments import lm
from experiments.config import ConfigError, ModelConfig, TaskConfig
from experiments.model import CausalLM, block_linears, load_model, load_tokenizer
from experiments.tasks import Example, load_task

WORDS = ["negative", "positive"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="tiny-random"))


def tiny(arch: str, tok) -> CausalLM:
    torch.manual_seed(0)
    m = load_model(ModelConfig(name_or_path="tiny-random", tiny_arch=arch), 0, len(tok), decoder=True)
    return m.eval()


def answer_cfg(**kw) -> TaskConfig:
    return TaskConfig(objective="answer", prompt="Review: {text}\nSentiment:", max_len=24, **kw)


EXAMPLES = [Example("a gorgeous , witty film", 1), Example("dull", 0),
            Example(" ".join(["long"] * 60), 0)]


def test_answer_tokens_alone_are_scored_and_a_long_text_is_cut_not_the_answer(tok):
    eos, pad = lm.special_ids(tok)
    d = lm.tokenize_lm(tok, EXAMPLES, answer_cfg(), WORDS)
    assert d["input_ids"].shape == (3, 24) and d["class"].tolist() == [1, 0, 0]
    for i, e in enumerate(EXAMPLES):
        n, p = int(d["attention_mask"][i].sum()), int(d["prompt_len"][i])
        ans = tok(" " + WORDS[e.label], add_special_tokens=False)["input_ids"] + [eos]
        assert d["input_ids"][i, p:n].tolist() == ans                  # answer, then eos
        assert d["labels"][i, :p].eq(lm.IGNORE).all() and d["labels"][i, p:n].tolist() == ans
        assert d["labels"][i, n:].eq(lm.IGNORE).all() and d["input_ids"][i, n:].eq(pad).all()
        prompt = tok.decode(d["input_ids"][i, :p])
        assert prompt.startswith("review :") and prompt.endswith("sentiment :")   # template kept
    assert int(d["attention_mask"][2].sum()) == 24                      # the long text was cut


def test_corpus_rows_score_every_token_after_the_first(tok):
    d = lm.tokenize_lm(tok, [Example("the market rose today", -1)], TaskConfig(objective="corpus",
                                                                             metric="perplexity"), None)
    n = int(d["attention_mask"][0].sum())
    assert d["labels"][0, :n].tolist() == d["input_ids"][0, :n].tolist()
    assert d["input_ids"][0, n - 1] == lm.special_ids(tok)[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_on_scored_positions_equals_the_full_logits_loss(arch, tok):
    m = tiny(arch, tok)
    d = lm.tokenize_lm(tok, EXAMPLES, answer_cfg(), WORDS)
    with torch.no_grad():
        full = m.backbone(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
        ref = F.cross_entropy(full[:, :-1].flatten(0, 1), d["labels"][:, 1:].flatten(), ignore_index=-100)
        got = lm.lm_loss(m, d)
        every = lm.lm_loss_every_position(m, d)      # the captured step's form: no boolean selection
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(every, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_equals_one_row_at_a_time_and_label_logprobs_by_hand(arch, tok):
    m = tiny(arch, tok)
    d = lm.tokenize_lm(tok, EXAMPLES, answer_cfg(), WORDS)
    eos, pad = lm.special_ids(tok)
    words = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in WORDS]
    with torch.no_grad():
        batch = lm.greedy(m, d, 4, eos, pad)
        choice = lm.choice_logprobs(m, d, words)
        for i in range(3):
            seq = d["input_ids"][i, :int(d["prompt_len"][i])].tolist()
            for t in range(4):         # plain greedy on the unpadded row, full logits
                nxt = int(m.backbone(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                assert batch[i, t] == nxt or (eos in batch[i, :t].tolist() and batch[i, t] == pad)
                seq.append(nxt)
            for k, w in enumerate(words):
                p = d["input_ids"][i, :int(d["prompt_len"][i])].tolist()
                logp = m.backbone(input_ids=torch.tensor([p + w])).logits[0].log_softmax(-1)
                ref = sum(float(logp[len(p) - 1 + j, w[j]]) for j in range(len(w)))
                assert float(choice[i, k]) == pytest.approx(ref, abs=1e-4)


class Oracle(torch.nn.Module):
    """Predicts the next token from the current one by a table: a model that answers right."""

    def __init__(self, table, vocab):
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, input_ids, attention_mask, select):
        nxt = torch.tensor([self.table.get(int(t), 0) for t in input_ids[select]])
        return F.one_hot(nxt, self.vocab).float() * 10


def test_exact_match_and_label_accuracy_of_a_model_that_answers(tok):
    cfg = answer_cfg()
    d = lm.tokenize_lm(tok, EXAMPLES[:2], cfg, WORDS)
    eos, _ = lm.special_ids(tok)
    row = d["input_ids"][0, :int(d["attention_mask"][0].sum())].tolist()
    p = int(d["prompt_len"][0])
    table = {row[j]: row[j + 1] for j in range(p - 1, len(row) - 1)}   # ':' -> positive -> eos
    obj = lm.CausalLMObjective(tok, "answer", WORDS)
    m = obj.evaluate(Oracle(table, len(tok)), [dict(d)], lambda: torch.autocast("cpu", enabled=False))
    # Row 0 (positive) is answered; row 1 (negative) gets "positive" too: one of two right.
    assert m["exact_match"] == 0.5 and m["accuracy"] == 0.5
    assert set(m) == {"loss", "perplexity", "exact_match", "accuracy", "macro_f1", "mcc"}


@pytest.mark.parametrize("arch,names", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_proj", "c_fc"])])
def test_default_targets_are_every_linear_map_of_each_block(arch, names, tok):
    m = tiny(arch, tok)
    assert block_linears(m.backbone) == names
    from transformers.pytorch_utils import Conv1D
    maps = [n for n, mod in m.backbone.named_modules() if isinstance(mod, (torch.nn.Linear, Conv1D))]
    inside = [n for n in maps if ".0." in n or ".1." in n]
    assert inside and all(any(n.endswith(s) for s in names) for n in inside)
    assert set(maps) - set(inside) == {"lm_head"}                      # the frozen output layer


def test_prompt_response_files_load_and_name_a_missing_column(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(40)))
    data = load_task(TaskConfig(dataset=f"file:{path}", objective="answer", metric="exact_match"))
    rows = data.train + data.val + data.test
    assert len(rows) == 40 and all(e.response == "a" + e.text[1:] and e.label == -1 for e in rows)
    with pytest.raises(ConfigError, match="has no column 'answer'.*task.prompt_column / task.response_column"):
        load_task(TaskConfig(dataset=f"file:{path}", objective="answer", response_column="answer"))


def test_config_refuses_what_an_objective_cannot_score():
    with pytest.raises(ConfigError, match="task.metric=accuracy for task.objective=corpus"):
        TaskConfig(objective="corpus")
    with pytest.raises(ConfigError, match="must contain \\{text\\}"):
        TaskConfig(objective="answer", prompt="no slot")
    with pytest.raises(ConfigError, match="model=tiny-llama is a decoder"):
        load_model(ModelConfig(name="tiny-llama", name_or_path="tiny-random", tiny_arch="llama"), 2, 100)
    with pytest.raises(ConfigError, match="use model=tiny_llama or model=tiny_gpt2"):
        load_model(ModelConfig(name_or_path="tiny-random"), 2, 100, decoder=True)


def test_analysis_reads_decoder_module_names():
    from analysis.names import module_table
    names = [f"model.layers.{i}.{p}" for i in (0, 11) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    names += [f"transformer.h.{i}.{p}" for i in (0, 11) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    t = module_table(names[:14])
    assert t["layer"].tolist() == [0] * 7 + [11] * 7
    assert t["mtype"].tolist()[:7] == ["q", "k", "v", "o", "ffn-gate", "ffn-in", "ffn-out"]
    g = module_table(names[14:])
    assert g["layer"].tolist() == [0] * 4 + [11] * 4
    assert g["mtype"].tolist()[:4] == ["qkv", "o", "ffn-in", "ffn-out"]   # attn vs mlp c_proj apart


def test_label_words_must_name_every_label_once():
    assert lm.label_words(TaskConfig(), ["rotten", "fresh"]) == ["rotten", "fresh"]
    with pytest.raises(ValueError, match="give one word per label"):
        lm.label_words(answer_cfg(label_words=["a", "b", "c"]), ["rotten", "fresh"])
    with pytest.raises(ConfigError, match="two or more distinct words"):
        answer_cfg(label_words=["same", "same"])


def test_score_gives_the_zero_shot_scores_of_a_decoder_and_of_its_nf4_base():
    from experiments.score import score
    args = ["model=tiny_llama", "task=rotten_tomatoes_lm", "task.max_eval_samples=8", "task.max_len=48"]
    full, nf4 = score(args), score(args + ["model.quantize=nf4"])
    assert set(full["test"]) == {"loss", "perplexity", "exact_match", "accuracy", "macro_f1", "mcc"}
    assert full["n_test"] == nf4["n_test"] == 8 and nf4["quantize"] == "nf4"
    assert full["test"]["loss"] != nf4["test"]["loss"]            # the base really changed
    assert nf4["test"]["loss"] == pytest.approx(full["test"]["loss"], rel=0.05)


@pytest.mark.parametrize("override, says", [
    ("task=nope", "unknown task 'nope'; choose one of csv"),
    ("trainer.lrr=1", "unknown key 'trainer.lrr'; trainer has: epochs"),
    ("trainer.lr=abc", "trainer.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
])
def test_score_checks_its_overrides_in_one_line(override, says, capsys):
    from experiments.score import main
    assert main([override]) == 2                      # before: Hydra's multi-line reports
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1
