"""`lserve eval retrieval`: the runner, its tables and the CLI, on a tiny random Llama with a
character-level tokenizer (dense and sparse side by side, per-step recall)."""
from __future__ import annotations

import json

import pytest
from eval_helpers import TINY_SPARSITY

from lserve.eval.retrieval import (answer_token_range, format_recall, format_table, plot_heatmap, run_retrieval,
                                   shares_engines, summarize, write_results)
from lserve.eval.retrieval_tasks import PromptFormat, case_seed, make_case, score_output


def test_runner_runs_configs_side_by_side_with_recall(tiny_char_model, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lserve.tokenizer import Tokenizer

    tasks, lengths = ["single_number", "variable_tracking"], [700, 3000]
    lines, partials = [], []
    report = run_retrieval(str(tiny_char_model), "heldout", tasks, lengths, samples=1, configs=["dense", "lserve"],
                           sparsity_args=TINY_SPARSITY, max_tokens=4, engine_kwargs=dict(num_threads=2),
                           log=lines.append, on_result=lambda partial: partials.append(len(partial["results"])),
                           recall=True)
    results = report["results"]
    assert len(results) == 8
    assert partials == list(range(1, 9)) + [8] * 4  # every case, then every recall measurement
    assert any("capped at 2044" in line for line in lines)  # max_model_len 2048 - max_tokens 4

    fmt = PromptFormat.for_tokenizer(Tokenizer.from_pretrained(str(tiny_char_model)))
    dense = {(r["task"], r["length"]): r for r in results if r["config"] == "dense"}
    sparse = {(r["task"], r["length"]): r for r in results if r["config"] == "lserve"}
    for key, row in dense.items():
        task, length = key
        case = make_case(task, min(length, 2044), "heldout", 0, fmt)
        assert row["seed"] == case_seed("heldout", task, min(length, 2044), 0)
        assert row["answers"] == case.answers and row["prompt_tokens"] == case.num_prompt_tokens
        assert row["prompt_tokens"] <= min(length, 2044) and row["prompt_tokens"] >= min(length, 2044) - 150
        assert row["score"] == score_output(case, row["output"])
        assert sparse[key]["prompt_tokens"] == row["prompt_tokens"]  # same tokens under every config
        assert "recall_steps" not in row
        measured = sparse[key]
        assert measured["recall_reply"] == "dense" and "recall_answer_tokens" in measured
        assert len(measured["recall_steps"]) == max(1, len(row["output_token_ids"]))
        assert measured["recall_steps"][0]["mode"] == "prefill" and measured["recall_steps"][0]["mean"] == 1.0
        if length == 3000:  # past the 64-token budget: later steps select
            assert {s["mode"] for s in measured["recall_steps"][1:]} <= {"fresh", "reuse"}
            assert 0.0 < measured["recall_steps"][0]["fresh_mean"] < 1.0

    accuracy = report["accuracy"]
    assert set(accuracy) == {"dense", "lserve"}
    assert set(accuracy["dense"]) == {*tasks, "all"} and set(accuracy["dense"]["all"]) == {"700", "3000", "all"}
    assert report["totals"]["dense"]["num_cases"] == 4
    assert report["totals"]["lserve"]["score"] == pytest.approx(sum(r["score"] for r in sparse.values()) / 4)
    assert set(report["recall"]) == {"lserve"} and set(report["recall"]["lserve"]) == {"700", "3000"}
    assert report["recall"]["lserve"]["3000"]["num_cases"][0] == 2

    path = tmp_path / "results.json"
    write_results(str(path), report)
    assert json.loads(path.read_text())["accuracy"] == accuracy
    table = format_table(report)
    assert "dense / lserve" in table and "variable_tracking" in table and "total: dense" in table
    assert "lserve recall by answer token, 3000 tokens" in format_recall(report)


def test_variants_share_one_engine_and_equal_separate_runs(tiny_char_model):
    """Configs that differ only in decode-time settings run on one engine (set_decode_sparsity, one
    prefill per prompt through the prefix cache) and give the replies of one engine per config; a
    variant that changes the layout gets its own engine."""
    variants = {"b32_rec": {"decode_token_budget": 32, "select_recent_tokens": 16, "page_score": "blend",
                            "selection_reuse_interval": 1},
                "wide": {"prefill_local_tokens": 256}}
    common = dict(split="dev", tasks=["multi_value", "single_uuid"], lengths=[900], samples=2, max_tokens=6,
                  engine_kwargs=dict(num_threads=2))
    lines = []
    shared = run_retrieval(str(tiny_char_model), configs=["lserve", "b32_rec", "wide"], sparsity_args=TINY_SPARSITY,
                           variants=variants, log=lines.append, **common)
    assert any("one engine for lserve, b32_rec" in line for line in lines), lines
    assert not any("wide" in line and "one engine" in line for line in lines)
    assert shared["variants"] == variants
    replies = {}
    for row in shared["results"]:
        replies.setdefault(row["config"], {})[(row["task"], row["index"])] = row["output_token_ids"]
    assert set(replies) == {"lserve", "b32_rec", "wide"}
    for name in ("lserve", "b32_rec", "wide"):
        alone = run_retrieval(str(tiny_char_model), configs=["lserve"],
                              sparsity_args={**TINY_SPARSITY, **variants.get(name, {})}, log=lambda *a: None,
                              **common)
        expected = {(r["task"], r["index"]): r["output_token_ids"] for r in alone["results"]}
        assert replies[name] == expected, name
    assert replies["b32_rec"] != replies["lserve"], "the variant's decode settings changed no reply"
    assert [r["shared_prefill"] for r in shared["results"][:3]] == [False, True, False]
    from lserve import Engine

    assert shares_engines(Engine, {"device": "cpu"}) and shares_engines(Engine, None)
    assert not shares_engines(Engine, {"device": "cuda"}) and not shares_engines(Engine, {"device": "cuda:1"})
    assert not shares_engines(object, {"device": "cpu"})  # an engine without set_decode_sparsity


@pytest.mark.parametrize("variants, message", [
    ('{"lserve": {}}', "variant names must be new"),
    ('{"a": 3}', "must be a JSON object of name -> object"),
    ("{a", "--variants is not JSON"),
    ("@/nonexistent/variants.json", "cannot read /nonexistent/variants.json"),
])
def test_cli_rejects_bad_variants(variants, message, capsys, tmp_path):
    from lserve.cli import main

    assert main(["eval", "retrieval", "--model", str(tmp_path / "absent"), "--variants", variants]) == 2
    assert message in capsys.readouterr().err


class PieceTokenizer:
    """Token i decodes to PIECES[i]."""

    PIECES = [":", " 12", "34", "567", ".", " or", " 1234567", "<eos>"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and self.PIECES[i] == "<eos>"))


def test_answer_token_range():
    tokenizer = PieceTokenizer()
    assert answer_token_range(tokenizer, [0, 1, 2, 3, 4, 7], "1234567") == [1, 3]
    assert answer_token_range(tokenizer, [0, 1, 2, 4, 5, 6, 4], "1234567") == [5, 5]  # " 1234." does not count
    assert answer_token_range(tokenizer, [0, 1, 2, 4], "1234567") is None
    assert answer_token_range(tokenizer, [], "1234567") is None


def test_recall_table_by_answer_token_index():
    steps = lambda *means: [dict(mean=m, min=m, fresh_mean=m, stream_mean=None) for m in means]  # noqa: E731
    rows = [dict(config="lserve", length=1024, recall_steps=steps(1.0, 0.8, 0.6), recall_answer_tokens=[1, 2]),
            dict(config="lserve", length=1024, recall_steps=steps(1.0, 0.4), recall_answer_tokens=None),
            dict(config="dense", length=1024)]
    table = summarize([dict(r, task="t", depth=0.5, score=1.0) for r in rows])["recall"]
    cells = table["lserve"]["1024"]
    assert cells["mean"] == [1.0, 0.6, 0.6] and cells["min"] == [1.0, 0.4, 0.6] and cells["num_cases"] == [2, 2, 1]
    assert cells["stream_mean"] == [None, None, None] and cells["answer_mean"] == pytest.approx(0.7)
    assert set(table) == {"lserve"}
    assert "over the answers' tokens: 0.700" in format_recall({"recall": table})


def test_summarize_weighs_tasks_equally_and_bins_depths():
    rows = [dict(config="dense", task="a", length=1024, depth=0.1, score=1.0),
            dict(config="dense", task="a", length=1024, depth=0.5, score=0.0),
            dict(config="dense", task="a", length=2048, depth=0.95, score=1.0),
            dict(config="dense", task="b", length=1024, depth=0.3, score=0.5)]
    tables = summarize(rows)
    assert tables["accuracy"]["dense"]["a"] == {"1024": 0.5, "2048": 1.0, "all": pytest.approx(2 / 3)}
    assert tables["accuracy"]["dense"]["all"] == {"1024": 0.5, "2048": 1.0, "all": pytest.approx((2 / 3 + 0.5) / 2)}
    assert tables["totals"]["dense"] == {"score": pytest.approx((2 / 3 + 0.5) / 2), "num_cases": 4}
    assert tables["depth_accuracy"]["dense"] == {"0.0-0.2": 1.0, "0.2-0.4": 0.5, "0.4-0.6": 0.0, "0.8-1.0": 1.0}
    assert tables["recall"] == {}


def test_heatmap_written_or_skipped(tmp_path):
    rows = [dict(config=c, task=t, length=n, depth=0.5, score=float(c == "dense"))
            for c in ("dense", "lserve") for t in ("single_number", "multi_key") for n in (1024, 2048)]
    report = {"model": "m", "split": "dev", "configs": ["dense", "lserve"], "tasks": ["single_number", "multi_key"],
              "lengths": [1024, 2048], "samples": 1, **summarize(rows)}
    assert "1.00 /  0.00" in format_table(report)
    path = tmp_path / "heatmap.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot_heatmap(report, str(path)) is False and not path.exists()
        return
    assert plot_heatmap(report, str(path)) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report["recall"] = {"lserve": {"1024": {"mean": [1.0, 0.8, None], "fresh_mean": [0.9, 0.8, 0.7],
                                            "stream_mean": [0.5, 0.5, 0.5], "min": [1.0, 0.2, 0.1],
                                            "num_cases": [2, 2, 1]}}}
    with_recall = tmp_path / "with_recall.png"
    assert plot_heatmap(report, str(with_recall)) is True and with_recall.stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "single_number,passkey"], "unknown task(s) 'passkey'"),
    (["--split", "test"], "unknown split 'test'"),
    (["--sparsity", "dense,quest"], "unknown sparsity config(s) 'quest'"),
    (["--samples", "0"], "samples must be an int >= 1"),
    (["--lengths", "0,1024"], "lengths must be positive"),
    (["--max-tokens", "0"], "max_tokens must be an int >= 1"),
    (["--sparsity-args", "{budget: 1}"], "--sparsity-args is not JSON"),
    (["--sparsity-args", "[1, 2]"], "--sparsity-args must be a JSON object"),
    (["--tasks", "multi_key,multi_key"], "listed twice"),
])
def test_cli_rejects_bad_input_before_loading_a_model(argv, message, capsys, tmp_path):
    from lserve.cli import main

    assert main(["eval", "retrieval", "--model", str(tmp_path / "absent"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_smoke_on_a_tiny_model(tiny_char_model, tmp_path, capsys):
    from lserve.cli import build_parser, main

    args = build_parser().parse_args(["eval", "retrieval", "--tasks", "all"])
    assert args.tasks == ["all"] and args.split == "dev" and args.sparsity == ["dense", "lserve"]
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "retrieval", "--model", str(tiny_char_model), "--tasks", "single_word,multi_value",
               "--lengths", "600", "--samples", "2", "--sparsity", "dense,lserve",
               "--sparsity-args", json.dumps(TINY_SPARSITY), "--max-tokens", "3", "--threads", "2",
               "--out", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "accuracy (dense / lserve), split dev, 2 case(s) per cell" in printed and "multi_value" in printed
    report = json.loads(out.read_text())
    assert len(report["results"]) == 8 and report["split"] == "dev" and report["max_tokens"] == 3
    assert {r["index"] for r in report["results"]} == {0, 1}
    assert all(len(r["output_token_ids"]) <= 3 for r in report["results"])
