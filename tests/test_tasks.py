"""Task registry and question loading: shipped samples, full shared data, NAT files, user files, errors."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from nat_ray import paths
from nat_ray.errors import ConfigError, DataError
from nat_ray.tasks import BUILTIN_NAMES, TASKS, Question, Task, get_task, loaders

FULL_DATA = paths.shared_data_dir()
needs_full_data = pytest.mark.skipif(FULL_DATA is None, reason="no shared/data folder on this machine")


def write_jsonl(path: Path, records: list[Any]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_full_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point NAT_RAY_DATA_DIR at an empty folder, so only the data shipped in the package is found."""
    empty = tmp_path / "empty_data"
    empty.mkdir()
    monkeypatch.setenv("NAT_RAY_DATA_DIR", str(empty))
    assert paths.data_dirs() == [empty, paths.PACKAGE_DATA_DIR]
    return empty


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_registry_names_families_and_tools() -> None:
    assert BUILTIN_NAMES == ("gsm8k", "asdiv", "svamp", "multiarith", "hotpotqa", "strategyqa")
    assert set(BUILTIN_NAMES) <= set(TASKS)
    for name in BUILTIN_NAMES:
        task = TASKS[name]
        assert task.name == name
        assert task.family in ("math", "hotpotqa", "strategyqa")
        assert task.tools == (("calculate",) if task.family == "math" else ("search",))
        assert "test" in task.splits
        assert set(task.filters) <= set(task.splits)
        assert all(task.splits[s] for s in task.splits)


def test_task_tools_are_registered() -> None:
    tools = pytest.importorskip("nat_ray.tools")
    for name in BUILTIN_NAMES:  # other tests register task files whose plug-ins they unload again
        assert set(TASKS[name].tools) <= set(tools.REGISTRY)


def test_get_task_is_case_insensitive() -> None:
    assert get_task("GSM8K") is TASKS["gsm8k"]
    assert get_task("StrategyQA") is TASKS["strategyqa"]
    assert get_task("ASDiv") is TASKS["asdiv"]


def test_unknown_task_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="unknown task 'chess'") as err:
        get_task("chess")
    assert "gsm8k" in str(err.value) and "strategyqa" in str(err.value)


def test_unknown_split() -> None:
    with pytest.raises(ConfigError, match="no split 'validation'.*known splits"):
        get_task("gsm8k").load("validation")


# ----------------------------------------------------------------------------------------------
# Shipped samples
# ----------------------------------------------------------------------------------------------

# (task, split, shipped file it falls back to, records, the full split that file samples)
SHIPPED = [
    ("gsm8k", "test", "gsm8k/test_sample.jsonl", 100, "test"),
    ("gsm8k", "train", "gsm8k/train_sample.jsonl", 300, "train"),
    ("svamp", "test", "svamp/test_sample.jsonl", 100, "test"),
    ("hotpotqa", "test", "hotpotqa/dev_sample.jsonl", 60, "dev"),
    ("hotpotqa", "dev", "hotpotqa/dev_sample.jsonl", 60, "dev"),
    ("strategyqa", "train", "strategyqa/train_sample.jsonl", 300, "train"),
    ("strategyqa", "dev", "strategyqa/dev.jsonl", 229, "dev"),
    ("strategyqa", "test", "strategyqa/dev.jsonl", 229, "dev"),
]


@pytest.mark.parametrize(("name", "split", "rel", "count", "full_split"), SHIPPED)
def test_loads_shipped_sample_without_full_data(
    no_full_data: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    split: str,
    rel: str,
    count: int,
    full_split: str,
) -> None:
    task = get_task(name)
    assert task.files(split) == (paths.PACKAGE_DATA_DIR / rel,)
    with caplog.at_level(logging.INFO, logger="nat_ray.tasks"):
        questions = task.load(split)
    assert len(questions) == count
    assert rel in caplog.text  # the fallback says which file it used
    assert len({q.id for q in questions}) == count
    assert all(q.task == name and q.question.strip() for q in questions)


def test_shipped_golds_are_normalized(no_full_data: Path) -> None:
    gsm8k = get_task("gsm8k").load("test")
    assert gsm8k[0].gold == "18" and gsm8k[0].id == "test-0"
    assert all(isinstance(q.gold, str) and "," not in q.gold and q.gold.lstrip("-").isdigit() for q in gsm8k)
    strategyqa = get_task("strategyqa").load("train")
    assert all(isinstance(q.gold, bool) for q in strategyqa)
    assert {q.gold for q in strategyqa} == {True, False}
    assert strategyqa[0].meta["raw_gold"] in ("yes", "no")
    hotpot = get_task("hotpotqa").load("dev")
    assert all(isinstance(q.gold, str) for q in hotpot)
    assert {"context", "supporting_facts", "type"} <= set(hotpot[0].meta)


def test_shipped_strategyqa_clean_splits_exclude_nat_train(no_full_data: Path) -> None:
    task = get_task("strategyqa")
    clean = task.load("clean_test")
    assert clean and all(q.meta["nat_id"] is None for q in clean)
    nat_clean = task.load("nat_test_clean")
    assert nat_clean and all(q.meta["nat_test_index"] is not None for q in nat_clean)
    assert {q.id for q in nat_clean} <= {q.id for q in clean}


@pytest.mark.parametrize(
    ("name", "split"),
    [("asdiv", "test"), ("multiarith", "test"), ("hotpotqa", "train"), ("strategyqa", "nat_test")],
)
def test_unshipped_split_names_what_to_do(no_full_data: Path, name: str, split: str) -> None:
    with pytest.raises(DataError, match="NAT_RAY_DATA_DIR") as err:
        get_task(name).load(split)
    assert get_task(name).splits[split][0] in str(err.value)


def test_shipped_data_is_small_and_redistributable() -> None:
    data = paths.PACKAGE_DATA_DIR
    files = [p for p in data.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1.6e6
    assert not {"asdiv", "multiarith", "nat"} & {p.name for p in data.iterdir()}
    assert (data / "LICENSES.md").is_file()


@needs_full_data
@pytest.mark.parametrize(("name", "split", "rel", "count", "full_split"), SHIPPED)
def test_shipped_sample_is_the_head_of_the_full_file(
    name: str, split: str, rel: str, count: int, full_split: str
) -> None:
    task = get_task(name)
    full = task.load(full_split)
    sample = task.load(full_split, path=paths.PACKAGE_DATA_DIR / rel)
    assert [q.id for q in sample] == [q.id for q in full[:count]]
    assert sample == full[:count]


# ----------------------------------------------------------------------------------------------
# Full shared data
# ----------------------------------------------------------------------------------------------


@needs_full_data
@pytest.mark.parametrize(
    ("name", "split", "count"),
    [
        ("gsm8k", "test", 1319),
        ("gsm8k", "train", 7473),
        ("gsm8k", "nat_test", 1319),
        ("svamp", "test", 1000),
        ("svamp", "nat_test", 1000),
        ("asdiv", "test", 2023),
        ("asdiv", "all", 2084),
        ("asdiv", "nat_test", 2023),
        ("multiarith", "test", 596),
        ("multiarith", "all", 600),
        ("multiarith", "nat_test", 596),
        ("hotpotqa", "test", 500),
        ("hotpotqa", "nat_dev500", 500),
        ("hotpotqa", "dev", 1100),
        ("hotpotqa", "train", 8000),
        ("strategyqa", "test", 500),
        ("strategyqa", "train", 2061),
        ("strategyqa", "dev", 229),
        ("strategyqa", "nat_train", 1290),
        ("strategyqa", "nat_test", 500),
        ("strategyqa", "clean_test", 999),
        ("strategyqa", "nat_test_clean", 209),
    ],
)
def test_loads_full_data(name: str, split: str, count: int) -> None:
    task = get_task(name)
    try:
        files = task.files(split)
    except DataError:
        pytest.skip(f"{name}/{split} is not in {FULL_DATA}")
    assert not any(f.is_relative_to(paths.PACKAGE_DATA_DIR) for f in files)
    questions = task.load(split)
    assert len(questions) == count
    if task.family == "strategyqa":
        assert all(isinstance(q.gold, bool) for q in questions)
    else:
        assert all(isinstance(q.gold, str) and q.gold for q in questions)


@needs_full_data
def test_nat_math_files_agree_with_normalized_files() -> None:
    for name in ("gsm8k", "svamp", "multiarith"):
        task = get_task(name)
        try:
            normalized, nat = task.load("test"), task.load("nat_test")
        except DataError:
            pytest.skip(f"{name} data incomplete")
        assert [q.gold for q in normalized] == [q.gold for q in nat]
        # NAT's paper rule on the raw "#### N" gold and on the normalized gold agree
        assert all(task.score(q.gold, q).correct_paper for q in nat[:50])


def test_limit_keeps_the_first_questions(no_full_data: Path) -> None:
    task = get_task("gsm8k")
    assert task.load("test", limit=3) == task.load("test")[:3]
    assert task.load("test", limit=0) == []
    with pytest.raises(ConfigError, match="limit"):
        task.load("test", limit=-1)


# ----------------------------------------------------------------------------------------------
# NAT repository formats (tiny files written here)
# ----------------------------------------------------------------------------------------------


def test_nat_gsm8k_json_array_with_rationale(tmp_path: Path) -> None:
    path = tmp_path / "test.json"
    records = [
        {"question": "Q0?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4", "id": 0},
        {"question": "Q1?", "answer": "He pays 1,000 + 80 = <<1000+80=1080>>1080\n#### 1,080", "id": 1},
    ]
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    task = get_task("gsm8k")
    questions = task.load("test", path=path)
    assert [(q.id, q.gold) for q in questions] == [("0", "4"), ("1", "1080")]
    q = questions[1]
    assert q.meta["raw_gold"].endswith("#### 1,080")
    assert task.score("1080", q).correct_paper
    assert not task.score("1,080", q).correct_paper
    assert task.score("1,080", q).correct_robust


@pytest.mark.parametrize(
    ("name", "record", "gold"),
    [
        ("svamp", {"id": 0, "question": "Q?", "answer": "#### 51"}, "51"),
        ("multiarith", {"question": "Q?", "answer": "#### 39", "id": 0}, "39"),
        ("asdiv", {"id": 0, "question": "Q?", "answer": "9"}, "9"),
    ],
)
def test_nat_math_jsonl(tmp_path: Path, name: str, record: dict[str, Any], gold: str) -> None:
    path = write_jsonl(tmp_path / "test.jsonl", [record])
    (q,) = get_task(name).load("test", path=path)
    assert (q.id, q.gold, q.meta["raw_gold"]) == ("0", gold, record["answer"])


def test_nat_strategyqa_bool_answers(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "test_random_500.jsonl",
        [
            {"id": 456, "question": "Is it?", "answer": True, "explanation": "Yes. Because."},
            {"id": 102, "question": "Is it not?", "answer": False, "explanation": "No."},
        ],
    )
    task = get_task("strategyqa")
    questions = task.load("nat_test", path=path)
    assert [(q.id, q.gold) for q in questions] == [("456", True), ("102", False)]
    assert questions[0].meta["explanation"] == "Yes. Because."
    assert task.score("Yes", questions[0]).correct_paper
    assert not task.score("Yes.", questions[0]).correct_paper


def test_nat_hotpotqa_keeps_question_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "dev_random_500.json"
    record = {
        "question": "Who set Nietzche's novel to music? ",
        "answer": "Richard Strauss",
        "type": "bridge",
        "id": 6917,
    }
    path.write_text(json.dumps([record], indent=2), encoding="utf-8")
    (q,) = get_task("hotpotqa").load("nat_dev500", path=path)
    assert q.question.endswith("? ")  # NAT prompts keep the trailing space
    assert (q.id, q.gold, q.meta["type"]) == ("6917", "Richard Strauss", "bridge")
    score = get_task("hotpotqa").score("richard strauss.", q)
    assert score.em and score.f1 == 1.0


def test_asdiv_test_filter_keeps_nat_subset(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "asdiv.jsonl",
        [
            {"id": "a", "question": "Q?", "answer": "9", "in_nat_subset": True},
            {"id": "b", "question": "Q?", "answer": None, "in_nat_subset": False},
            {"id": "c", "question": "Q?", "answer": "2.5", "in_nat_subset": False},
        ],
    )
    task = get_task("asdiv")
    assert [q.id for q in task.load("test", path=path)] == ["a"]
    assert [q.id for q in task.load("all", path=path)] == ["a", "c"]


# ----------------------------------------------------------------------------------------------
# User files
# ----------------------------------------------------------------------------------------------


def test_user_file_without_ids_gzipped(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mine.jsonl.gz",
        [{"question": "1+1?", "answer": 2}, {"question": "Half of 3?", "answer": "1.50"}],
    )
    questions = get_task("gsm8k").load("test", path=path)
    assert questions == [
        Question(id="0", task="gsm8k", question="1+1?", gold="2"),
        Question(id="1", task="gsm8k", question="Half of 3?", gold="1.5"),
    ]
    assert questions[1].meta == {"raw_gold": "1.50"}


def test_user_file_yes_no_text(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "sqa.jsonl", [{"question": "A?", "answer": "Yes"}, {"question": "B?", "answer": "no"}]
    )
    assert [q.gold for q in get_task("strategyqa").load("dev", path=path)] == [True, False]


def test_relative_path_is_looked_up_in_data_dirs(no_full_data: Path) -> None:
    questions = get_task("svamp").load("test", path="svamp/test_sample.jsonl", limit=2)
    assert [q.id for q in questions] == ["chal-1", "chal-2"]


def test_question_is_frozen_and_hashable() -> None:
    q = Question(id="1", task="gsm8k", question="Q?", gold="3", meta={"raw_gold": "#### 3"})
    with pytest.raises(AttributeError):
        q.gold = "4"  # type: ignore[misc]
    assert len({q, Question(id="1", task="gsm8k", question="Q?", gold="3")}) == 1


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "line_no", "message"),
    [
        (['{"question": "a", "answer": "1"}', '{"question": "b", "answer": '], 2, "bad JSON"),
        (['{"question": "a", "answer": "1"}', "", '{"question": "b"}'], 3, "missing 'answer'"),
        (['{"answer": "1"}'], 1, "question"),
        (['{"question": "a", "answer": "about five"}'], 1, "not a single number"),
        (['"just a string"'], 1, "JSON object"),
        (
            ['{"id": 1, "question": "a", "answer": "1"}', '{"id": "1", "question": "b", "answer": "2"}'],
            2,
            "duplicate id",
        ),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, lines: list[str], line_no: int, message: str
) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        get_task("gsm8k").load("test", path=path)
    assert f"broken.jsonl:{line_no}:" in str(err.value)


def test_malformed_array_element_names_its_index(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([{"question": "a", "answer": True}, {"question": "b"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json\[1\]: missing 'answer'"):
        get_task("strategyqa").load("test", path=path)


def test_bad_strategyqa_gold(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sqa.jsonl", [{"question": "A?", "answer": "maybe"}])
    with pytest.raises(DataError, match=r"sqa\.jsonl:1:.*yes/no"):
        get_task("strategyqa").load("dev", path=path)


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        get_task("gsm8k").load("test", path=tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no questions"):
        get_task("gsm8k").load("test", path=empty)


def test_split_filter_needing_a_missing_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sqa.jsonl", [{"question": "A?", "answer": True}])
    with pytest.raises(DataError, match=r"sqa\.jsonl:1:.*'nat_id'"):
        get_task("strategyqa").load("clean_test", path=path)


# ----------------------------------------------------------------------------------------------
# Hugging Face hub paths (the hub itself is faked: no network in tests)
# ----------------------------------------------------------------------------------------------


def test_hf_path_downloads_then_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    local = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "answer": "#### 7"}])
    calls: list[tuple[Any, ...]] = []

    def fake_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        calls.append((repo_id, filename, kwargs))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    (q,) = get_task("gsm8k").load("test", path="hf://datasets/someone/math@v1/data/test.jsonl")
    assert q.gold == "7"
    assert calls == [("someone/math", "data/test.jsonl", {"repo_type": "dataset", "revision": "v1"})]


def test_hf_path_offline_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, filename: str, **kwargs: Any) -> str:
        raise LocalEntryNotFoundError("no connection and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match="online"):
        get_task("gsm8k").load("test", path="hf://datasets/someone/math/test.jsonl")


def test_hf_path_malformed() -> None:
    with pytest.raises(DataError, match="expected hf://datasets/"):
        loaders.download_hf("hf://datasets/only-owner")


def test_task_is_a_frozen_dataclass() -> None:
    with pytest.raises(AttributeError):
        TASKS["gsm8k"].family = "qa"  # type: ignore[misc]
    assert isinstance(TASKS["gsm8k"], Task)


# ----------------------------------------------------------------------------------------------
# CSV and Parquet question files, renamed fields
# ----------------------------------------------------------------------------------------------


def test_csv_questions_with_renamed_fields(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('key,text,label,note\nk1,"Two, plus two?",4,easy\nk2,Three?,3,\n', encoding="utf-8")
    fields = {"question": "text", "answer": "label", "id": "key"}
    qs = loaders.load_questions([path], task="t", family="math", fields=fields)
    assert [(q.id, q.question, q.gold) for q in qs] == [("k1", "Two, plus two?", "4"), ("k2", "Three?", "3")]
    assert qs[0].meta == {"note": "easy", "raw_gold": "4"}


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("question,answer\nfine,1\ntoo,many,cells\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"q.csv:3: more cells than the header"):
        loaders.load_questions([path], task="t", family="math")
    path.write_text("question,label\nq,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"q.csv:2: missing 'target', the task's answer field"):
        loaders.load_questions([path], task="t", family="math", fields={"answer": "target"})


def test_parquet_questions(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": "Is it?", "answer": True, "id": 1}, {"question": "Not?", "answer": False, "id": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    qs = loaders.load_questions([tmp_path / "q.parquet"], task="t", family="strategyqa")
    assert [(q.id, q.gold) for q in qs] == [("1", True), ("2", False)]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read as Parquet"):
        loaders.load_questions([tmp_path / "bad.parquet"], task="t", family="math")
