"""RULER-style synthetic retrieval tasks for `lserve eval retrieval`: seeded generators and a scorer.

A case is one prompt of about `length` tokens: an instruction, a haystack of varied generated text
(lserve.eval.haystack: story, essay, nature, notes and dialogue paragraphs, no digits) with one or
more needle sentences at sentence boundaries, a question, and the start of the answer. Tasks:

  single_number / single_word / single_uuid  one needle "The special magic number for amber-crane
                     is: 4821937." (a 7-digit number, a word, or a UUID-like hex string)
  multi_key          the asked key's needle among 3 distractor keys with their own numbers
  multi_value        one key with 3 numbers at different places; all must be returned
  multi_query        2 keys asked at once, plus 1 distractor key; all asked numbers must be returned
  variable_tracking  "VAR QXKWT = 48213.", then "VAR BPLMA = VAR QXKWT.", ... (a chain of 4 names) and
                     a distractor chain of 3 with another value; every name of the asked value's chain
                     (the answer starts "... they are: VAR")

Every answer (and distractor value) appears exactly once in the prompt; in variable_tracking the
value appears in its assignment and again in the question, and each name is assigned exactly once.

Determinism and splits: a case is a function of (split, task, length, index) alone. Its seed is a
64-bit hash of those four under a split namespace (case_seed), its text draws from
random.Random(seed), and every needle value (numbers, words, UUIDs, variable names) is drawn only
from its split's half of the value space (a hash of the value picks the half), so `dev` and
`heldout` share no seed and no needle value. The target needle sits at a depth stratified over 5
bins by index (index 0: the middle bin, then 0-0.2, 0.8-1, ...; uniform within the bin); other
needles sit at uniform random depths.

Lengths: the caller's PromptFormat counts tokens with the model's tokenizer; the haystack takes
the most whole sentences that keep the prompt within `length` tokens (one sentence, 10-30 tokens,
short of it at most).

Scoring (score_output), RULER's string match made boundary-aware: an answer counts when it appears
in the output, case-insensitively, not inside a longer run of letters and digits (expected 1234567
does not match 12345678), with thousands separators in the output ignored ("1,234,567"). Tasks
with one answer score 1 or 0, and 0 when a distractor value of the case appears before the
answer; tasks with several score found / (answers + distractors found), the fraction found with
each distractor in the output counted as a wrong answer.

Example:
    >>> fmt = PromptFormat.for_tokenizer(engine.tokenizer)
    >>> case = make_case("multi_key", 2048, "dev", 0, fmt)
    >>> case.answers, case.depth, fmt.count_tokens(case.prompt) <= 2048
    (['4821937'], 0.53..., True)
    >>> score_output(case, " is: 4821937.")
    1.0
"""
from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lserve.eval.haystack import haystack_paragraph

TASKS = ("single_number", "single_word", "single_uuid", "multi_key", "multi_value", "multi_query",
         "variable_tracking")
SPLITS = ("dev", "heldout")
DEPTH_BINS = 5
_BIN_ORDER = (2, 0, 4, 1, 3)  # index 0 sits mid-context; five consecutive indices cover every bin

# Generated tokens each task needs (answer start + values + punctuation), with room to spare.
TASK_MAX_TOKENS = {"single_number": 16, "single_word": 12, "single_uuid": 48, "multi_key": 16,
                   "multi_value": 40, "multi_query": 40, "variable_tracking": 40}

# Needle values of single_word; none occurs in the haystack sources or the frame.
_VALUE_WORDS = (
    "accordion", "avocado", "bagpipe", "bamboo", "banjo", "barometer", "beetroot", "bicycle", "binoculars",
    "blueberry", "buffalo", "butterfly", "cactus", "calculator", "camel", "canoe", "cardigan", "carousel",
    "cashew", "caterpillar", "cello", "chameleon", "chandelier", "cheetah", "chestnut", "cinnamon", "clarinet",
    "coconut", "cucumber", "cymbal", "daffodil", "dolphin", "dragonfly", "dumpling", "eggplant", "elephant",
    "emerald", "envelope", "flamingo", "flute", "giraffe", "gondola", "gorilla", "grapefruit", "guitar",
    "hammock", "harmonica", "hedgehog", "helicopter", "hippopotamus", "iguana", "jaguar", "kangaroo",
    "kayak", "kettle", "koala", "lantern", "lemonade", "leopard", "lobster", "mandolin", "mango", "meteor",
    "microscope", "mosaic", "mushroom", "nectarine", "octopus", "omelette", "ostrich", "otter", "padlock",
    "pancake", "panda", "papaya", "parachute", "parrot", "peacock", "pelican", "penguin", "piano",
    "pineapple", "pistachio", "pretzel", "pumpkin", "raccoon", "raspberry", "rhubarb", "saxophone",
    "scarecrow", "scooter", "seahorse", "sombrero", "spinach", "squirrel", "stapler", "submarine",
    "sunflower", "tambourine", "telescope", "thermometer", "toboggan", "tomato", "tortoise", "trampoline",
    "trombone", "trumpet", "tulip", "turnip", "typewriter", "ukulele", "umbrella", "unicorn", "vanilla",
    "violin", "volcano", "waffle", "walnut", "walrus", "watermelon", "wheelbarrow", "xylophone", "yogurt",
    "zebra", "zucchini")
# Keys are "adjective-noun" pairs from these lists (not needle values, so they need no split).
_KEY_ADJECTIVES = ("amber", "brisk", "crimson", "dusky", "eager", "fragile", "gilded", "hazy", "ivory",
                   "jagged", "lively", "mellow", "nimble", "opal", "placid", "rustic", "scarlet", "tawny",
                   "vivid", "wistful", "zesty", "cobalt", "frosty", "sturdy")
_KEY_NOUNS = ("anchor", "beacon", "cabin", "canyon", "comet", "crane", "ember", "fjord", "galleon",
              "glade", "hamlet", "island", "kestrel", "lagoon", "mantle", "nebula", "orchid", "quarry",
              "summit", "tundra", "vessel", "zephyr", "citadel", "pavilion")


@dataclass(frozen=True)
class PromptFormat:
    """How a user message becomes a prompt, and how prompts become tokens.

    head + message + tail + answer_prefix is the prompt text; encode(text) gives its token ids (the
    engine's tokens for the case). for_tokenizer builds one from a tokenizer (chat template when it
    has one and use_chat_template, else plain text with BOS, as lserve eval niah does); tests build
    one from any counter.
    """

    encode: Callable[[str], List[int]]
    head: str = ""
    tail: str = "\n"

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def render(self, message: str, answer_prefix: str) -> Tuple[str, int]:
        """(prompt text, offset of `message` in it)."""
        return self.head + message + self.tail + answer_prefix, len(self.head)

    @classmethod
    def for_tokenizer(cls, tokenizer, use_chat_template: bool = True) -> "PromptFormat":
        """tokenizer: encode(text, add_special_tokens) and, for chat, chat_template and
        apply_chat_template(messages, add_generation_prompt) (lserve's Tokenizer)."""
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            placeholder = "\u0000MESSAGE\u0000"
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": placeholder}],
                                                     add_generation_prompt=True)
            head, tail = rendered.split(placeholder)
            return cls(encode=lambda text: tokenizer.encode(text, add_special_tokens=False), head=head, tail=tail)
        return cls(encode=lambda text: tokenizer.encode(text, add_special_tokens=True), head="", tail="\n")


@dataclass
class RetrievalCase:
    task: str
    split: str
    length: int  # target prompt tokens (the prompt has at most this many)
    index: int
    seed: int
    depth: float  # where the (first) answer needle sits, as a fraction of the haystack's sentences
    prompt: str
    answers: List[str]  # every expected answer
    distractors: List[str] = field(default_factory=list)  # other needle values of the case
    needle_spans: List[Tuple[int, int]] = field(default_factory=list)  # [start, end) chars of each needle
    answer_needles: List[int] = field(default_factory=list)  # indices into needle_spans holding an answer
    num_prompt_tokens: int = 0
    max_tokens: int = 16

    @property
    def needle_depths(self) -> List[float]:
        """Each needle's start as a fraction of the prompt's characters."""
        return [start / len(self.prompt) for start, _ in self.needle_spans]


def case_seed(split: str, task: str, length: int, index: int) -> int:
    """The 64-bit seed of a case, a hash of (split, task, length, index) in the split's namespace."""
    _check_split(split)
    digest = hashlib.sha256(f"lserve-retrieval\0{split}\0{task}\0{int(length)}\0{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def value_split(value: str) -> str:
    """The split whose half of the value space holds `value` (a needle number, word, UUID or name)."""
    digest = hashlib.sha256(("lserve-retrieval-value\0" + value.lower()).encode()).digest()
    return SPLITS[digest[0] & 1]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")


def case_depth(index: int, rng: random.Random) -> float:
    """Depth of case `index`: stratified over DEPTH_BINS bins, uniform inside its bin."""
    bin_idx = _BIN_ORDER[index % DEPTH_BINS]
    return (bin_idx + rng.random()) / DEPTH_BINS


class _Values:
    """Draws distinct needle values of one split."""

    def __init__(self, rng: random.Random, split: str) -> None:
        self.rng, self.split, self.used = rng, split, set()

    def draw(self, make: Callable[[random.Random], str]) -> str:
        for _ in range(10_000):
            value = make(self.rng)
            if value not in self.used and value_split(value) == self.split:
                self.used.add(value)
                return value
        raise RuntimeError("could not draw a fresh needle value")  # a pool smaller than a case needs

    def number(self, digits: int = 7) -> str:
        return self.draw(lambda rng: str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)))

    def word(self) -> str:
        return self.draw(lambda rng: rng.choice(_VALUE_WORDS))

    def uuid(self) -> str:
        def make(rng: random.Random) -> str:
            h = f"{rng.getrandbits(128):032x}"
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        return self.draw(make)

    def name(self) -> str:
        return self.draw(lambda rng: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)))


def _keys(rng: random.Random, num_keys: int) -> List[str]:
    pairs = set()
    while len(pairs) < num_keys:
        pairs.add((rng.choice(_KEY_ADJECTIVES), rng.choice(_KEY_NOUNS)))
    keys = [f"{a}-{n}" for a, n in sorted(pairs)]
    rng.shuffle(keys)
    return keys


@dataclass
class _Spec:
    """What a task puts in a prompt: needle sentences (in order), which hold answers, their depths."""
    instruction: str
    question: str
    answer_prefix: str
    needles: List[str]
    answers: List[str]
    distractors: List[str]
    answer_needles: List[int]
    depths: List[float]


_KIND = {"single_number": "number", "single_word": "word", "single_uuid": "UUID"}


def _task_spec(task: str, split: str, rng: random.Random, depth: float) -> _Spec:
    values = _Values(rng, split)
    if task in _KIND:
        kind = _KIND[task]
        key = _keys(rng, 1)[0]
        value = {"number": values.number, "word": values.word, "UUID": values.uuid}[kind]()
        return _Spec(
            instruction=(f"A special magic {kind} is hidden within the following text. Make sure to memorize "
                         f"it. I will quiz you about the {kind} afterwards."),
            question=f"What is the special magic {kind} for {key} mentioned in the provided text? "
                     f"Answer with the {kind} only.",
            answer_prefix=f"The special magic {kind} for {key} mentioned in the provided text is",
            needles=[f"The special magic {kind} for {key} is: {value}."], answers=[value], distractors=[],
            answer_needles=[0], depths=[depth])
    instruction = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                   "them. I will quiz you about the numbers afterwards.")
    if task == "multi_key":
        keys = _keys(rng, 4)
        numbers = [values.number() for _ in keys]
        return _Spec(
            instruction=instruction,
            question=f"What is the special magic number for {keys[0]} mentioned in the provided text? "
                     "Answer with the number only.",
            answer_prefix=f"The special magic number for {keys[0]} mentioned in the provided text is",
            needles=[f"The special magic number for {k} is: {v}." for k, v in zip(keys, numbers)],
            answers=numbers[:1], distractors=numbers[1:], answer_needles=[0],
            depths=[depth] + [rng.random() for _ in keys[1:]])
    if task == "multi_value":
        key = _keys(rng, 1)[0]
        numbers = [values.number() for _ in range(3)]
        return _Spec(
            instruction=instruction,
            question=f"What are all the special magic numbers for {key} mentioned in the provided text? "
                     "Answer with the numbers only.",
            answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
            needles=[f"One of the special magic numbers for {key} is: {v}." for v in numbers],
            answers=numbers, distractors=[], answer_needles=[0, 1, 2],
            depths=[depth] + [rng.random() for _ in numbers[1:]])
    if task == "multi_query":
        keys = _keys(rng, 3)
        numbers = [values.number() for _ in keys]
        asked = f"{keys[0]} and {keys[1]}"
        return _Spec(
            instruction=instruction,
            question=f"What are the special magic numbers for {asked} mentioned in the provided text? "
                     "Answer with the numbers only.",
            answer_prefix=f"The special magic numbers for {asked} mentioned in the provided text are",
            needles=[f"The special magic number for {k} is: {v}." for k, v in zip(keys, numbers)],
            answers=numbers[:2], distractors=numbers[2:], answer_needles=[0, 1],
            depths=[depth] + [rng.random() for _ in keys[1:]])
    if task == "variable_tracking":
        value, other = values.number(5), values.number(5)
        chain = [values.name() for _ in range(4)]
        decoy = [values.name() for _ in range(3)]

        def links(names: List[str], number: str) -> List[str]:
            return [f"VAR {names[0]} = {number}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]

        # The chain in order from `depth` to the end; the decoy chain in order anywhere.
        chain_depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in chain[1:])
        decoy_depths = sorted(rng.random() for _ in decoy)
        return _Spec(
            instruction="Memorize and track the chain of variable assignments hidden in the following text.",
            question=f"Find all variables that are assigned the value {value} in the text above. "
                     "Answer with the variable names only.",
            # Ends in "VAR": without it SmolLM2-135M answers with haystack sentences even at 1K tokens.
            answer_prefix=(f"According to the chain of variable assignments in the text above, {len(chain)} "
                           f"variables are assigned the value {value}, they are: VAR"),
            needles=links(chain, value) + links(decoy, other), answers=chain, distractors=decoy + [other],
            answer_needles=list(range(len(chain))), depths=chain_depths + decoy_depths)
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def _assemble(paragraphs: Sequence[List[str]], num_sentences: int, spec: _Spec, fmt: PromptFormat):
    """The prompt with the first `num_sentences` haystack sentences and the needles at their depths:
    (text, needle spans in spec.needles order)."""
    sentences: List[Tuple[str, bool]] = []  # (sentence, starts a paragraph)
    for paragraph in paragraphs:
        for position, sentence in enumerate(paragraph):
            if len(sentences) == num_sentences:
                break
            sentences.append((sentence, position == 0))
    # Needle i goes before haystack sentence round(depth * num_sentences); ties keep spec order.
    slots: Dict[int, List[int]] = {}
    for needle_idx, depth in enumerate(spec.depths):
        slots.setdefault(round(depth * num_sentences), []).append(needle_idx)
    pieces: List[str] = []
    spans: List[Optional[Tuple[int, int]]] = [None] * len(spec.needles)
    message_offset = fmt.render("", "")[1]
    cursor = message_offset + len(spec.instruction) + 2

    def add(text: str, new_paragraph: bool) -> int:
        nonlocal cursor
        separator = "" if not pieces else ("\n\n" if new_paragraph else " ")
        pieces.append(separator + text)
        cursor += len(separator)
        start = cursor
        cursor += len(text)
        return start

    for boundary in range(num_sentences + 1):
        for needle_idx in slots.get(boundary, []):
            start = add(spec.needles[needle_idx], False)
            spans[needle_idx] = (start, start + len(spec.needles[needle_idx]))
        if boundary < num_sentences:
            add(*sentences[boundary])
    message = spec.instruction + "\n\n" + "".join(pieces) + "\n\n" + spec.question
    return fmt.render(message, spec.answer_prefix)[0], spans


def make_case(task: str, length: int, split: str, index: int, fmt: PromptFormat) -> RetrievalCase:
    """Case `index` of `task` at `length` tokens in `split` (see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    _check_split(split)
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    seed = case_seed(split, task, length, index)
    rng = random.Random(seed)
    depth = case_depth(index, rng)
    spec = _task_spec(task, split, rng, depth)
    bare, _ = _assemble([], 0, spec, fmt)
    frame_tokens = fmt.count_tokens(bare)
    if frame_tokens > length:
        raise ValueError(f"length {length} is too short for task {task!r} ({frame_tokens} tokens without any "
                         "haystack)")
    # Enough paragraphs to overshoot, then the most sentences that fit (binary search on the count).
    paragraphs: List[List[str]] = []
    estimate, num_available = frame_tokens, 0
    while estimate <= length:
        _, sentences = haystack_paragraph(rng)
        paragraphs.append(sentences)
        num_available += len(sentences)
        estimate += sum(fmt.count_tokens(" " + s) for s in sentences)
    low, high = 0, num_available  # count(low) <= length < count(high), as far as the estimate goes
    while high - low > 1:
        middle = (low + high) // 2
        if fmt.count_tokens(_assemble(paragraphs, middle, spec, fmt)[0]) <= length:
            low = middle
        else:
            high = middle
    if fmt.count_tokens(_assemble(paragraphs, high, spec, fmt)[0]) <= length:
        low = high
    prompt, spans = _assemble(paragraphs, low, spec, fmt)
    return RetrievalCase(task=task, split=split, length=length, index=index, seed=seed, depth=depth,
                         prompt=prompt, answers=list(spec.answers), distractors=list(spec.distractors),
                         needle_spans=[tuple(s) for s in spans], answer_needles=list(spec.answer_needles),
                         num_prompt_tokens=fmt.count_tokens(prompt), max_tokens=TASK_MAX_TOKENS[task])


def make_cases(tasks: Sequence[str], lengths: Sequence[int], split: str, samples: int,
               fmt: PromptFormat) -> List[RetrievalCase]:
    """The grid task x length x index (task-major), each case as make_case builds it alone."""
    return [make_case(task, length, split, index, fmt)
            for task in tasks for length in lengths for index in range(samples)]


# ---- scoring --------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d)[,\u202f\u00a0](?=\d{3}(?!\d))")


def find_answer(output: str, answer: str) -> int:
    """Index of the first occurrence of `answer` in `output` that is not part of a longer run of
    letters and digits (case-insensitive, thousands separators in numbers ignored), or -1."""
    text = _THOUSANDS.sub("", output) if answer.isdigit() else output
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])"
    match = re.search(pattern, text, flags=re.IGNORECASE)
    return -1 if match is None else match.start()


def score_answers(output: str, answers: Sequence[str], distractors: Sequence[str] = ()) -> float:
    """1 answer: 1.0 when it is found and no distractor is found before it, else 0.0. Several:
    found / (len(answers) + distractors found): RULER's fraction of answers found (boundary-aware),
    with each distractor value in the output counted as a wrong answer, so listing every needle
    value of the prompt does not score 1."""
    if not answers:
        raise ValueError("a case needs at least one answer")
    if len(answers) == 1:
        position = find_answer(output, answers[0])
        if position < 0:
            return 0.0
        earlier = [d for d in distractors if 0 <= find_answer(output, d) < position]
        return 0.0 if earlier else 1.0
    found = sum(find_answer(output, a) >= 0 for a in answers)
    wrong = sum(find_answer(output, d) >= 0 for d in distractors)
    return found / (len(answers) + wrong)


def score_output(case: RetrievalCase, output: str) -> float:
    """The score of `output` (the generated text after the prompt's answer prefix) on `case`."""
    return score_answers(output, case.answers, case.distractors)
