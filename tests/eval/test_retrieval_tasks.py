"""Retrieval task generators (determinism, splits, needles, lengths) and the scorer."""
from __future__ import annotations

import random
import re

import pytest
from eval_helpers import word_tokens

from lserve.eval import haystack
from lserve.eval.retrieval_tasks import (DEPTH_BINS, SPLITS, TASK_MAX_TOKENS, TASKS, PromptFormat, case_seed,
                                         find_answer, make_case, make_cases, score_answers, score_output,
                                         value_split)

LENGTHS = (300, 700)


def needle_values(case):
    """Every needle value of a case: answers, distractor values, and for variable tracking the names."""
    return set(case.answers) | set(case.distractors)


def test_same_seed_same_case_and_different_indices_differ(word_format):
    for task in TASKS:
        first = make_case(task, 700, "dev", 3, word_format)
        again = make_case(task, 700, "dev", 3, word_format)
        assert first == again, task
        other = make_case(task, 700, "dev", 4, word_format)
        assert other.seed != first.seed and other.prompt != first.prompt and other.answers != first.answers
        # a case depends on (split, task, length, index) only, not on the grid it is built in
        grid = make_cases([task], [300, 700], "dev", 5, word_format)
        assert grid[8] == first


def test_generation_uses_no_global_random_state(word_format):
    random.seed(1)
    first = make_case("multi_key", 700, "heldout", 0, word_format)
    random.seed(2)
    assert make_case("multi_key", 700, "heldout", 0, word_format) == first


def test_splits_share_no_seed_and_no_needle_value(word_format):
    seeds = {split: set() for split in SPLITS}
    values = {split: set() for split in SPLITS}
    for split in SPLITS:
        for case in make_cases(TASKS, LENGTHS, split, 6, word_format):
            assert case.split == split and case.seed == case_seed(split, case.task, case.length, case.index)
            seeds[split].add(case.seed)
            for value in needle_values(case):
                assert value_split(value) == split, (case.task, value)
                values[split].add(value)
    assert len(seeds["dev"]) == len(TASKS) * len(LENGTHS) * 6
    assert not seeds["dev"] & seeds["heldout"]
    assert not values["dev"] & values["heldout"]
    # both halves of the value space are used, so the split is not a constant
    assert {value_split(str(n)) for n in range(1_000_000, 1_000_050)} == set(SPLITS)


def test_answers_appear_exactly_once_and_spans_hold_the_needles(word_format):
    for case in make_cases(TASKS, LENGTHS, "dev", 5, word_format):
        prompt = case.prompt
        for start, end in case.needle_spans:
            needle = prompt[start:end]
            assert needle.endswith(".") and (needle.startswith("The special magic") or needle.startswith("One of")
                                             or needle.startswith("VAR ")), (case.task, needle)
        spans = sorted(case.needle_spans)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), "needles overlap"
        for answer_needle, answer in zip(case.answer_needles, case.answers):
            start, end = case.needle_spans[answer_needle]
            assert answer in prompt[start:end]
        if case.task == "variable_tracking":
            value = re.search(r"VAR \w+ = (\d+)\.", prompt[slice(*case.needle_spans[0])]).group(1)
            # the value: its assignment and the question (and the answer start); each name assigned once
            assert len(re.findall(rf"(?<!\d){value}(?!\d)", prompt)) == 3
            for name in case.answers + case.distractors[:-1]:
                assert len(re.findall(rf"VAR {name} =", prompt)) == 1
                assert re.fullmatch(r"[A-Z]{5}", name)
            assert case.answers[0] in prompt[slice(*case.needle_spans[0])]
        else:
            for value in needle_values(case):
                assert len(re.findall(rf"(?<![\w-]){re.escape(value)}(?![\w-])", prompt, flags=re.I)) == 1, \
                    (case.task, value)
        assert prompt.startswith("<user>") and "</user><assistant>" in prompt
        assert case.max_tokens == TASK_MAX_TOKENS[case.task]


def test_haystack_has_no_digits_capital_words_or_value_words():
    from lserve.eval.retrieval_tasks import _KEY_ADJECTIVES, _KEY_NOUNS, _VALUE_WORDS

    rng = random.Random(5)
    text = " ".join(" ".join(haystack.haystack_paragraph(rng)[1]) for _ in range(400))
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert not re.search(r"\d", text) and "-" not in text
    assert not re.search(r"\b[A-Z]{2,}\b", text)
    assert not words & set(_VALUE_WORDS), words & set(_VALUE_WORDS)
    assert not words & (set(_KEY_ADJECTIVES) | set(_KEY_NOUNS))
    assert {source for source, _ in (haystack.haystack_paragraph(rng) for _ in range(60))} == \
        set(haystack.HAYSTACK_SOURCES)
    # varied: few sentences repeat
    sentences = re.split(r"(?<=[.\"])\s+", text)
    assert len(set(sentences)) > 0.5 * len(sentences)


def test_lengths_hit_their_targets_with_a_stub_tokenizer(word_format):
    for task in TASKS:
        for length in (400, 1000, 2500):
            case = make_case(task, length, "heldout", 1, word_format)
            count = len(word_tokens(case.prompt))
            assert case.num_prompt_tokens == count
            assert length - 40 <= count <= length, (task, length, count)
    with pytest.raises(ValueError, match="too short"):
        make_case("variable_tracking", 60, "dev", 0, word_format)


def test_depths_are_stratified_and_place_the_needle(word_format):
    depths = [make_case("single_number", 1000, "dev", index, word_format).depth for index in range(DEPTH_BINS)]
    assert sorted(int(d * DEPTH_BINS) for d in depths) == list(range(DEPTH_BINS))
    assert int(depths[0] * DEPTH_BINS) == DEPTH_BINS // 2  # the first case sits mid-context
    for index in range(DEPTH_BINS):
        case = make_case("single_number", 1000, "dev", index, word_format)
        assert case.needle_depths[0] == pytest.approx(case.depth, abs=0.12)
    deep = make_case("multi_value", 1000, "dev", 2, word_format)  # bin 4: 0.8-1.0
    assert deep.needle_depths[0] > 0.7


def test_bad_arguments(word_format):
    with pytest.raises(ValueError, match="unknown task"):
        make_case("passkey", 500, "dev", 0, word_format)
    with pytest.raises(ValueError, match="unknown split"):
        make_case("single_number", 500, "test", 0, word_format)
    with pytest.raises(ValueError, match="index"):
        make_case("single_number", 500, "dev", -1, word_format)


def test_real_tokenizer_lengths_and_chat_format(smollm2_gguf):
    from lserve.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(str(smollm2_gguf))
    fmt = PromptFormat.for_tokenizer(tokenizer)
    for task in TASKS:
        case = make_case(task, 1024, "dev", 0, fmt)
        ids = tokenizer.encode(case.prompt, add_special_tokens=False)
        assert case.num_prompt_tokens == len(ids) and 1024 - 40 <= len(ids) <= 1024, (task, len(ids))
        assert case.prompt.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in case.prompt
    long = make_case("multi_key", 8192 - 16, "heldout", 3, fmt)
    assert 8192 - 16 - 40 <= long.num_prompt_tokens <= 8192 - 16
    plain = PromptFormat.for_tokenizer(tokenizer, use_chat_template=False)
    case = make_case("single_word", 512, "dev", 0, plain)
    assert "<|im_start|>" not in case.prompt and case.num_prompt_tokens <= 512


# ---- scorer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, expected", [
    (" 1234567.", 1.0), ("1234567", 1.0), (": **1234567**", 1.0), (" 1,234,567.", 1.0), ("is 1234567!", 1.0),
    (" 12345678", 0.0),  # the answer inside a longer number does not count
    (" 01234567", 0.0), ("123456", 0.0), (" 1234567890", 0.0), ("none", 0.0), ("", 0.0), ("x1234567", 0.0),
    (" 7654321, then 1234567", 0.0),  # a distractor before the answer
    (" 1234567, or maybe 7654321", 1.0),
    (" 12,345,67", 0.0),
])
def test_single_answer_scoring(output, expected):
    assert score_answers(output, ["1234567"], distractors=["7654321"]) == expected


def test_word_and_uuid_answers_match_whole_and_case_insensitively():
    assert score_answers(' "Penguin."', ["penguin"]) == 1.0
    assert score_answers(" penguins", ["penguin"]) == 0.0
    assert score_answers(" emperor-penguin", ["penguin"]) == 1.0  # hyphen is a boundary
    uuid = "3f2a9c1e-7b4d-4e1f-9a2b-5c6d7e8f9a0b"
    assert score_answers(": " + uuid.upper() + ".", [uuid]) == 1.0
    assert score_answers(": " + uuid[:-1], [uuid]) == 0.0
    assert score_answers(": " + uuid + "c", [uuid]) == 0.0


def test_multi_answer_scoring_gives_partial_credit_and_counts_distractors_as_wrong():
    answers = ["1111111", "2222222", "3333333"]
    assert score_answers("1111111, 2222222 and 3333333", answers) == 1.0
    assert score_answers("3333333 and 1111111", answers) == pytest.approx(2 / 3)
    assert score_answers("11111112, 2222222", answers) == pytest.approx(1 / 3)
    assert score_answers("nothing", answers) == 0.0
    assert score_answers("1111111 2222222 3333333 4444444", answers, ["4444444"]) == pytest.approx(3 / 4)
    assert score_answers("1111111 1111111", answers) == pytest.approx(1 / 3)  # repeats count once
    with pytest.raises(ValueError):
        score_answers("x", [])


def test_find_answer_positions():
    assert find_answer("a 123 b 1234", "1234") == 8
    assert find_answer("a 123 b 1234", "123") == 2
    assert find_answer("VAR ABCDE, VAR ABCDEF", "abcdef") == 15


def test_score_output_on_generated_cases(word_format):
    for task in TASKS:
        case = make_case(task, 500, "dev", 0, word_format)
        assert score_output(case, " " + ", ".join(case.answers) + ".") == 1.0
        assert score_output(case, " no idea") == 0.0
        if case.distractors:
            assert score_output(case, " " + ", ".join(case.distractors + case.answers)) < 1.0
