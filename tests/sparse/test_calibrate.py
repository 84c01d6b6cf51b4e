"""DuoAttention gate calibration on tiny random Llamas: the gated attention, the training loop, the TSV."""
from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lserve.calibrate import CalibrationConfig, calibrate_gates  # noqa: E402
from lserve.calibrate.data import TextPasskeyData, TokenPasskeyData, batch_samples  # noqa: E402
from lserve.calibrate.gated_attention import install_gates, streaming_mask  # noqa: E402
from lserve.sparsity import SparsityConfig, read_head_scores, write_head_scores  # noqa: E402


def _tiny_llama(seed: int = 0, num_layers: int = 2, num_heads: int = 8, num_kv_heads: int = 2):
    config = transformers.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                      num_key_value_heads=num_kv_heads, max_position_embeddings=1024)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float().eval()


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_streaming_mask_matches_formula():
    mask = streaming_mask(num_queries=3, num_keys=10, sink_tokens=2, local_tokens=3).numpy()
    expected = np.zeros((3, 10), dtype=bool)
    for row, query_pos in enumerate(range(7, 10)):
        for key_pos in range(10):
            expected[row, key_pos] = key_pos <= query_pos and (key_pos < 2 or query_pos - key_pos < 3)
    np.testing.assert_array_equal(mask, expected)


def test_gates_one_or_wide_window_equal_the_original_model():
    model = _tiny_llama(seed=1)
    input_ids = torch.randint(0, 211, (2, 97), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.model(input_ids=input_ids).last_hidden_state
        state = install_gates(model, sink_tokens=4, local_tokens=16)
        full = model.model(input_ids=input_ids).last_hidden_state
        state.gates.zero_()
        narrow = model.model(input_ids=input_ids).last_hidden_state
        state.local_tokens = 97
        wide = model.model(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wide, reference, rtol=1e-5, atol=1e-5)
    # Streaming changes nothing while every key is still inside sink + local, and something after.
    torch.testing.assert_close(narrow[:, :20], reference[:, :20], rtol=1e-5, atol=1e-5)
    assert (narrow[:, 20:] - reference[:, 20:]).abs().max() > 1e-3


def test_calibration_runs_clamps_and_lowers_the_loss(tmp_path):
    model = _tiny_llama(seed=2)
    data = TokenPasskeyData(vocab_size=211, seq_len=160)
    fixed = data.sample(random.Random(0))
    config = CalibrationConfig(seq_len=160, steps=12, lr=0.1, l1=0.5, sink_tokens=4, local_tokens=16,
                               warmup_fraction=0.0)
    result = calibrate_gates(model, lambda rng: fixed, config, show_progress=False)
    assert result.gates.shape == (2, 2)
    assert ((result.gates >= 0.0) & (result.gates <= 1.0)).all(), result.gates
    total = [d + config.l1 * r for d, r in zip(result.distill_losses, result.reg_losses)]
    assert total[-1] < total[0], total
    assert result.distill_losses[0] == pytest.approx(0.0, abs=1e-10)  # gates start at 1: the original model

    path = tmp_path / "pattern.tsv"
    write_head_scores(path, result.gates, comment=result.comment("tiny"))
    assert "seq_len=160" in path.read_text()
    np.testing.assert_allclose(read_head_scores(path), result.gates, atol=1e-6)
    cfg = SparsityConfig.preset("lserve", head_pattern=str(path), streaming_fraction=0.5)
    mask = np.array(cfg.streaming_mask(num_layers=2, num_kv_heads=2))
    lowest = np.argsort(result.gates.reshape(-1), kind="stable")[:2]
    expected = np.zeros(4, dtype=bool)
    expected[lowest] = True
    np.testing.assert_array_equal(mask.reshape(-1), expected)


def test_a_head_that_matters_keeps_a_higher_gate():
    # KV head 0 attends uniformly (zero queries) over values that matter: streaming it changes the
    # output. KV head 1 has zero values: streaming it changes nothing, so only L1 acts on its gate.
    model = _tiny_llama(seed=3, num_layers=1, num_heads=4, num_kv_heads=2)
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim
    with torch.no_grad():
        attn.q_proj.weight[: 2 * head_dim].zero_()
        attn.v_proj.weight[head_dim:].zero_()
    data = TokenPasskeyData(vocab_size=211, seq_len=128)
    config = CalibrationConfig(seq_len=128, steps=25, lr=0.08, l1=0.02, sink_tokens=2, local_tokens=8,
                               warmup_fraction=0.0)
    result = calibrate_gates(model, data.sample, config, show_progress=False)
    assert result.gates[0, 1] < 0.05, result.gates
    assert result.gates[0, 0] > result.gates[0, 1] + 0.3, result.gates


def test_token_passkey_samples_are_seeded_and_labelled():
    data = TokenPasskeyData(vocab_size=211, seq_len=100, key_tokens=4)
    first, again = data.sample(random.Random(5)), data.sample(random.Random(5))
    assert first == again
    assert len(first.input_ids) == 100 and len(first.label_mask) == 100
    labelled = [i for i, flag in enumerate(first.label_mask) if flag]
    assert labelled == [95, 96, 97, 98]  # the hidden states that predict the 4 answer tokens
    answer = first.input_ids[96:]
    needle_at = first.input_ids.index(3)
    assert first.input_ids[needle_at + 1: needle_at + 5] == answer
    input_ids, label_mask = batch_samples([first, again])
    assert input_ids.shape == (2, 100) and label_mask.sum() == 8


class _CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_text_passkey_samples_have_the_exact_length_and_the_answer_in_the_context():
    data = TextPasskeyData(_CharTokenizer(), seq_len=2000, num_passkeys=3, bos_token_id=1)
    sample = data.sample(random.Random(7))
    assert len(sample.input_ids) == 2000 and sample.input_ids[0] == 1
    text = "".join(chr(t) for t in sample.input_ids[1:])
    first_label = sample.label_mask.index(True)
    answer = text[first_label:]
    keys = answer.strip(" .").split(", ")
    assert len(keys) == 3 and all(k.isdigit() and 5 <= len(k) <= 7 for k in keys)
    for key in keys:
        assert f"is {key}." in text[:first_label]
    assert sample == data.sample(random.Random(7))


def test_the_shipped_smollm2_pattern_is_found_and_well_formed(tmp_path):
    from lserve.sparsity import default_head_pattern

    names = ["smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
             "/somewhere/SmolLM2-135M-Instruct.Q4_1.gguf"]
    paths = {default_head_pattern(name) for name in names}
    assert len(paths) == 1
    path = paths.pop()
    assert path is not None and path.name == "smollm2-135m-instruct.tsv" and path.is_file()
    hf_dir = tmp_path / "model"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}')
    assert default_head_pattern(str(hf_dir)) == path
    assert default_head_pattern("some-other-model") is None and default_head_pattern(None) is None

    scores = read_head_scores(path)
    assert scores.shape == (30, 3)  # SmolLM2-135M: 30 layers, 3 KV heads
    assert ((scores >= 0) & (scores <= 1)).all() and scores.std() > 0.2
    cfg = SparsityConfig.preset("lserve", model="smollm2-135m-instruct")
    assert np.array(cfg.streaming_mask(30, 3)).sum() == 45
    explicit = SparsityConfig.preset("lserve", model="smollm2-135m-instruct", streaming_heads=[[]] * 30)
    assert not np.array(explicit.streaming_mask(30, 3)).any()
    with pytest.raises(ValueError, match="lserve calibrate"):  # streaming asked for, no pattern known
        SparsityConfig.preset("lserve").streaming_mask(30, 3)
