"""fastdpo.data: loading, prompt extraction, chat templating, tokenisation, truncation and row errors.

Fixtures are written by hand; the real HH file is only read in place by the smoke test.
"""

import csv
import gzip
import json
import logging

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from _shared import HH_HARMLESS, smollm2_tokenizer
from fastdpo.data import extract_prompt, load_rows, tokenize_pairs
from fastdpo.data import loading as data

ROWS = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(5)]


# ---- helpers --------------------------------------------------------------------------------------


def _write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def _write_json(path, rows, opener=open):
    with opener(path, "wt") as f:
        json.dump(rows, f)
    return path


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


WRITERS = {
    "data.jsonl": _write_jsonl,
    "data.json": _write_json,
    "data.jsonl.gz": lambda path, rows: _write_jsonl(path, rows, gzip.open),
    "data.json.gz": lambda path, rows: _write_json(path, rows, gzip.open),
    "data.parquet": _write_parquet,
    "data.csv": _write_csv,
}


@pytest.fixture(scope="module")
def word_tokenizer():
    """Whitespace word-level tokenizer with predictable ids: <unk> 0, <eos> 1, p0..p9 2..11, c0..c9 12..21,
    r0..r9 22..31. No chat template."""
    words = ["<unk>", "<eos>"] + [f"{kind}{i}" for kind in "pcr" for i in range(10)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


# Expected ids of word_tokenizer's words: P(0, 1) == ids of "p0 p1".
def P(*i):
    return [2 + k for k in i]


def C(*i):
    return [12 + k for k in i]


def R(*i):
    return [22 + k for k in i]


EOS = 1


def _rows(pairs):
    return datasets.Dataset.from_list(pairs)


def _ids(pairs):
    return [(row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]) for row in pairs]


# ---- load_rows ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WRITERS))
def test_load_each_file_type(tmp_path, name):
    path = WRITERS[name](tmp_path / name, ROWS)
    train, eval_ = load_rows(str(path))
    assert eval_ is None
    assert train.num_rows == 5
    assert train[3] == ROWS[3]


def test_load_directory_infers_splits(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    _write_jsonl(tmp_path / "test.jsonl", ROWS[4:])
    train, eval_ = load_rows(str(tmp_path), eval_split="test")
    assert train["prompt"] == [r["prompt"] for r in ROWS[:4]]
    assert eval_["prompt"] == [ROWS[4]["prompt"]]


@pytest.mark.parametrize("name", ["missing.jsonl", "no/such/dir", "./missing", "missing.parquet"])
def test_load_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing|no/such/dir"):
        load_rows(name)


def test_load_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"data\.txt.*\.jsonl.*\.parquet.*\.csv"):
        load_rows(str(path))


def test_load_missing_split(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"'validation'.*\['train'\]"):
        load_rows(str(path), split="validation")
    with pytest.raises(ValueError, match=r"'test'.*\['train'\]"):
        load_rows(str(path), eval_split="test")


def test_load_hub_name_goes_to_datasets(monkeypatch):
    calls = []
    fake = datasets.DatasetDict({"train": _rows(ROWS)})
    monkeypatch.setattr(data.datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or fake)
    train, _ = load_rows("someone/prefs", max_samples=2)
    assert calls == [(("someone/prefs",), {})]
    assert train.num_rows == 2


def test_max_samples_then_eval_fraction(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(300)]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    train, eval_ = load_rows(str(path), max_samples=250, eval_fraction=0.2)
    assert (train.num_rows, eval_.num_rows) == (200, 50)
    taken = set(train["prompt"]) | set(eval_["prompt"])
    assert len(taken) == 250 and taken == {f"q{i}" for i in range(250)}

    again_train, again_eval = load_rows(str(path), max_samples=250, eval_fraction=0.2)
    assert again_eval["prompt"] == eval_["prompt"] and again_train["prompt"] == train["prompt"]
    _, other_eval = load_rows(str(path), max_samples=250, eval_fraction=0.2, seed=7)
    assert other_eval["prompt"] != eval_["prompt"]


def test_max_samples_caps_eval_split(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS)
    _write_jsonl(tmp_path / "test.jsonl", ROWS)
    train, eval_ = load_rows(str(tmp_path), eval_split="test", max_samples=3)
    assert (train.num_rows, eval_.num_rows) == (3, 3)
    assert eval_["prompt"] == [r["prompt"] for r in ROWS[:3]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eval_split="test", eval_fraction=0.1), "not both"),
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(eval_fraction=0.0), "eval_fraction"),
        (dict(max_samples=0), "max_samples"),
    ],
)
def test_load_bad_options(tmp_path, kwargs, message):
    path = _write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match=message):
        load_rows(str(path), **kwargs)


# ---- extract_prompt ------------------------------------------------------------------------------

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def test_extract_hh_single_turn():
    head = f"{HUMAN} How do I pick a lock?{ASSISTANT}"
    prompt, chosen, rejected = extract_prompt(head + " I can't help with that.", head + " Sure, get a tension wrench.")
    assert prompt == head
    assert chosen == " I can't help with that."
    assert rejected == " Sure, get a tension wrench."


def test_extract_hh_multi_turn_shared_first_word():
    # The longest common prefix runs past the last "\n\nAssistant:" into "Why " (and "I" below):
    # both completions must still start with the whole reply.
    head = f"{HUMAN} Hi{ASSISTANT} Hello! How can I help?{HUMAN} Tell me a joke.{ASSISTANT}"
    prompt, chosen, rejected = extract_prompt(head + " Why did the chicken cross the road?", head + " Why not?")
    assert prompt == head
    assert (chosen, rejected) == (" Why did the chicken cross the road?", " Why not?")

    prompt, chosen, rejected = extract_prompt(head + " I can", head + " Ick.")
    assert (prompt, chosen, rejected) == (head, " I can", " Ick.")


def test_extract_hh_diverging_in_an_earlier_turn():
    head = f"{HUMAN} Hi{ASSISTANT}"
    chosen = head + f" Hello!{HUMAN} Thanks{ASSISTANT} Welcome."
    rejected = head + f" Go away.{HUMAN} Rude{ASSISTANT} Yes."
    assert extract_prompt(chosen, rejected) == (head, chosen[len(head):], rejected[len(head):])


def test_extract_plain_strings_follow_trl():
    # No "\n\nAssistant:": the longest common prefix, moved back one when it ends in a space.
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("abcX", "abcY") == ("abc", "X", "Y")
    assert extract_prompt("X", "Y") == ("", "X", "Y")


def test_extract_message_lists():
    user = {"role": "user", "content": "What color is the sky?"}
    blue = {"role": "assistant", "content": "It is blue."}
    green = {"role": "assistant", "content": "It is green."}
    assert extract_prompt([user, blue], [user, green]) == ([user], [blue], [green])

    system = {"role": "system", "content": "Be brief."}
    history = [system, user, blue, {"role": "user", "content": "And at night?"}]
    dark = {"role": "assistant", "content": "Dark."}
    black = {"role": "assistant", "content": "Black."}
    assert extract_prompt(history + [dark], history + [black]) == (history, [dark], [black])


def test_extract_rejects_mixed_types():
    with pytest.raises(ValueError, match="both"):
        extract_prompt("text", [{"role": "user", "content": "text"}])


# ---- tokenize_pairs: formats ---------------------------------------------------------------------


def test_standard_format_appends_eos(word_tokenizer):
    pairs, report = tokenize_pairs(_rows([{"prompt": "p0 p1", "chosen": "c0 c1", "rejected": "r0", "score": 3}]),
                                   word_tokenizer)
    assert pairs.column_names == ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    assert _ids(pairs) == [(P(0, 1), C(0, 1) + [EOS], R(0) + [EOS])]
    assert report == {"rows": 1, "kept": 1, "prompt_too_long": 0, "identical": 0}


def test_implicit_string_prompt(word_tokenizer):
    # "p0 p1 c0" vs "p0 p1 r0": the common prefix "p0 p1 " moves back before its space.
    pairs, _ = tokenize_pairs(_rows([{"chosen": "p0 p1 c0", "rejected": "p0 p1 r0 r1"}]), word_tokenizer)
    assert _ids(pairs) == [(P(0, 1), C(0) + [EOS], R(0, 1) + [EOS])]


def test_chat_template_system_and_multi_turn():
    tok = smollm2_tokenizer()
    prompt = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Rome."}],
           "rejected": [{"role": "assistant", "content": "Milan."}]}
    pairs, _ = tokenize_pairs(_rows([row]), tok)
    prompt_ids, chosen_ids, rejected_ids = _ids(pairs)[0]
    prompt_text = tok.decode(prompt_ids)
    assert prompt_text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n" in prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert tok.decode(chosen_ids) == "Rome.<|im_end|>\n"
    assert tok.decode(rejected_ids) == "Milan.<|im_end|>\n"
    # The template ends the turn; no extra EOS is appended.
    assert chosen_ids == tok("Rome.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert chosen_ids[-2] == tok.eos_token_id == 2


def test_chat_template_implicit_prompt():
    tok = smollm2_tokenizer()
    user = {"role": "user", "content": "Hi"}
    row = {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
           "rejected": [user, {"role": "assistant", "content": "Go away."}]}
    pairs, _ = tokenize_pairs(_rows([row]), tok)
    prompt_ids, chosen_ids, rejected_ids = _ids(pairs)[0]
    expected_prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt_ids == tok(expected_prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(chosen_ids) == "Hello!<|im_end|>\n"
    assert tok.decode(rejected_ids) == "Go away.<|im_end|>\n"


def test_conversational_needs_chat_template(word_tokenizer):
    row = {"prompt": [{"role": "user", "content": "p0"}], "chosen": [{"role": "assistant", "content": "c0"}],
           "rejected": [{"role": "assistant", "content": "r0"}]}
    with pytest.raises(ValueError, match="chat template"):
        tokenize_pairs(_rows([row]), word_tokenizer)


class _PrefixBreakingTemplate:
    """A tokenizer stand-in whose generation prompt is not a prefix of the rendered conversation."""

    chat_template = "stand-in"
    eos_token_id = 2

    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
        return "".join(m["content"] for m in messages) + ("<gen>" if add_generation_prompt else "")


def test_template_prompt_not_a_prefix():
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="row 0: .*does not start with"):
        tokenize_pairs(_rows([row]), _PrefixBreakingTemplate())


# ---- tokenize_pairs: truncation and dropping -----------------------------------------------------


@pytest.mark.parametrize(
    "mode, prompt",
    [("keep_end", P(2, 3, 4)), ("keep_start", P(0, 1, 2))],
)
def test_truncation_modes(word_tokenizer, mode, prompt):
    row = {"prompt": "p0 p1 p2 p3 p4", "chosen": "c0 c1 c2 c3", "rejected": "r0 r1"}
    pairs, report = tokenize_pairs(_rows([row]), word_tokenizer, max_length=6, max_prompt_length=3,
                                   truncation_mode=mode)
    # 6 - 3 prompt tokens leave 3 per completion; EOS counts and is cut like any token.
    assert _ids(pairs) == [(prompt, C(0, 1, 2), R(0, 1) + [EOS])]
    assert report["kept"] == 1


def test_no_limits(word_tokenizer):
    row = {"prompt": "p0 p1 p2 p3 p4", "chosen": "c0 c1 c2 c3", "rejected": "r0"}
    pairs, _ = tokenize_pairs(_rows([row]), word_tokenizer, max_length=None, max_prompt_length=None)
    assert _ids(pairs) == [(P(0, 1, 2, 3, 4), C(0, 1, 2, 3) + [EOS], R(0) + [EOS])]


def test_prompt_too_long_dropped_and_counted(word_tokenizer, caplog):
    rows = [
        {"prompt": "p0 p1 p2 p3 p4", "chosen": "c0", "rejected": "r0"},  # 5 >= max_length: dropped
        {"prompt": "p0 p1 p2 p3", "chosen": "c0 c1", "rejected": "r0"},  # 1 completion token left
        {"prompt": "p0 p1 p2 p3 p4 p5", "chosen": "c0", "rejected": "r0"},  # dropped
    ]
    with caplog.at_level(logging.INFO, logger="fastdpo.data"):
        pairs, report = tokenize_pairs(_rows(rows), word_tokenizer, max_length=5, max_prompt_length=None)
    assert _ids(pairs) == [(P(0, 1, 2, 3), C(0), R(0))]
    assert report == {"rows": 3, "kept": 1, "prompt_too_long": 2, "identical": 0}
    [record] = [r for r in caplog.records if r.name.startswith("fastdpo.data")]
    assert "kept 1" in record.getMessage() and "\n" not in record.getMessage()


def test_prompt_truncated_before_the_length_check(word_tokenizer):
    row = {"prompt": "p0 p1 p2 p3 p4 p5", "chosen": "c0 c1", "rejected": "r0"}
    pairs, report = tokenize_pairs(_rows([row]), word_tokenizer, max_length=4, max_prompt_length=2)
    assert _ids(pairs) == [(P(4, 5), C(0, 1), R(0) + [EOS])]
    assert report["prompt_too_long"] == 0


def test_identical_pairs_counted(word_tokenizer):
    user = {"role": "user", "content": "q"}
    answer = {"role": "assistant", "content": "a"}
    rows = [
        {"prompt": "p0", "chosen": "c0", "rejected": "c0"},
        {"prompt": "p0", "chosen": "c1", "rejected": "r1"},
        {"prompt": "p1", "chosen": "c2 c3", "rejected": "c2 c3"},
    ]
    pairs, report = tokenize_pairs(_rows(rows), word_tokenizer)
    assert _ids(pairs) == [(P(0), C(1) + [EOS], R(1) + [EOS])]
    assert report == {"rows": 3, "kept": 1, "prompt_too_long": 0, "identical": 2}

    # Implicit prompts: a whole identical dialogue leaves two empty completions, still "identical".
    dialogue = f"{HUMAN} q{ASSISTANT} a"
    implicit = [{"chosen": dialogue, "rejected": dialogue}, {"chosen": "p0 c0", "rejected": "p0 r0"}]
    assert tokenize_pairs(_rows(implicit), word_tokenizer)[1]["identical"] == 1
    conversational = [{"chosen": [user, answer], "rejected": [user, answer]},
                      {"chosen": [user, answer], "rejected": [user, {"role": "assistant", "content": "b"}]}]
    assert tokenize_pairs(_rows(conversational), smollm2_tokenizer())[1]["identical"] == 1


def test_nothing_left(word_tokenizer):
    with pytest.raises(ValueError, match="no pairs left after filtering.*'identical': 1"):
        tokenize_pairs(_rows([{"prompt": "p0", "chosen": "c0", "rejected": "c0"}]), word_tokenizer)


def test_bad_options(word_tokenizer):
    ds = _rows(ROWS)
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_pairs(ds, word_tokenizer, truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pairs(ds, word_tokenizer, max_length=0)


def test_second_call_hits_the_cache(tmp_path, word_tokenizer):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p0", "chosen": "c0", "rejected": "r0"}] * 3)
    train, _ = load_rows(str(path))
    first, _ = tokenize_pairs(train, word_tokenizer)
    second, _ = tokenize_pairs(train, word_tokenizer)
    assert first.cache_files and first.cache_files == second.cache_files


def test_num_proc_keeps_order(word_tokenizer):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    pairs, _ = tokenize_pairs(_rows(rows), word_tokenizer, num_proc=2)
    assert _ids(pairs) == [(P(i), C(i) + [EOS], R(i) + [EOS]) for i in range(10)]


# ---- tokenize_pairs: malformed rows --------------------------------------------------------------

GOOD = {"prompt": "p0", "chosen": "c0", "rejected": "r0"}
USER = {"role": "user", "content": "q"}
YES = {"role": "assistant", "content": "yes"}
NO = {"role": "assistant", "content": "no"}


def test_missing_column(word_tokenizer):
    with pytest.raises(ValueError, match=r"\['rejected'\].*\['prompt', 'chosen'\]"):
        tokenize_pairs(_rows([{"prompt": "p0", "chosen": "c0"}]), word_tokenizer)


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": "p0", "chosen": None, "rejected": "r0"}, "row 2: chosen must be a str"),
        ({"prompt": None, "chosen": "c0", "rejected": "r0"}, "row 2: prompt must be a str"),
        ({"prompt": "p0", "chosen": "c0", "rejected": ""}, "row 2: the rejected completion is empty"),
        ({"prompt": "p0", "chosen": "", "rejected": "r0"}, "row 2: the chosen completion is empty"),
    ],
)
def test_malformed_standard_rows(word_tokenizer, bad_row, message):
    with pytest.raises(ValueError, match=message):
        tokenize_pairs(_rows([GOOD, GOOD, bad_row, GOOD]), word_tokenizer)


def test_implicit_prompt_leaving_an_empty_completion(word_tokenizer):
    # The chosen dialogue ends exactly where the rejected reply begins: nothing to score.
    rows = [{"chosen": "p0 c0", "rejected": "p0 r0"},
            {"chosen": f"{HUMAN} q{ASSISTANT}", "rejected": f"{HUMAN} q{ASSISTANT} a"}]
    with pytest.raises(ValueError, match="row 1: the chosen completion is empty"):
        tokenize_pairs(_rows(rows), word_tokenizer)


def test_whitespace_reply_is_kept():
    # As in a few real HH rows: the preferred reply is a lone space (the assistant declined to answer).
    tok = smollm2_tokenizer()
    pairs, report = tokenize_pairs(_rows([{"chosen": f"{HUMAN} q{ASSISTANT} ", "rejected": f"{HUMAN} q{ASSISTANT} a"}]),
                                   tok)
    assert report["kept"] == 1
    assert pairs[0]["chosen_input_ids"] == tok(" ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_wrong_type_in_row_zero(word_tokenizer):
    with pytest.raises(ValueError, match="row 0: chosen must be a str"):
        tokenize_pairs(_rows([{"prompt": "p0", "chosen": 3, "rejected": 4}]), word_tokenizer)


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": [NO]},
         r"row 1: chosen\[0\] must be a dict with 'role' and 'content'"),
        ({"prompt": [USER], "chosen": [YES], "rejected": [{"content": "no"}]},
         r"row 1: rejected\[0\] must be a dict with 'role' and 'content'"),
        ({"prompt": [], "chosen": [YES], "rejected": [NO]}, "row 1: prompt is an empty message list"),
        ({"prompt": [USER], "chosen": [], "rejected": [NO]}, "row 1: the chosen completion has no message"),
        ({"prompt": [USER], "chosen": [YES], "rejected": [{"role": "assistant", "content": ""}]},
         "row 1: the rejected completion has no message"),
        ({"prompt": [USER], "chosen": None, "rejected": [NO]}, "row 1: chosen must be a list"),
    ],
)
def test_malformed_conversational_rows(bad_row, message):
    good = {"prompt": [USER], "chosen": [YES], "rejected": [NO]}
    with pytest.raises(ValueError, match=message):
        tokenize_pairs(_rows([good, bad_row]), smollm2_tokenizer())


def test_string_prompt_beside_message_lists_is_ignored():
    # HuggingFaceH4/ultrafeedback_binarized's layout: TRL extracts the prompt from the messages.
    tok = smollm2_tokenizer()
    row = {"prompt": "a copy of q", "chosen": [USER, YES], "rejected": [USER, NO]}
    pairs, _ = tokenize_pairs(_rows([row]), tok)
    expected = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert _ids(pairs)[0][0] == tok(expected, add_special_tokens=False)["input_ids"]


def test_prompt_type_must_match_the_completions(word_tokenizer):
    with pytest.raises(ValueError, match="row 0: prompt must be a str"):
        tokenize_pairs(_rows([{"prompt": [USER], "chosen": "c0", "rejected": "r0"}]), word_tokenizer)
    with pytest.raises(ValueError, match="row 1: prompt must be a list"):
        tokenize_pairs(_rows([{"prompt": [USER], "chosen": [YES], "rejected": [NO]},
                              {"prompt": None, "chosen": [YES], "rejected": [NO]}]), smollm2_tokenizer())


def test_implicit_conversation_without_shared_prompt():
    rows = [{"chosen": [USER, YES], "rejected": [USER, NO]}, {"chosen": [YES], "rejected": [NO]}]
    with pytest.raises(ValueError, match="row 1: .*no prompt"):
        tokenize_pairs(_rows(rows), smollm2_tokenizer())


def test_row_index_is_the_input_position_across_batches(word_tokenizer):
    rows = [GOOD] * 1500 + [{"prompt": "p0", "chosen": "c0", "rejected": ""}]
    with pytest.raises(ValueError, match="row 1500:"):
        tokenize_pairs(_rows(rows), word_tokenizer)


# ---- Real data -----------------------------------------------------------------------------------


@pytest.mark.skipif(not HH_HARMLESS.exists(), reason="shared HH-RLHF file not present")
def test_hh_smoke():
    tok = smollm2_tokenizer()
    train, _ = load_rows(str(HH_HARMLESS), max_samples=20)
    pairs, report = tokenize_pairs(train, tok, max_length=512, max_prompt_length=256)
    assert report["rows"] == 20 and report["kept"] + report["prompt_too_long"] + report["identical"] == 20
    assert report["kept"] > 0
    marker = tok(ASSISTANT, add_special_tokens=False)["input_ids"]
    for prompt_ids, chosen_ids, rejected_ids in _ids(pairs):
        assert prompt_ids[-len(marker):] == marker
        assert chosen_ids and rejected_ids
        assert len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= 512
