"""Without a usable GPU (CI: no driver, no GPU, no cuBLAS), lserve still imports and asking for CUDA
fails with a clear ValueError, whether or not this build has the CUDA backend."""
from __future__ import annotations

import pytest

from lserve import _C


def _gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture
def no_gpu():
    if _gpu_present():
        pytest.skip("a GPU is present: the device suite (tests/cuda) covers it")


def test_backend_cuda_raises(no_gpu):
    with pytest.raises(ValueError, match="CUDA"):
        _C.Backend("cuda")


def test_engine_cuda_raises(no_gpu, tmp_path):
    import json

    from lserve import Engine

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="CUDA|cuda"):
        Engine(str(tmp_path), device="cuda", load_format="dummy", show_progress=False)


def test_bad_device_names():
    with pytest.raises(ValueError, match="device"):
        _C.Backend("cuda:x")
    with pytest.raises(ValueError, match="unknown device"):
        _C.Backend("tpu")


def test_cpu_backend_stages_low_precision_activations():
    """The CPU reference computes in float32: bf16 activations are upcast, results rounded once."""
    import numpy as np

    torch = pytest.importorskip("torch")
    backend = _C.Backend("cpu")
    x = torch.randn(5, 33).to(torch.bfloat16)
    weight = (1.0 + 0.1 * torch.randn(33)).float()
    out = torch.full((5, 33), float("nan"), dtype=torch.bfloat16)
    backend.rms_norm(x, None, weight, out, 1e-6)
    expected = np.zeros((5, 33), np.float32)
    backend.rms_norm(x.float().numpy(), None, weight.numpy(), expected, 1e-6)
    assert torch.equal(out, torch.from_numpy(expected).to(torch.bfloat16))
    qkv = torch.randn(3, 4 * 8).to(torch.bfloat16)
    strided = qkv[:, :16]  # rows strided like the model's query view into q|k|v
    result = torch.full((3, 8), float("nan"), dtype=torch.bfloat16)
    w = torch.randn(8, 16).to(torch.bfloat16)
    backend.gemm(strided, w, None, result)
    reference = np.zeros((3, 8), np.float32)
    backend.gemm(strided.float().numpy(), w, None, reference)
    assert torch.equal(result, torch.from_numpy(reference).to(torch.bfloat16))
