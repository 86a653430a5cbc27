"""clover2_hf.tools.bench: question files, a complete benchmark on tiny random models, summary arithmetic, CLI."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import BYTE_VOCAB as VOCAB
from conftest import byte_chat_tokenizer, make_tiny_target, reusing_compile_config

from clover2_hf import Clover2ForDrafting
from clover2_hf.tools import bench
from clover2_hf.tools.bench import (
    BASELINE,
    METHODS,
    OVERALL,
    Question,
    QuestionFileError,
    RunRecord,
    encode_chat,
    load_questions,
    run_benchmark,
    summarize,
)
from clover2_hf.modeling_clover2 import CACHE_KWARG
from clover2_hf.tools.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    target = make_tiny_target("llama", vocab_size=VOCAB, peaked=True)
    draft = Clover2ForDrafting.from_target(target).eval()
    assistant = make_tiny_target("llama", seed=3, vocab_size=VOCAB, hidden_size=32, peaked=True)
    return target, byte_chat_tokenizer(), draft, assistant


def three_categories() -> list[Question]:
    by_category: dict[str, Question] = {}
    for q in load_questions():
        by_category.setdefault(q.category, q)
    return [by_category[c] for c in ("writing", "math", "coding")]


# --------------------------------------------------------------------------- question files


def test_bundled_mt_bench():
    questions = load_questions()
    assert len(questions) == 80
    assert len({q.category for q in questions}) == 8
    assert all(len(q.turns) == 2 for q in questions)
    assert [q.question_id for q in load_questions(num_questions=3)] == [q.question_id for q in questions[:3]]


GOOD = '{"question_id": 1, "category": "math", "turns": ["What is 2 + 2?"]}'


@pytest.mark.parametrize(
    "lines, line, words",
    [
        ([GOOD, "{not json"], 2, "not valid JSON"),
        ([GOOD, "", '{"question_id": 2, "turns": ["hi"]}'], 3, "missing key(s) category"),
        (['{"question_id": 1, "category": "math", "turns": []}'], 1, "turns must be"),
        (['{"question_id": 1, "category": "math", "turns": "hi"}'], 1, "turns must be"),
        (["[1, 2]"], 1, "expected a JSON object"),
        ([GOOD, GOOD], 2, "repeats"),
    ],
)
def test_bad_question_file_names_file_and_line(tmp_path, lines, line, words):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QuestionFileError) as info:
        load_questions(path)
    assert f"{path}:{line}:" in str(info.value)
    assert words in str(info.value)


def test_missing_and_empty_question_files(tmp_path):
    with pytest.raises(QuestionFileError, match="not found") as info:
        load_questions(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(QuestionFileError, match="holds no question") as info:
        load_questions(empty)
    assert str(empty) in str(info.value)


def test_cli_bad_question_file_exits_with_message(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(GOOD + "\n" + '{"question_id": 7, "category": "x"}\n')
    with pytest.raises(SystemExit) as info:
        main(["bench", "--questions", str(path), "--draft", str(tmp_path)])
    assert f"{path}:2: missing key(s) turns" in str(info.value)


# --------------------------------------------------------------------------- a complete run


@pytest.fixture(scope="module")
def result(models):
    target, tokenizer, draft, assistant = models
    draft.config.decoding = "chain"  # run_benchmark must restore whatever it found
    draft.config.tree_lookup_tokens = 7  # (clover2-tree-nolookup sets it to 0 for its own runs)
    out = run_benchmark(target, tokenizer, draft, three_categories(), METHODS, max_new_tokens=12, both_turns=True,
                        repeats=2, assistant_model=assistant, progress=False)
    assert draft.config.decoding == "chain" and draft.config.tree_lookup_tokens == 7
    draft.config.tree_lookup_tokens = 10
    draft.config.decoding = "tree"
    return out


def test_result_is_complete_and_well_formed(result, tmp_path):
    data = json.loads(result.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert set(data) == {"settings", "summary", "records"}
    assert data["settings"]["methods"] == list(METHODS) and data["settings"]["max_new_tokens"] == 12
    assert set(data["summary"]) == {BASELINE, *METHODS}
    keys = {"questions", "new_tokens", "mean_new_tokens", "tau", "mean_accept_length", "median_tokens_per_s", "speedup",
            "speedup_paired", "draft_share", "identical"}
    for method, per_category in data["summary"].items():
        assert list(per_category) == ["writing", "math", "coding", "overall"], method
        for category, s in per_category.items():
            assert set(s) == keys
            assert s["questions"] == (6 if category == "overall" else 2)  # both turns
            assert s["identical"] is True, (method, category)  # greedy: every output equals plain's
            assert s["median_tokens_per_s"] > 0 and s["tau"] >= 1.0
    plain = data["summary"][BASELINE]["overall"]
    assert plain["tau"] == 1.0 and plain["speedup"] == 1.0 and plain["draft_share"] == 0.0
    assert data["summary"]["prompt-lookup"]["overall"]["draft_share"] is None
    assert data["summary"]["prompt-lookup"]["overall"]["mean_accept_length"] is None
    assert data["summary"]["clover2-tree"]["overall"]["mean_accept_length"] >= 1.0
    for method in ("clover2-tree", "clover2-chain", "assisted"):
        assert 0.0 < data["summary"][method]["overall"]["draft_share"] < 1.0
    assert len(data["records"]) == 3 * 2 * (1 + len(METHODS))


def test_records_carry_decoding_stats(result):
    for r in result.records:
        assert len(r.times_s) == 2 and r.time_s == statistics.median(r.times_s)
        if r.method == "clover2-tree":
            assert sum(r.tokens_per_step) == r.new_tokens - 1  # the prefill's token is not a pass
            assert r.target_forwards == len(r.tokens_per_step) + 1
        elif r.method == BASELINE:
            assert r.target_forwards == r.new_tokens and r.tokens_per_step == []


def test_second_turn_prompt_holds_first_answer(result, models):
    _, tokenizer, _, _ = models
    by_key = {(r.question_id, r.turn, r.method): r for r in result.records}
    for q in three_categories():
        t1, t2 = by_key[(q.question_id, 1, BASELINE)], by_key[(q.question_id, 2, BASELINE)]
        turn2_alone = encode_chat(tokenizer, [{"role": "user", "content": q.turns[1]}]).shape[1]
        assert t2.prompt_tokens > t1.prompt_tokens + turn2_alone  # turn 1, its answer, then turn 2


def test_figures_written(result, tmp_path):
    figures = result.write_figures(tmp_path / "figs")
    assert set(figures) == {"speedup", "acceptance_histogram", "depth_acceptance"}
    for path in figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_table_lists_every_method_and_category(result):
    table = result.table()
    for method in (BASELINE, *METHODS):
        for category in ("writing", "math", "coding", "overall"):
            assert any(line.split()[:2] == [method, category] for line in table.splitlines())


# --------------------------------------------------------------------------- order and arithmetic


def test_order_alternates_and_warmup_comes_first(models, monkeypatch):
    target, tokenizer, draft, _ = models
    calls: list[tuple[str, int]] = []

    def fake_call(self, method, ids, max_new_tokens):
        calls.append((method, max_new_tokens))
        return bench._Run([5, 6], 0.01, 2, 0.0, None)

    monkeypatch.setattr(bench._Runner, "__call__", fake_call)
    methods = ["clover2-tree", "prompt-lookup"]
    run_benchmark(target, tokenizer, draft, three_categories()[:2], methods, max_new_tokens=20, repeats=1,
                  progress=False)
    order = [BASELINE, *methods]
    assert calls[:3] == [(m, 8) for m in order]  # warm-up, 8 tokens
    measured = [m for m, n in calls[3:]]
    assert measured == order + order[::-1]


def _rec(qid, method, tokens, time_s, category="c", forwards=None, draft=None):
    return RunRecord(qid, category, 1, method, 10, tokens, time_s, [time_s], forwards or tokens, draft, True)


def test_summary_arithmetic():
    records = [
        _rec(1, BASELINE, 10, 1.0, draft=0.0), _rec(1, "m", 10, 0.5, forwards=4, draft=0.1),
        _rec(2, BASELINE, 20, 1.0, draft=0.0), _rec(2, "m", 20, 0.4, forwards=5, draft=0.1),
        _rec(3, BASELINE, 10, 2.0, draft=0.0), _rec(3, "m", 10, 2.0, forwards=10, draft=0.3),
    ]
    s = summarize(records, [BASELINE, "m"])["m"]["overall"]
    assert s["tau"] == pytest.approx(40 / 19)
    assert s["median_tokens_per_s"] == pytest.approx(20.0)  # median of 20, 50, 5
    assert s["speedup"] == pytest.approx(20.0 / 10.0)  # plain: median of 10, 20, 5
    assert s["speedup_paired"] == pytest.approx(2.0)  # per-question ratios 2, 2.5, 1
    assert s["draft_share"] == pytest.approx(0.5 / 2.9)


def test_argument_checks(models):
    target, tokenizer, draft, _ = models
    qs = three_categories()[:1]
    with pytest.raises(ValueError, match="unknown method"):
        run_benchmark(target, tokenizer, draft, qs, ["eagle"], progress=False)
    with pytest.raises(ValueError, match="drafter"):
        run_benchmark(target, tokenizer, None, qs, ["clover2-tree"], progress=False)
    with pytest.raises(ValueError, match="assistant_model"):
        run_benchmark(target, tokenizer, draft, qs, ["assisted"], progress=False)


# --------------------------------------------------------------------------- CLI


def test_cli_bench_writes_results(models, tmp_path, capsys):
    target, tokenizer, draft, _ = models
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft")
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [f"Tell me about {c}."]})
                                   for i, c in enumerate(["art", "art", "maths"])) + "\n")
    out = tmp_path / "out"
    assert main(["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                 "--questions", str(questions), "--max-new-tokens", "6", "--methods", "clover2-tree,prompt-lookup",
                 "--output-dir", str(out), "--device", "cpu", "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["summary"]["clover2-tree"]) == ["art", "maths", "overall"]
    assert data["summary"]["clover2-tree"]["overall"]["identical"] is True
    assert (out / "speedup.png").is_file() and (out / "depth_acceptance.png").is_file()
    printed = capsys.readouterr().out
    assert "clover2-tree" in printed and "speedup" in printed and "results.json" in printed


def test_per_category_keeps_the_first_questions_of_each_category():
    from clover2_hf.tools.bench import load_questions

    questions = load_questions(per_category=2)
    categories = [q.category for q in questions]
    assert len(questions) == 16 and all(categories.count(c) == 2 for c in set(categories))
    assert len(load_questions(per_category=2, num_questions=5)) == 5


def test_oracle_and_static_cache_methods_stay_exact_and_reach_their_tau(models):
    target, tokenizer, draft, _ = models
    methods = ["plain-static", "clover2-tree-static", "clover2-oracle-tau2", "clover2-oracle-tau4"]
    out = run_benchmark(target, tokenizer, draft, three_categories()[:2], methods, max_new_tokens=24, warmup=False,
                        progress=False)
    overall = {m: out.summary[m][OVERALL] for m in methods}
    assert all(row["identical"] for row in overall.values())
    # an oracle of N - 1 tokens per step: N tokens per pass, except where an answer's last pass is cut short
    assert overall["clover2-oracle-tau2"]["mean_accept_length"] >= 1.8
    assert overall["clover2-oracle-tau4"]["mean_accept_length"] >= 2.7
    assert overall["clover2-oracle-tau4"]["tau"] > overall["clover2-oracle-tau2"]["tau"]
    assert overall["plain-static"]["tau"] == pytest.approx(1.0)


@pytest.mark.slow  # ~11 s of tracing; tests/test_static_step.py covers the compiled path in the fast loop
@pytest.mark.skipif(CACHE_KWARG != "cache", reason="static verification needs transformers >= 5.24")
def test_graph_mode_compiles_the_static_methods_with_the_benchmark_options(models):
    """`compile_config=` compiles plain-static and the static Clover-2 methods (a counting backend here), the
    benchmark's tree options reach every Clover-2 method, and the outputs stay plain greedy decoding's."""
    target, tokenizer, draft, _ = models
    graphs = []
    methods = ["plain-static", "clover2-tree-static", "clover2-oracle-static-tau3", "clover2-tree"]
    out = run_benchmark(target, tokenizer, draft, three_categories()[:1], methods, max_new_tokens=16, warmup=False,
                        progress=False, clover2_options={"tree_budget": 3, "tree_top_k": 2},
                        compile_config=reusing_compile_config(graphs))
    assert all(out.summary[m][OVERALL]["identical"] for m in methods)
    settings = {r.method: r.tree_settings for r in out.records}
    assert settings["clover2-tree-static"].startswith("tree_budget=3, tree_top_k=2 (explicit values)")
    assert settings["clover2-tree-static"].endswith("compiled")
    assert settings["clover2-oracle-static-tau3"].endswith("compiled")
    assert settings["clover2-tree"].startswith("tree_budget=3, tree_top_k=2") and "static" not in settings["clover2-tree"]
    assert settings["plain-static"] is None
    assert any("fc1" in graph.code for graph in graphs)  # the drafting step compiled
    # the target's graphs: plain's 1-token step and Clover-2's verification pass (one question: no other shapes)
    assert sum("fc1" not in graph.code and "cache_layers" in graph.code for graph in graphs) >= 2
    assert out.settings["clover2_options"] == {"tree_budget": 3, "tree_top_k": 2}
    assert out.summary["clover2-oracle-static-tau3"][OVERALL]["mean_accept_length"] >= 2.5
    with pytest.raises(ValueError, match="clover2_options: unknown option"):
        run_benchmark(target, tokenizer, draft, three_categories()[:1], ["clover2-tree"], clover2_options={"budget": 3})


def test_cli_random_target_refuses_a_second_target(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--random-target", "smollm2-135m", "--target", "some/model", "--methods", "plain-static"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "clover2 bench: --random-target: cannot be combined with --target"
