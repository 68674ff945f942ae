import json

import pytest

from rlhf_cluster.data import (
    DataError,
    FeedbackExample,
    build_feedback_examples,
    build_preference_examples,
    build_prompt_examples,
    build_sft_examples,
    load_examples,
    load_rows,
    preference_to_feedback,
)

LIMITS = dict(max_prompt_length=256, max_response_length=256)


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chat(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ----------------------------------------------------------------------------- loading

ROWS = [
    {"prompt": "what is two plus two", "answer": "4", "score": 1.5, "messages": msgs(("user", "hi"), ("assistant", "hello"))},
    {"prompt": "name a colour", "answer": "red", "score": -0.25, "messages": msgs(("system", "s"), ("user", "yo"))},
    {"prompt": "say hello", "answer": "hello", "score": 0.0, "messages": msgs(("user", "a"), ("assistant", "b"))},
]


def test_all_formats_give_identical_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n   \n" + json.dumps(ROWS[2]) + "\n")
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 2, "data": ROWS}))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS[:1])).save_to_disk(
        str(tmp_path / "dd")
    )
    for name in ["d.jsonl", "list.json", "wrapped.json", "d.parquet", "ds", "dd"]:
        rows = load_rows(tmp_path / name)
        assert list(rows) == ROWS, name
        assert rows.source == str(tmp_path / name)
    rows = load_rows(jsonl)  # blank lines are skipped, rows keep their line numbers
    assert (rows.unit, rows.numbers) == ("line", [1, 3, 5])
    for name in ["list.json", "wrapped.json", "d.parquet", "ds", "dd"]:  # every other format counts rows from 1
        assert (load_rows(tmp_path / name).unit, load_rows(tmp_path / name).numbers) == ("row", [1, 2, 3]), name


def test_datasetdict_without_train_lists_splits(tmp_path):
    import datasets

    datasets.DatasetDict(dev=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS)).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match=r"no 'train' split \(splits: dev, test\)"):
        load_rows(tmp_path / "dd")


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": oops}\n', r"line 3 of .*bad\.jsonl: not valid JSON"),
        ("arr.jsonl", '{"prompt": "a"}\n[1, 2]\n', r"line 2 of .*arr\.jsonl: expected a JSON object, got list"),
        ("empty.jsonl", "", r"empty.jsonl: no rows \(the file is empty\)"),
        ("blank.jsonl", "\n  \n", r"blank.jsonl: no rows"),
        ("empty.json", "", r"empty.json: no rows"),
        ("emptylist.json", "[]", r"emptylist.json: no rows"),
        ("lines.json", '{"a": 1}\n{"a": 2}\n', r"lines.json: not valid JSON .*rename it to \.jsonl"),
        ("two.json", '{"a": [], "b": []}', r"two.json: .*exactly one list of rows.*found 2 list-valued keys among: a, b"),
        ("scalars.json", '[{"a": 1}, 5]', r"row 2 of .*scalars.json: expected a JSON object, got int"),
        ("first.json", '[5, {"a": 1}]', r"row 1 of .*first.json: expected a JSON object, got int"),
        ("d.csv", "a,b\n", r"d.csv: unsupported file type '.csv'; use JSONL \(.jsonl\), JSON \(.json\), Parquet"),
        ("broken.parquet", "not parquet", r"broken.parquet: not a readable Parquet file"),
    ],
)
def test_load_errors(tmp_path, name, content, pattern):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_rows(tmp_path / name)


def test_json_list_rows_count_from_one_in_builder_errors(tmp_path, tok):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match=r"^row 1 of .*prefs\.json: missing key 'rejected'"):
        load_examples("preference", path, tok, **LIMITS)
    path.write_text(json.dumps({"data": [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]}))
    with pytest.raises(DataError, match=r"^row 2 of .*prefs\.json: missing key 'rejected'"):
        load_examples("preference", path, tok, **LIMITS)
    examples, _ = load_examples("prompt", path, tok, max_prompt_length=64)
    assert [ex.row for ex in examples] == [1, 2]


# ----------------------------------------------------------------------------- encodings and line endings


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.json"])
def test_non_utf8_names_line_column_and_fix(tmp_path, name):
    lines = [b'{"prompt": "a"}', b'{"prompt": "\xc3\xa9t\xc3\xa9"}', b'{"p": "caf\xe9"}']  # line 2 is UTF-8 é; line 3 Latin-1
    if name.endswith(".json"):
        lines = [b"[" + lines[0] + b",", lines[1] + b",", lines[2] + b"]"]
    (tmp_path / name).write_bytes(b"\r\n".join(lines) + b"\r\n")
    with pytest.raises(DataError) as e:
        load_rows(tmp_path / name)
    assert str(e.value) == f"line 3 of {tmp_path / name}: not UTF-8 (byte 0xe9 at column 11); re-save the file as UTF-8"


def test_non_utf8_column_counts_characters_after_earlier_multibyte_ones(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"p": "\xc3\xa9\xff"}\n')  # é is 2 bytes but 1 column; 0xff is never UTF-8
    with pytest.raises(DataError, match=r"^line 3 of .*p\.jsonl: not UTF-8 \(byte 0xff at column 9\); re-save the file as UTF-8$"):
        load_rows(path)


def test_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"prompt": "a"}\n'.encode("utf-16"))  # what PowerShell 5's > writes
    with pytest.raises(DataError, match=r"p\.jsonl: UTF-16 text .*; re-save the file as UTF-8$"):
        load_rows(path)


def test_utf8_bom_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"prompt": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "b.json").write_bytes(bom + b'[{"prompt": "a"}, {"prompt": "b"}]')
    for name in ["b.jsonl", "b.json"]:
        assert list(load_rows(tmp_path / name)) == [{"prompt": "a"}, {"prompt": "b"}], name
    assert load_rows(tmp_path / "b.jsonl").numbers == [1, 2]
    (tmp_path / "c.jsonl").write_bytes(bom + b'{"prompt": "a"}\n{"prompt": oops}\n')  # line numbers unchanged by the BOM
    with pytest.raises(DataError, match=r"^line 2 of .*c\.jsonl: not valid JSON"):
        load_rows(tmp_path / "c.jsonl")


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_endings_and_blank_lines_keep_true_line_numbers(tmp_path, newline):
    path = tmp_path / "p.jsonl"
    lines = ['{"prompt": "a"}', "", '{"prompt": "b"}', "  \t", "", '{"prompt": "c"}', "[1]"]
    path.write_bytes(newline.join(lines).encode())
    with pytest.raises(DataError, match=r"^line 7 of .*p\.jsonl: expected a JSON object, got list"):
        load_rows(path)
    path.write_bytes(newline.join(lines[:-1] + [""]).encode())
    rows = load_rows(path)
    assert (list(rows), rows.numbers) == ([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], [1, 3, 6])
    assert "\r" not in rows[2]["prompt"]


def test_json_error_line_counts_crlf_once(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b'[\r\n{"prompt": "a"},\r\n{"prompt": oops}\r\n]')
    with pytest.raises(DataError, match=r"p\.json: not valid JSON \(Expecting value at line 3 column 12\)"):
        load_rows(path)


def test_unicode_line_separators_inside_strings_do_not_split_jsonl_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a\u2028b\x85c\x0cd"}, {"prompt": "e"}]  # json.dumps(ensure_ascii=False) writes these raw
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    loaded = load_rows(path)
    assert (list(loaded), loaded.numbers) == (rows, [1, 2])


def test_load_missing_path_and_plain_directory(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a directory, but not one written by datasets' save_to_disk"):
        load_rows(tmp_path / "plain")


# ----------------------------------------------------------------------------- prompts


def test_prompt_examples_with_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is two plus two", "answer": "4"}])
    with path.open("a") as f:
        f.write("\n" + json.dumps({"prompt": msgs(("system", "be brief"), ("user", "say hello"))}) + "\n")
    examples, report = load_examples("prompt", path, tok, max_prompt_length=256)
    a, b = examples
    assert "<|user|>" in a.prompt_text and a.prompt_text.endswith("<|assistant|>")
    assert a.prompt_text == chat(tok, msgs(("user", "what is two plus two")))
    assert a.prompt_ids == enc(tok, a.prompt_text) and tok.decode(a.prompt_ids) == a.prompt_text
    assert a.extra == {"answer": "4"} and a.row == 1
    assert b.prompt_text == "<|system|>be brief</s><|user|>say hello</s><|assistant|>"
    assert b.row == 3 and b.extra == {}
    assert (report.rows, report.prompts_truncated) == (2, 0)
    assert report.summary() == f"{path}: 2 rows, 0 prompts truncated"


def test_prompt_examples_without_template(tok):
    (ex,), _ = build_prompt_examples([{"prompt": "say hello"}], tok, source="s", apply_chat_template=False, max_prompt_length=64)
    assert ex.prompt_ids == enc(tok, "say hello") and ex.prompt_text == "say hello"
    with pytest.raises(DataError, match=r"row 1 of s: 'prompt' is a list of chat messages but apply_chat_template is off"):
        build_prompt_examples([{"prompt": msgs(("user", "x"))}], tok, source="s", apply_chat_template=False, max_prompt_length=64)


# ----------------------------------------------------------------------------- SFT


def test_sft_prompt_response_loss_mask(tok):
    rows = [{"prompt": "what is two plus two", "response": "it is four"}]
    (ex,), report = build_sft_examples(rows, tok, source="s", **LIMITS)
    prompt_ids = enc(tok, chat(tok, msgs(("user", "what is two plus two"))))
    response_ids = enc(tok, "it is four") + [tok.eos_token_id]
    assert ex.input_ids == prompt_ids + response_ids
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * len(response_ids)
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert tok.decode(trained) == "it is four</s>"
    assert ex.input_ids.count(tok.eos_token_id) == 2  # one closing the user turn, one closing the response
    assert report.summary() == "s: 1 rows, 0 prompts truncated, 0 responses truncated"


def test_sft_messages_trains_on_last_assistant_only(tok):
    conv = msgs(("system", "be kind"), ("user", "hi"), ("assistant", "hello"), ("user", "how are you"), ("assistant", "very well"))
    (ex,), _ = build_sft_examples([{"messages": conv}], tok, source="s", **LIMITS)
    n = ex.loss_mask.index(1)
    assert set(ex.loss_mask[n:]) == {1} and set(ex.loss_mask[:n]) == {0}
    assert tok.decode(ex.input_ids[:n]) == chat(tok, conv[:-1])
    assert tok.decode(ex.input_ids[n:]) == "very well</s>"
    assert ex.input_ids[n:] == enc(tok, "very well") + [tok.eos_token_id]


@pytest.mark.parametrize(
    "row, pattern",
    [
        ({"messages": msgs(("user", "hi"), ("assistant", "yo"), ("user", "?"))},
         r"the last message of 'messages' is from 'user'; it must be the assistant's reply"),
        ({"messages": msgs(("assistant", "yo"))}, r"'messages' has only the assistant reply"),
        ({"messages": "hi"}, r"'messages' must be a list of chat messages, got str"),
        ({"messages": msgs(("user", "a"), ("assistant", "b")), "response": "b"}, r"has both 'messages' and 'response'"),
        ({"prompt": "a"}, r"missing key 'response' \(keys present: prompt\); rename the column or set data.response_key"),
        ({"text": "a"}, r"missing keys: give 'prompt' and 'response', or 'messages' \(keys present: text\)"),
        ({"prompt": "a", "response": "  "}, r"'response' is empty"),
    ],
)
def test_sft_errors(tok, row, pattern):
    with pytest.raises(DataError, match=r"row 2 of sft.json: " + pattern):
        build_sft_examples([{"prompt": "ok", "response": "fine"}, row], tok, source="sft.json", **LIMITS)


# ----------------------------------------------------------------------------- preferences / feedback


def test_preference_examples(tok):
    rows = [
        {"prompt": "name a colour", "chosen": "red", "rejected": "the sky is", "margin": 2},
        {"prompt": msgs(("user", "say hello")), "chosen": msgs(("user", "say hello"), ("assistant", "hello")),
         "rejected": msgs(("assistant", "bye"))},
    ]
    (a, b), report = build_preference_examples(rows, tok, source="s", **LIMITS)
    assert tok.decode(a.prompt_ids) == "<|user|>name a colour</s><|assistant|>"
    assert tok.decode(a.chosen_ids) == "red</s>" and tok.decode(a.rejected_ids) == "the sky is</s>"
    assert a.chosen_ids == enc(tok, "red") + [tok.eos_token_id]
    assert a.margin == 2.0 and isinstance(a.margin, float) and b.margin is None
    assert (tok.decode(b.chosen_ids), tok.decode(b.rejected_ids)) == ("hello</s>", "bye</s>")
    assert report.rows == 2

    fb = preference_to_feedback([a, b])
    assert [(f.completion_ids, f.desirable, f.row) for f in fb] == [
        (a.chosen_ids, True, 1), (a.rejected_ids, False, 1), (b.chosen_ids, True, 2), (b.rejected_ids, False, 2)
    ]
    assert all(f.prompt_ids == a.prompt_ids for f in fb[:2])


@pytest.mark.parametrize(
    "row, pattern",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"'chosen' and 'rejected' are identical"),
        ({"prompt": "p", "chosen": "a"},
         r"missing key 'rejected' \(keys present: prompt, chosen\); rename the column or set data.rejected_key"),
        ({"prompt": "p", "chosen": "a", "rejected": None}, r"'rejected' is null"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, r"'margin' must be a finite number, got str 'big'"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, r"'margin' must be a finite number"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"'chosen' must be a string or a list of chat messages, got int"),
        ({"prompt": "p", "chosen": msgs(("user", "a")), "rejected": "b"}, r"the last message of 'chosen' is from 'user'"),
    ],
)
def test_preference_errors(tmp_path, tok, row, pattern):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError, match=r"line 2 of .*prefs\.jsonl: " + pattern):
        load_examples("preference", path, tok, **LIMITS)


def test_feedback_examples(tok):
    rows = [{"prompt": "p", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": 0},
            {"prompt": "p", "completion": "ok", "label": 1}]
    examples, _ = build_feedback_examples(rows, tok, source="s", **LIMITS)
    assert [e.desirable for e in examples] == [True, False, True]
    assert examples[1] == FeedbackExample(enc(tok, chat(tok, msgs(("user", "p")))), enc(tok, "bad") + [tok.eos_token_id], False, 2)


@pytest.mark.parametrize("label", ["yes", 2, 1.0, None])
def test_feedback_label_must_be_bool(tok, label):
    row = {"prompt": "p", "completion": "c", "label": label}
    with pytest.raises(DataError, match=r"row 1 of kto: 'label' (must be a bool \(or 0/1\)|is null)"):
        build_feedback_examples([row], tok, source="kto", **LIMITS)


# ----------------------------------------------------------------------------- truncation


def test_truncation_keeps_prompt_end_and_response_start(tok):
    prompt, response = "the quick brown fox jumps over the lazy dog", "hello there my good friend"
    p_ids, r_ids = enc(tok, prompt), enc(tok, response) + [tok.eos_token_id]
    assert len(p_ids) > 4 and len(r_ids) > 5
    rows = [{"prompt": prompt, "response": response}, {"prompt": "hi", "response": "yo"}]
    (a, b), report = build_sft_examples(rows, tok, source="t.jsonl", apply_chat_template=False,
                                        max_prompt_length=4, max_response_length=5)
    assert a.input_ids == p_ids[-4:] + r_ids[:5] and a.loss_mask == [0] * 4 + [1] * 5
    assert tok.eos_token_id not in a.input_ids  # the truncated response lost its EOS
    assert b.input_ids == enc(tok, "hi") + enc(tok, "yo") + [tok.eos_token_id]
    assert (report.prompts_truncated, report.responses_truncated) == (1, 1)
    assert report.summary() == "t.jsonl: 2 rows, 1 prompts truncated to 4 tokens, 1 responses truncated to 5 tokens"

    (ex,), report = build_prompt_examples(rows[:1], tok, source="t", apply_chat_template=False, max_prompt_length=4)
    assert ex.prompt_ids == p_ids[-4:] and ex.prompt_text == prompt and report.prompts_truncated == 1

    (pref,), report = build_preference_examples([{"prompt": prompt, "chosen": response, "rejected": "no"}], tok, source="t",
                                                apply_chat_template=False, max_prompt_length=4, max_response_length=5)
    assert (pref.prompt_ids, pref.chosen_ids, pref.rejected_ids) == (p_ids[-4:], r_ids[:5], enc(tok, "no") + [tok.eos_token_id])
    assert (report.prompts_truncated, report.responses_truncated) == (1, 1)


def test_truncation_error_names_row_length_and_limit(tok):
    prompt = "the quick brown fox jumps over the lazy dog"
    n = len(enc(tok, prompt))
    rows = [{"prompt": "hi", "response": "yo"}, {"prompt": prompt, "response": "yo"}]
    with pytest.raises(DataError, match=rf"row 2 of t: prompt is {n} tokens, over max_prompt_length=4; "
                                         r"raise data.max_prompt_length or set data.truncation=truncate"):
        build_sft_examples(rows, tok, source="t", apply_chat_template=False, max_prompt_length=4,
                           max_response_length=64, truncation="error")
    with pytest.raises(DataError, match=r"row 1 of t: response is \d+ tokens, over max_response_length=2"):
        build_sft_examples([{"prompt": "hi", "response": "hello there"}], tok, source="t", max_prompt_length=64,
                           max_response_length=2, truncation="error")


# ----------------------------------------------------------------------------- row checks


@pytest.mark.parametrize(
    "prompt, pattern",
    [
        (42, r"'prompt' must be a string or a list of chat messages, got int 42"),
        ("", r"'prompt' is empty"),
        ([], r"'prompt' is an empty list of messages"),
        (["hi"], r"'prompt'\[0\] must be a \{'role', 'content'\} dict, got str 'hi'"),
        ([{"role": "user"}], r"'prompt'\[0\] must be a \{'role', 'content'\} dict"),
        ([{"role": "bot", "content": "hi"}], r"'prompt'\[0\] has role 'bot'; expected one of system, user, assistant"),
        ([{"role": "user", "content": 5}], r"'prompt'\[0\]\['content'\] must be a string, got int"),
        (msgs(("user", " ")), r"'prompt' is empty"),
    ],
)
def test_prompt_row_errors(tmp_path, tok, prompt, pattern):
    path = tmp_path / "rl.json"
    path.write_text(json.dumps({"data": [{"prompt": "ok"}, {"prompt": "fine"}, {"prompt": prompt}]}))
    with pytest.raises(DataError, match=r"row 3 of .*rl\.json: " + pattern):
        load_examples("prompt", path, tok, max_prompt_length=64)


def test_missing_prompt_key_and_custom_key(tok):
    with pytest.raises(DataError,
                       match=r"row 1 of s: missing key 'prompt' \(keys present: question\); rename the column or set data.prompt_key"):
        build_prompt_examples([{"question": "hi"}], tok, source="s", max_prompt_length=64)
    (ex,), _ = build_prompt_examples([{"question": "hi"}], tok, source="s", prompt_key="question", max_prompt_length=64)
    assert ex.extra == {}


def test_load_examples_rejects_unknown_kind_and_bad_options(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="expected one of prompt, sft, preference, feedback"):
        load_examples("dpo", path, tok)
    with pytest.raises(ValueError, match="truncation must be 'truncate' or 'error'"):
        load_examples("prompt", path, tok, max_prompt_length=8, truncation="drop")
    with pytest.raises(ValueError, match="max_prompt_length must be a positive int"):
        load_examples("prompt", path, tok, max_prompt_length=0)
