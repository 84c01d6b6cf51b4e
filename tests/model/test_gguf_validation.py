"""Corrupt GGUF files are refused before anything is allocated, with an error naming the file, the
metadata key or tensor, and the bad value (issue 13, items 4 and 5).

Each case is a tiny llama GGUF (tests/gguf_testing.py) with one defect, checked twice: in process
at the lowest level that must refuse it (_C.GgufFile for the layout, _C.gguf_model_config_dict for
the model), and through lserve.Engine as a user loads a model, in a worker subprocess under a 4 GiB
address-space limit (tests/gguf_fuzz.py run_files), so an over-allocation shows up as a failed
case instead of a machine out of memory. Every error must be lserve's (a ValueError) and name the
file; none may be an allocation failure.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

import lserve
from gguf_fuzz import UNCLEAN_MESSAGES, run_files
from gguf_testing import map_header, patch_field, write_tiny_llama
from lserve import _C
from lserve.tokenizer import Tokenizer


def _tensor_offset(blob: bytes, name: str) -> int:
    header = map_header(blob)
    labels = [field.label for field in header.fields if field.kind == "tensor_offset"]
    return header.tensor_offsets[labels.index(name)]


def _replace_string(blob: bytes, key: str, new: bytes) -> bytes:
    """`blob` with the string value of `key` overwritten by `new` (same length)."""
    field = next(f for f in map_header(blob).fields if f.kind == "string_length" and f.label == key)
    start = field.offset + 8
    assert int.from_bytes(blob[field.offset:start], "little") == len(new)
    return blob[:start] + new + blob[start + len(new):]


@dataclasses.dataclass(frozen=True)
class Case:
    """One corrupt file: how to make it, which level refuses it, what the error must say."""

    write: Callable[[pathlib.Path], None]
    level: str                       # "reader": _C.GgufFile raises; "config": gguf_model_config_dict raises
    needles: Tuple[str, ...]         # substrings of the error (the file path is always required)
    absent: Tuple[str, ...] = ()     # substrings the error must not hold (a wrongly blamed name)
    engine_args: Optional[dict] = None


def _metadata(**overrides) -> Callable[[pathlib.Path], None]:
    """A writer of the tiny llama with metadata overridden: key=(value, GGUFValueType)."""
    metadata = {key.replace("__", "."): value for key, value in overrides.items()}
    return lambda path: write_tiny_llama(path, metadata=metadata)


def _patched(patch: Callable[[bytes], bytes], **kwargs) -> Callable[[pathlib.Path], None]:
    def write(path: pathlib.Path) -> None:
        write_tiny_llama(path, **kwargs)
        path.write_bytes(patch(path.read_bytes()))
    return write


U32, F32 = VT.UINT32, VT.FLOAT32
CASES: Dict[str, Case] = {
    # item 4: sizes validated against the file before anything is allocated
    "layer count 10^6": Case(_metadata(llama__block_count=(10**6, U32)), "config",
                             ("'llama.block_count' = 1000000", "layers 0 to 1")),
    "context length 2^31-1": Case(_metadata(llama__context_length=(2**31 - 1, U32)), "config",
                                  ("'llama.context_length' = 2147483647",)),
    "feed-forward size 10^8": Case(_metadata(llama__feed_forward_length=(10**8, U32)), "config",
                                   ("'llama.feed_forward_length' = 100000000", "96")),
    "head count 4000": Case(_metadata(llama__attention__head_count=(4000, U32)), "config",
                            ("'llama.attention.head_count' = 4000",)),
    "tensor missing": Case(lambda path: write_tiny_llama(path, skip_tensors=("blk.1.ffn_up.weight",)), "config",
                           ("missing", "blk.1.ffn_up.weight")),
    # the key is corrupt: the error names it, not the 21 tensors that hold the real hidden size
    "hidden size key": Case(_metadata(llama__embedding_length=(32, U32)), "config",
                            ("'llama.embedding_length' = 32", "every tensor", "64")),
    # one tensor's dimension is corrupt: the error names that tensor and its value, not the key's sane one
    "tensor dim": Case(_patched(lambda blob: patch_field(blob, "dim", "blk.1.ffn_up.weight", 95, occurrence=1)),
                       "config", ("blk.1.ffn_up.weight (95, 64)", "feed-forward size is 96"),
                       absent=("blk.0.ffn_up.weight", "every tensor")),
    "data offset beyond the end": Case(_patched(lambda blob: patch_field(blob, "tensor_offset", "output.weight",
                                                                         2**40)),
                                       "reader", ("output.weight", str(2**40), "beyond the end")),
    "truncated": Case(_patched(lambda blob: blob[:-100]), "reader", ("output.weight", "truncated")),
    "huge string length": Case(_patched(lambda blob: patch_field(blob, "string_length", "tokenizer.chat_template",
                                                                 2**62)),
                               "reader", ("tokenizer.chat_template", str(2**62))),
    "huge key length": Case(_patched(lambda blob: patch_field(blob, "key_length", "llama.block_count", 2**63)),
                            "reader", ("key claims", str(2**63))),
    "huge array length": Case(_patched(lambda blob: patch_field(blob, "array_length", "tokenizer.ggml.tokens",
                                                                2**61)),
                              "reader", ("tokenizer.ggml.tokens", str(2**61))),
    "huge tensor count": Case(_patched(lambda blob: patch_field(blob, "count", "header", 2**40)), "reader",
                              ("tensor count", str(2**40))),
    "huge metadata count": Case(_patched(lambda blob: patch_field(blob, "count", "header", 2**40, occurrence=1)),
                                "reader", ("metadata count", str(2**40))),
    "huge tensor dim": Case(_patched(lambda blob: patch_field(blob, "dim", "token_embd.weight", 2**40)), "reader",
                            ("token_embd.weight", str(2**40))),
    "unsupported tensor type": Case(lambda path: write_tiny_llama(path, qtype=QT.Q5_0), "config",
                                    ("token_embd.weight (Q5_0)", "cannot read")),
    # item 5: files that used to load into garbage
    "context length 1": Case(_metadata(llama__context_length=(1, U32)), "config", ("'llama.context_length' = 1 ",)),
    "epsilon +inf": Case(_metadata(llama__attention__layer_norm_rms_epsilon=(float("inf"), F32)), "config",
                         ("'llama.attention.layer_norm_rms_epsilon' = inf",)),
    "epsilon NaN": Case(_metadata(llama__attention__layer_norm_rms_epsilon=(float("nan"), F32)), "config",
                        ("'llama.attention.layer_norm_rms_epsilon' = nan",)),
    "epsilon 0": Case(_metadata(llama__attention__layer_norm_rms_epsilon=(0.0, F32)), "config",
                      ("'llama.attention.layer_norm_rms_epsilon' = 0 ",)),
    "rope base +inf": Case(_metadata(llama__rope__freq_base=(float("inf"), F32)), "config",
                           ("'llama.rope.freq_base' = inf",)),
    "rope base NaN": Case(_metadata(llama__rope__freq_base=(float("nan"), F32)), "config",
                          ("'llama.rope.freq_base' = nan",)),
    "rope base -1": Case(_metadata(llama__rope__freq_base=(-1.0, F32)), "config", ("'llama.rope.freq_base' = -1",)),
    "overlapping tensors": Case(_patched(lambda blob: patch_field(blob, "tensor_offset", "blk.1.ffn_up.weight",
                                                                  _tensor_offset(blob, "blk.1.ffn_gate.weight"))),
                                "reader", ("blk.1.ffn_up.weight", "overlaps", "blk.1.ffn_gate.weight")),
    "eos id outside the vocabulary": Case(_metadata(tokenizer__ggml__eos_token_id=(1000, U32)), "config",
                                          ("'tokenizer.ggml.eos_token_id' = 1000",)),
    # a string that is not UTF-8, quoted in the error: a ValueError, not UnicodeDecodeError
    "architecture not UTF-8": Case(_patched(lambda blob: _replace_string(blob, "general.architecture", b"ll\xffma")),
                                   "config", ("architecture 'll\\xffma'",)),
}
# Refused by the tokenizer (Python), after the C++ config accepted the file.
TOKENIZER_CASES: Dict[str, Case] = {
    "merges of integers": Case(_metadata(tokenizer__ggml__merges=([1, 2], VT.ARRAY)), "tokenizer",
                               ("tokenizer.ggml.merges", "array of int32", "expected array of string")),
    "token types of strings": Case(_metadata(tokenizer__ggml__token_type=(["a"] * 40, VT.ARRAY)), "tokenizer",
                                   ("tokenizer.ggml.token_type", "array of string")),
}
# Valid but huge: loading must not allocate in proportion to the context length.
ENGINE_CASES: Dict[str, Case] = {
    "context length 2^30": Case(_metadata(llama__context_length=(2**30, U32)), "engine",
                                ("max_model_len = 1073741824",)),
}


def _check_message(case_name: str, case: Case, path: pathlib.Path, error_type: str, message: str) -> None:
    assert error_type in ("Error", "ValueError"), f"{case_name}: {error_type}: {message}"
    assert not any(text in message for text in UNCLEAN_MESSAGES), f"{case_name}: {message}"
    if case.level != "engine":
        assert str(path) in message, f"{case_name}: the error does not name the file: {message}"
    for needle in case.needles:
        assert needle in message, f"{case_name}: {needle!r} not in: {message}"
    for text in case.absent:
        assert text not in message, f"{case_name}: {text!r} wrongly named in: {message}"


@pytest.fixture(scope="module")
def corrupt_files(tmp_path_factory) -> Dict[str, pathlib.Path]:
    directory = tmp_path_factory.mktemp("corrupt_gguf")
    paths = {}
    for idx, (name, case) in enumerate({**CASES, **TOKENIZER_CASES, **ENGINE_CASES}.items()):
        paths[name] = directory / f"case_{idx:02d}.gguf"
        case.write(paths[name])
    return paths


@pytest.fixture(scope="module")
def engine_results(corrupt_files) -> Dict[str, dict]:
    """Every case loaded through lserve.Engine in one worker subprocess (4 GiB address space)."""
    names = list(corrupt_files)
    cases = {**CASES, **TOKENIZER_CASES, **ENGINE_CASES}
    jobs = [(str(corrupt_files[name]), cases[name].engine_args or {}) for name in names]
    return dict(zip(names, run_files(jobs)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_or_config_refuses(corrupt_files, name):
    case, path = CASES[name], corrupt_files[name]
    if case.level == "reader":
        with pytest.raises(ValueError) as info:
            _C.GgufFile(path)
    else:
        file = _C.GgufFile(path)  # the layout is fine: the model is what is wrong
        with pytest.raises(ValueError) as info:
            _C.gguf_model_config_dict(file)
    _check_message(name, case, path, type(info.value).__name__, str(info.value))
    assert isinstance(info.value, _C.Error)


@pytest.mark.parametrize("name", sorted(TOKENIZER_CASES))
def test_tokenizer_refuses(corrupt_files, name):
    case, path = TOKENIZER_CASES[name], corrupt_files[name]
    _C.gguf_model_config_dict(_C.GgufFile(path))  # the model config is fine
    with pytest.raises(ValueError) as info:
        Tokenizer.from_gguf(path)
    _check_message(name, case, path, "ValueError", str(info.value))


@pytest.mark.parametrize("name", sorted({**CASES, **TOKENIZER_CASES, **ENGINE_CASES}))
def test_engine_refuses_cleanly(corrupt_files, engine_results, name):
    case = {**CASES, **TOKENIZER_CASES, **ENGINE_CASES}[name]
    result = engine_results[name]
    assert result["outcome"] == "clean_error", f"{name}: {result}"
    _check_message(name, case, corrupt_files[name], result["type"], result["message"])


def test_valid_file_loads(tmp_path):
    """The harness's control: the uncorrupted tiny llama loads, generates and chats."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    (result,) = run_files([str(path)])
    assert result == {"outcome": "loaded", "type": None, "message": None}


def test_huge_context_length_with_small_max_model_len_works(corrupt_files):
    """A context length of 2^30 is valid: with max_model_len given, nothing is sized by it."""
    engine = lserve.Engine(str(corrupt_files["context length 2^30"]), max_model_len=64, max_num_seqs=2,
                           show_progress=False)
    assert engine.max_model_len == 64
    out = engine.generate([[5, 6, 7]], lserve.SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_weights_larger_than_memory_are_refused_before_allocating():
    """A config whose weights cannot fit the host is refused naming the size, not by a failed allocation."""
    config = _C.ModelConfig()
    config.vocab_size, config.hidden_size, config.intermediate_size = 2**20, 2**16, 2**16
    config.num_layers, config.num_qo_heads, config.num_kv_heads = 1, 512, 512
    config.max_position_embeddings = 64
    engine_config = _C.EngineConfig()
    engine_config.max_model_len = 64
    with pytest.raises(ValueError, match=r"the model's weights need \d+ bytes as float32 .* more than the \d+ "
                                         r"bytes the host has") as info:
        _C.Engine(config, engine_config)
    assert "failed to allocate" not in str(info.value)


@pytest.mark.parametrize("template", [
    "{{" + "(" * 3000 + "1" + ")" * 3000 + "}}",                          # nests past the recursion limit
    "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",                  # recurses without end
])
def test_chat_template_recursion_is_a_value_error(tmp_path, template):
    path = tmp_path / "template.gguf"
    write_tiny_llama(path, metadata={"tokenizer.chat_template": (template, VT.STRING)})
    engine = lserve.Engine(str(path), max_num_seqs=2, show_progress=False)
    with pytest.raises(ValueError, match="tokenizer.chat_template") as info:
        engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(path) in str(info.value) and "recursion limit" in str(info.value)


def test_error_names_every_culprit_once(tmp_path):
    """Two tensors of one layer shrunk: both are named, with their values, and nothing else."""
    path = tmp_path / "two.gguf"
    write_tiny_llama(path)
    blob = patch_field(path.read_bytes(), "dim", "blk.0.ffn_gate.weight", 90, occurrence=1)
    path.write_bytes(patch_field(blob, "dim", "blk.1.ffn_up.weight", 95, occurrence=1))
    with pytest.raises(ValueError) as info:
        _C.gguf_model_config_dict(_C.GgufFile(path))
    message = str(info.value)
    assert "blk.0.ffn_gate.weight (90, 64)" in message and "blk.1.ffn_up.weight (95, 64)" in message
    assert "90 or 95" in message and "blk.0.ffn_up.weight" not in message


def test_dims_are_checked_before_reading_weights(tmp_path):
    """gguf_hf_weights (the streaming loader) refuses a bad file before its first callback."""
    path = tmp_path / "bad.gguf"
    write_tiny_llama(path, skip_tensors=("blk.1.attn_v.weight",))
    file = _C.GgufFile(path)
    seen: List[str] = []
    with pytest.raises(ValueError, match=r"blk\.1\.attn_v\.weight"):
        _C.gguf_hf_weights(file, lambda name, array: seen.append(name))
    assert seen == []


@pytest.mark.parametrize("field", ["rms_norm_eps", "rope_theta"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_model_config_refuses_non_finite_epsilon_and_base(field, value):
    """ModelConfig::validate, which every loader ends in, refuses what would load into garbage."""
    config = _C.ModelConfig()
    config.vocab_size, config.hidden_size, config.intermediate_size = 40, 64, 96
    config.num_layers, config.num_qo_heads, config.num_kv_heads = 2, 4, 2
    config.validate()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=f"{field} must be finite and positive, got {value}"):
        config.validate()
