"""Every input format, the malformed cases, ids/tags, and response-only tokenisation."""

import json

import pytest

from iprox.data import DataError, Example, collate, load_examples, tokenize_example, tokenize_examples


def _jsonl(tmp_path, name, recs):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return p


FORMATS = {
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]},
                 [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")]),
    "prompt_completion": ({"prompt": "2+2?", "completion": "4"}, [("user", "2+2?"), ("assistant", "4")]),
    "prompt_completion_turns": ({"prompt": [{"role": "user", "content": "2+2?"}],
                                 "completion": [{"role": "assistant", "content": "4"}]},
                                [("user", "2+2?"), ("assistant", "4")]),
    "alpaca": ({"instruction": "Add.", "input": "2 and 2", "output": "4"},
               [("user", "Add.\n\n2 and 2"), ("assistant", "4")]),
    "alpaca_no_input": ({"instruction": "Add 2 and 2.", "input": "", "output": "4"},
                        [("user", "Add 2 and 2."), ("assistant", "4")]),
    "dolly": ({"instruction": "Add.", "context": "2 and 2", "response": "4", "category": "open_qa"},
              [("user", "Add.\n\n2 and 2"), ("assistant", "4")]),
    "gsm8k": ({"question": "2+2?", "answer": "2+2=4\n#### 4"}, [("user", "2+2?"), ("assistant", "2+2=4\n#### 4")]),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats_normalise_to_messages(tmp_path, fmt):
    rec, expected = FORMATS[fmt]
    p = _jsonl(tmp_path, "mydata.jsonl", [rec])
    (ex,) = load_examples(str(p))
    assert [(m["role"], m["content"]) for m in ex.messages] == expected
    assert ex.id == "mydata.jsonl:1"
    assert ex.source == "mydata"
    assert ex.task == ("open_qa" if fmt == "dolly" else "mydata")
    assert ex.raw == json.dumps(rec)


def test_own_id_source_task_fields_win(tmp_path):
    p = _jsonl(tmp_path, "train.jsonl", [{"id": "x7", "source": "s", "task": "t", "prompt": "a", "completion": "b"}])
    (ex,) = load_examples(str(p))
    assert (ex.id, ex.source, ex.task) == ("x7", "s", "t")


def test_generic_file_name_takes_folder_as_source(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    p = _jsonl(tmp_path / "gsm8k", "train.jsonl", [{"question": "q", "answer": "a"}])
    assert load_examples(str(p))[0].source == "gsm8k"


def test_bbh_file_and_folder(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    for task in ["snarks", "hyperbaton"]:
        (d / f"{task}.json").write_text(json.dumps({"canary": "x", "examples": [
            {"input": f"{task} q{i}", "target": "(A)"} for i in range(3)]}))
    exs = load_examples(str(d))
    assert len(exs) == 6
    assert [e.task for e in exs] == ["hyperbaton"] * 3 + ["snarks"] * 3   # sorted file order
    assert {e.source for e in exs} == {"bbh"}
    assert exs[0].id == "hyperbaton:0"
    assert exs[0].messages[-1] == {"role": "assistant", "content": "(A)"}
    assert len(load_examples(str(d / "snarks.json"))) == 3


def test_json_list_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "b.parquet")
    a = load_examples(str(tmp_path / "a.json"))
    b = load_examples(str(tmp_path / "b.parquet"))
    assert [e.messages for e in a] == [e.messages for e in b]
    assert b[2].id == "b.parquet:2"


def test_blank_lines_skipped_line_numbers_kept(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert [e.id for e in load_examples(str(p))] == ["d.jsonl:1", "d.jsonl:3"]


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "a", "completion": ', "malformed JSON"),
    ('{"foo": 1, "bar": 2}', "unknown record format"),
    ('{"prompt": "a", "completion": "   "}', "empty"),
    ('{"question": "a"}', "unknown record format"),
    ('{"question": 3, "answer": "x"}', "must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last turn must be the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_records_name_file_and_line(tmp_path, line, match):
    p = _jsonl(tmp_path, "bad.jsonl", ['{"prompt": "ok", "completion": "fine"}', line])
    with pytest.raises(DataError, match=match) as ei:
        load_examples(str(p))
    assert f"{p}:2" in str(ei.value)


def test_missing_path_unknown_suffix_and_duplicate_ids(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(str(tmp_path / "x.csv"))
    p = _jsonl(tmp_path, "dup.jsonl", [{"id": 1, "prompt": "a", "completion": "b"}, {"id": 1, "prompt": "c", "completion": "d"}])
    with pytest.raises(DataError, match="duplicate"):
        load_examples(str(p))


def _ex(user, answer):
    return Example("e", "s", "t", [{"role": "user", "content": user}, {"role": "assistant", "content": answer}])


def test_labels_cover_assistant_tokens_only(tokenizer):
    t = tokenize_example(tokenizer, _ex("What is two plus two?", "four"), 512)
    resp = tokenizer.decode([i for i, l in zip(t.input_ids, t.labels) if l != -100])
    assert resp == "four<|im_end|>\n"
    assert all(l == i for i, l in zip(t.input_ids, t.labels) if l != -100)


def test_multi_turn_labels_every_assistant_turn(tokenizer):
    ex = Example("e", "s", "t", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B1"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "D2"}])
    t = tokenize_example(tokenizer, ex, 512)
    assert tokenizer.decode([i for i, l in zip(t.input_ids, t.labels) if l != -100]) == "B1<|im_end|>\nD2<|im_end|>\n"


def test_truncation_keeps_the_response_and_counts(tokenizer):
    long_prompt = "x" * 300
    exs = [_ex(long_prompt, "the answer"), _ex("short", "y" * 300), _ex("hi", "ok")]
    out, stats = tokenize_examples(tokenizer, exs, max_length=64)
    assert all(len(t.input_ids) <= 64 for t in out)
    assert tokenizer.decode([i for i, l in zip(out[0].input_ids, out[0].labels) if l != -100]) == "the answer<|im_end|>\n"
    assert stats.prompt_truncated == 2 and stats.response_truncated == 1
    assert out[1].n_response_tokens > 0 and out[1].labels[0] == -100    # a quarter of the budget stays prompt
    assert len(out[2].input_ids) < 64


def test_collate_pads_right_with_masked_labels(tokenizer):
    out, _ = tokenize_examples(tokenizer, [_ex("a", "b"), _ex("a longer prompt", "and answer")], 512)
    enc = collate(out, tokenizer.pad_token_id)
    n0 = len(out[0].input_ids)
    assert enc["input_ids"].shape[0] == 2
    assert enc["attention_mask"][0, n0:].sum() == 0 and (enc["labels"][0, n0:] == -100).all()
    assert (enc["input_ids"][0, n0:] == tokenizer.pad_token_id).all()


def test_same_file_name_in_two_folders_gets_folder_qualified_ids(tmp_path):
    from iprox.data import load_examples

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "train.jsonl").write_text('{"question": "q", "answer": "x"}\n{"question": "r", "answer": "y"}\n')
    alone = load_examples(str(tmp_path / "a"))
    assert [e.id for e in alone] == ["train.jsonl:1", "train.jsonl:2"]  # no clash: ids as before
    both = load_examples([str(tmp_path / "a"), str(tmp_path / "b" / "train.jsonl")])
    assert [e.id for e in both] == ["a/train.jsonl:1", "a/train.jsonl:2", "b/train.jsonl:1", "b/train.jsonl:2"]
    (tmp_path / "c.jsonl").write_text('{"id": "train.jsonl:1", "question": "q", "answer": "x"}\n')
    with pytest.raises(Exception, match="duplicate example ids"):  # an explicit id still clashes honestly
        load_examples([str(tmp_path / "a"), str(tmp_path / "c.jsonl")])


def test_pool_stage_samples_by_seed_and_keeps_validation_out(tmp_path):
    from iprox.pool import PoolConfig, load_pool, write_pool

    recs = [{"prompt": f"q{i}?", "completion": f"a{i}"} for i in range(40)]
    src = _jsonl(tmp_path, "src.jsonl", recs)

    def ids(path):
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]

    def make(out, seed):
        # validation and pool both sample the same file: a validation record must never be a candidate
        return write_pool(PoolConfig(pool=[{"path": str(src), "sample": 30}], validation=[{"path": str(src), "sample": 8}],
                                     seed=seed, out=str(tmp_path / out)))

    pool_f, val_f = make("a", 0)
    pool, val = ids(pool_f), ids(val_f)
    assert len(val) == 8 and len(pool) == 30 and not set(pool) & set(val)
    assert pool == sorted(pool, key=lambda i: int(i.split(":")[1]))  # file order, not sample order
    assert (ids(make("b", 0)[0]), ids(make("b", 0)[1])) == (pool, val)  # same seed, same records
    assert ids(make("c", 1)[1]) != val
    assert load_pool(tmp_path / "a") == (pool_f, val_f)
    with pytest.raises(FileNotFoundError, match="no finished pool stage"):
        load_pool(tmp_path / "missing")
    with pytest.raises(ValueError, match="sample must be a whole number"):
        PoolConfig(pool=[{"path": str(src), "sample": -1}], validation=[str(src)])
