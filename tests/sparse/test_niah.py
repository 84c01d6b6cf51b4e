"""Needle-in-a-haystack harness: seeded generator, scorer, recall helper, and an end-to-end run
through the Engine with a tiny random Llama and a character-level tokenizer (dense)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lserve.eval.niah import accuracy_table, make_case, make_cases, plot_heatmap, run_niah, score_reply
from lserve.eval.recall import attention_probs, selection_recall, selection_recall_from_qk

CHARS = [chr(c) for c in range(32, 127)]


class CharTokenizer:
    """One token per printable ASCII character; id 1 is BOS."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + CHARS.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(CHARS[i - 3] for i in ids if i >= 3)


class ChatCharTokenizer(CharTokenizer):
    chat_template = "yes"

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "<user>" + messages[0]["content"] + "</user><assistant>"


@pytest.mark.parametrize("tokenizer", [CharTokenizer(), ChatCharTokenizer()])
def test_cases_are_seeded_exact_length_and_hold_the_needle_at_depth(tokenizer):
    for depth in (0.0, 0.25, 0.5, 1.0):
        case = make_case(tokenizer, length=900, depth=depth, seed=3)
        again = make_case(tokenizer, length=900, depth=depth, seed=3)
        assert case == again
        assert case.num_prompt_tokens == 900
        assert 5 <= len(case.passkey) <= 7 and case.passkey.isdigit()
        text = tokenizer.decode(case.prompt_token_ids)
        needle = f"The pass key is {case.passkey}."
        assert text.count(needle) == 1
        # the only digits in the prompt are the passkey's
        assert "".join(c for c in text if c.isdigit()) == case.passkey * 2
        assert text.endswith("The pass key is")
        needle_text = tokenizer.decode(case.prompt_token_ids[case.needle_token_offset:])
        assert needle_text.startswith(" " + needle)
    shallow = make_case(tokenizer, 900, 0.0, seed=3).needle_token_offset
    deep = make_case(tokenizer, 900, 1.0, seed=3).needle_token_offset
    middle = make_case(tokenizer, 900, 0.5, seed=3).needle_token_offset
    assert shallow < middle < deep
    if tokenizer.chat_template:
        assert tokenizer.decode(make_case(tokenizer, 900, 0.5).prompt_token_ids).startswith("<user>")


def test_cases_do_not_depend_on_the_grid_and_differ_across_seeds():
    tok = CharTokenizer()
    grid = make_cases(tok, [600, 800], [0.0, 0.5], seed=1, samples_per_cell=2)
    assert len(grid) == 8
    assert grid[5] == make_case(tok, 800, 0.0, seed=1, sample=1)
    assert make_case(tok, 800, 0.5, seed=1).passkey != make_case(tok, 800, 0.5, seed=2).passkey
    with pytest.raises(ValueError):
        make_case(tok, 50, 0.5)
    with pytest.raises(ValueError):
        make_case(tok, 800, 1.5)


@pytest.mark.parametrize("reply, ok", [(" 123456.", True), ("123456", True), ("The key is 123456!", True),
                                       (" 1234567", False), (" 12345", False), ("none", False),
                                       (" 12 then 123456", False), ("", False)])
def test_score_reply_takes_the_first_number(reply, ok):
    assert score_reply(reply, "123456") is ok


def test_accuracy_table():
    rows = [dict(config="dense", length=1024, depth=0.5, correct=c) for c in (True, False, True, True)]
    rows.append(dict(config="dense", length=1024, depth=1.0, correct=False))
    assert accuracy_table(rows) == {"dense": {"1024": {"0.5": 0.75, "1.0": 0.0, "all": 0.6}}}


def test_selection_recall_hand_computed():
    # 2 query heads sharing 1 KV head (GQA 2), 5 keys, page_size 2 -> pages {0,1}, {2,3}, {4}.
    probs = np.array([[0.1, 0.2, 0.3, 0.3, 0.1],
                      [0.5, 0.0, 0.0, 0.25, 0.25]])
    np.testing.assert_allclose(selection_recall(probs, [[0, 2]], page_size=2), [0.4, 0.75], atol=1e-12)
    np.testing.assert_allclose(selection_recall(probs, [[1]], page_size=2), [0.6, 0.25], atol=1e-12)
    # num_selected cuts the padded tail; duplicates count once
    np.testing.assert_allclose(selection_recall(probs, [[2, 2, 1]], page_size=2, num_selected=[2]), [0.1, 0.25])
    np.testing.assert_allclose(selection_recall(probs, [[0, 1, 2]], page_size=2), [1.0, 1.0])
    # 2 KV heads, each with its own selection
    np.testing.assert_allclose(selection_recall(probs, [[0], [2]], page_size=2), [0.3, 0.25], atol=1e-12)
    with pytest.raises(ValueError):
        selection_recall(probs, [[3]], page_size=2)


def test_selection_recall_from_qk_matches_a_direct_softmax():
    rng = np.random.default_rng(0)
    query = rng.standard_normal((4, 8))  # 4 query heads
    keys = rng.standard_normal((19, 2, 8))  # 19 keys, 2 KV heads
    probs = attention_probs(query, keys)
    for head in range(4):
        logits = keys[:, head // 2, :] @ query[head] / np.sqrt(8)
        expected = np.exp(logits - logits.max())
        np.testing.assert_allclose(probs[head], expected / expected.sum(), rtol=1e-12)
    selected = [[0, 4], [1, 2]]
    recall = selection_recall_from_qk(query, keys, selected, page_size=4)
    in_pages = [np.r_[0:4, 16:19], np.r_[4:12]]
    expected = [probs[h, in_pages[h // 2]].sum() for h in range(4)]
    np.testing.assert_allclose(recall, expected, rtol=1e-12)


def _tiny_model_with_char_tokenizer(directory):
    """A random 2-layer Llama (numpy + safetensors, no torch) and a character-level tokenizer.json."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from lserve.loader.hf import expected_weight_shapes, spec_from_hf_config

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(vocab), hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False, hidden_act="silu")
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    weights = {name: (np.ones(shape) if len(shape) == 1 else rng.normal(0.0, 0.15, shape)).astype(np.float32)
               for name, shape in expected_weight_shapes(spec_from_hf_config(config)).items()}
    safetensors_numpy.save_file(weights, str(directory / "model.safetensors"))


def test_harness_end_to_end_with_a_tiny_model(tmp_path):
    pytest.importorskip("lserve._C")
    from lserve.engine import Engine

    _tiny_model_with_char_tokenizer(tmp_path)
    lines, partials = [], []
    report = run_niah(str(tmp_path), lengths=[300, 2000], depths=[0.0, 1.0], configs=["dense", "lserve"],
                      sparsity_args=dict(streaming_fraction=0.0), seed=0, max_tokens=4, engine_kwargs=dict(num_threads=2), log=lines.append,
                      on_result=lambda partial: partials.append(len(partial["results"])))
    dense = [r for r in report["results"] if r["config"] == "dense"]
    assert len(dense) == 4
    assert partials == list(range(1, len(report["results"]) + 1))
    assert [r["prompt_tokens"] for r in dense] == [300, 300, 508, 508]  # 2000 capped at 512 - max_tokens
    assert all(isinstance(r["correct"], bool) and r["seconds"] >= 0 for r in dense)
    assert set(report["accuracy"]["dense"]) == {"300", "2000"}
    assert any("capped" in line for line in lines)
    from lserve.tokenizer import Tokenizer

    expected_passkey = make_case(Tokenizer.from_pretrained(str(tmp_path)), 300, 0.0, 0).passkey
    assert dense[0]["passkey"] == expected_passkey
    from lserve.eval.niah import engine_accepts_sparsity

    if engine_accepts_sparsity(Engine):
        assert len(report["results"]) == 8
    else:
        assert "lserve" in report["skipped"] and len(report["results"]) == 4
    path = tmp_path / "results.json"
    from lserve.eval.niah import write_results

    write_results(str(path), report)
    assert json.loads(path.read_text())["accuracy"] == report["accuracy"]


def test_heatmap_written_or_skipped(tmp_path):
    report = {"model": "m", "configs": ["dense"], "lengths": [1024, 2048], "depths": [0.0, 1.0],
              "accuracy": {"dense": {"1024": {"0.0": 1.0, "1.0": 0.0, "all": 0.5},
                                     "2048": {"0.0": 1.0, "1.0": 1.0, "all": 1.0}}}}
    path = tmp_path / "heatmap.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot_heatmap(report, str(path)) is False and not path.exists()
        return
    assert plot_heatmap(report, str(path)) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_registers_calibrate_and_eval():
    from lserve.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "niah", "--lengths", "1024,2048", "--depths", "0,0.5", "--sparsity",
                              "dense,lserve", "--out", "x.json"])
    assert args.lengths == [1024, 2048] and args.depths == [0.0, 0.5] and args.sparsity == "dense,lserve"
    args = parser.parse_args(["calibrate", "--out", "p.tsv", "--seq-len", "2048", "--sink", "64", "--local", "256"])
    assert (args.seq_len, args.sink, args.local) == (2048, 64, 256)


def _numpy_recall(query, keys, budget, page_size, logical, keep_first):
    """Independent recall of one layer: Quest-style page scores, forced newest (and first) page,
    top pages within the budget, share of softmax mass inside them, per query head."""
    num_qo, dim = query.shape
    num_keys, num_kv, _ = keys.shape
    group = num_qo // num_kv
    num_pages = -(-num_keys // page_size)
    num_select = budget // page_size
    logits = np.einsum("hd,khd->hk", query.astype(np.float64),
                       np.repeat(keys.astype(np.float64), group, axis=1)) / np.sqrt(dim)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    recall = []
    for h in range(num_kv):
        q = query[h * group:(h + 1) * group].astype(np.float64)
        scores = []
        for p in range(num_pages):
            best = -np.inf
            for start in range(p * page_size, min(num_keys, (p + 1) * page_size), logical):
                block = keys[start:min(num_keys, start + logical), h].astype(np.float64)
                kmax, kmin = block.max(axis=0), block.min(axis=0)
                best = max(best, np.maximum(q * kmax, q * kmin).sum())
            scores.append(best)
        forced = {num_pages - 1} | ({0} if keep_first else set())
        rest = sorted((p for p in range(num_pages) if p not in forced), key=lambda p: (-scores[p], p))
        chosen = sorted(forced) + rest[:max(0, num_select - len(forced))] if num_pages > num_select else range(num_pages)
        mask = np.zeros(num_keys, dtype=bool)
        for p in chosen:
            mask[p * page_size:(p + 1) * page_size] = True
        recall.extend(probs[h * group + g, mask].sum() for g in range(group))
    return np.array(recall)


def test_model_selection_recall_matches_numpy_on_a_real_forward(tmp_path):
    pytest.importorskip("lserve._C")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lserve.eval.model_recall import QKCapture, model_selection_recall
    from lserve.sparsity import SparsityConfig

    _tiny_model_with_char_tokenizer(tmp_path)
    capture = QKCapture(str(tmp_path))
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 3 + len(CHARS), 333)]
    records = capture.capture(prompt)
    assert sorted(records) == [0, 1]
    query, keys = records[1]
    assert query.shape == (4, 16) and keys.shape == (333, 2, 16)

    wide = SparsityConfig(enabled=True, physical_page_size=16, logical_page_size=4, decode_token_budget=512,
                          streaming_fraction=0.0)
    assert model_selection_recall(capture, prompt, wide)["mean"] == pytest.approx(1.0)
    for keep_first in (True, False):
        tight = SparsityConfig(enabled=True, physical_page_size=16, logical_page_size=4, decode_token_budget=64,
                               always_select_sink_page=keep_first, streaming_fraction=0.0)
        report = model_selection_recall(capture, prompt, tight)
        expected = np.concatenate([_numpy_recall(*records[layer], 64, 16, 4, keep_first) for layer in (0, 1)])
        assert report["num_heads"] == 8
        assert report["mean"] == pytest.approx(expected.mean(), rel=1e-5)
        assert report["min"] == pytest.approx(expected.min(), rel=1e-5)
        assert 0.0 < report["min"] < 1.0
    # Streaming heads select nothing and are left out.
    half = SparsityConfig(enabled=True, physical_page_size=16, logical_page_size=4, decode_token_budget=64,
                          streaming_heads=[[0], [1]])
    assert model_selection_recall(capture, prompt, half)["num_heads"] == 4


def test_harness_records_selection_recall_for_sparse_configs(tmp_path):
    pytest.importorskip("lserve._C")
    pytest.importorskip("transformers")
    _tiny_model_with_char_tokenizer(tmp_path)
    report = run_niah(str(tmp_path), lengths=[300], depths=[0.5], configs=["dense", "lserve"],
                      sparsity_args=dict(physical_page_size=16, logical_page_size=4, decode_token_budget=64,
                                         streaming_fraction=0.0),
                      max_tokens=2, engine_kwargs=dict(num_threads=2), log=lambda *a: None, recall=True)
    dense, sparse = report["results"]
    assert "recall_mean" not in dense
    assert 0.0 < sparse["recall_min"] <= sparse["recall_mean"] < 1.0
    assert report["recall"] == {"lserve": {"300": {"mean": sparse["recall_mean"], "min": sparse["recall_min"]}}}
