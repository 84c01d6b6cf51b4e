"""DuoAttention gate calibration: find the KV heads that need full attention.

Loss = MSE between the final hidden states of the gated model and of the original model, at the
positions that predict the passkey answer, + l1 * mean(|gates|). Only the gates train (Adam), and
they are clamped to [0, 1] after every step. Retrieval heads keep gates near 1; heads that streaming
serves as well as full attention are pushed to 0 by the L1 term.
Reference: DuoAttention (arXiv 2410.10819), section 3.2; lserve.sparsity reads the result.

Example:
    >>> result = calibrate("smollm2-135m-instruct", CalibrationConfig(seq_len=1024, steps=50))
    >>> result.gates.shape  # (num_layers, num_kv_heads)
    (30, 3)
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np

# What calibration imports: torch and transformers, and gguf for transformers to read a .gguf model.
CALIBRATE_MODULES = ("torch", "transformers", "gguf")


@dataclass
class CalibrationConfig:
    """seq_len: tokens per sample; steps: optimiser steps; lr: Adam learning rate of the gates;
    l1: weight of mean(|gates|); sink_tokens/local_tokens: the streaming window the gates trade
    against; num_passkeys: needles per sample; batch_size: samples per step; warmup_fraction:
    share of the steps with a linearly rising learning rate (then a cosine decay to 10%)."""

    seq_len: int = 1024
    steps: int = 100
    lr: float = 0.02
    l1: float = 0.05
    sink_tokens: int = 64
    local_tokens: int = 256
    num_passkeys: int = 4
    batch_size: int = 1
    warmup_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, minimum in (("seq_len", 16), ("steps", 1), ("sink_tokens", 0), ("local_tokens", 1),
                              ("num_passkeys", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.l1, (int, float)) and self.l1 >= 0):
            raise ValueError(f"l1 must be >= 0, got {self.l1!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.sink_tokens + self.local_tokens >= self.seq_len:
            raise ValueError(f"sink_tokens + local_tokens ({self.sink_tokens} + {self.local_tokens}) must be below "
                             f"seq_len {self.seq_len}, or streaming attention equals full attention")

    def lr_scale(self, step: int) -> float:
        """Multiplier of lr at `step` (0-based): linear warm-up, then cosine decay to 0.1."""
        warmup = int(self.warmup_fraction * self.steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class CalibrationResult:
    gates: np.ndarray  # (num_layers, num_kv_heads) in [0, 1]
    distill_losses: List[float] = field(default_factory=list)  # (steps,)
    reg_losses: List[float] = field(default_factory=list)  # (steps,)
    seconds: float = 0.0
    config: Optional[CalibrationConfig] = None

    def comment(self, model: str = "") -> str:
        """The settings and the outcome, for the TSV header."""
        settings = ", ".join(f"{k}={v}" for k, v in asdict(self.config).items()) if self.config else ""
        tail = (f"distill loss {self.distill_losses[0]:.4g} -> {self.distill_losses[-1]:.4g}"
                if self.distill_losses else "")
        lines = ["DuoAttention gates calibrated by `lserve calibrate`"]
        if model:
            lines.append(f"model: {model}")
        lines.append(settings)
        lines.append(f"{len(self.distill_losses)} steps in {self.seconds:.0f} s; {tail}")
        return "\n".join(line for line in lines if line)


def calibrate_gates(model, sample_fn: Callable[[random.Random], object], config: CalibrationConfig,
                    show_progress: bool = True, on_step: Optional[Callable[[int, float, float], None]] = None
                    ) -> CalibrationResult:
    """Trains DuoAttention gates on a Hugging Face causal LM (modified in place: frozen, gated).

    sample_fn(rng) -> PasskeySample draws one training sample. Returns the clamped gates and the
    per-step losses.
    """
    import torch

    from lserve.calibrate.data import batch_samples
    from lserve.calibrate.gated_attention import install_gates
    from lserve.progress import progress_bar

    device = torch.device(config.device)
    dtype = torch.float32 if config.dtype == "float32" else torch.bfloat16
    model.to(device=device, dtype=dtype)
    model.eval()
    state = install_gates(model, config.sink_tokens, config.local_tokens)
    state.gates.data = state.gates.data.to(device)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    optimizer = torch.optim.Adam([state.gates], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_scale)
    rng = random.Random(config.seed)
    result = CalibrationResult(gates=np.zeros(0), config=config)
    start = time.perf_counter()
    with progress_bar(config.steps, "calibrate", enabled=show_progress, unit="step") as bar:
        for step in range(config.steps):
            input_ids, label_mask = batch_samples([sample_fn(rng) for _ in range(config.batch_size)])
            input_ids, label_mask = input_ids.to(device), label_mask.to(device)
            state.mode = "full"
            with torch.no_grad():
                reference = base(input_ids=input_ids).last_hidden_state[label_mask].float()
            state.mode = "gated"
            hidden = base(input_ids=input_ids).last_hidden_state[label_mask].float()
            distill = (hidden - reference).pow(2).mean()
            reg = state.gates.abs().mean()
            loss = distill + config.l1 * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state.clamp_()
            result.distill_losses.append(float(distill.detach()))
            result.reg_losses.append(float(reg.detach()))
            if on_step is not None:
                on_step(step, result.distill_losses[-1], result.reg_losses[-1])
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(distill=f"{result.distill_losses[-1]:.4g}", gates=f"{result.reg_losses[-1]:.3f}")
            bar.update(1)
    result.seconds = time.perf_counter() - start
    result.gates = state.gates.detach().float().cpu().numpy().astype(np.float64)
    return result


def load_hf_model(model: str, dtype: str = "float32"):
    """(causal LM, tokenizer or None) with transformers, from an lserve model name, a .gguf file
    or a Hugging Face directory."""
    import os

    import torch
    import transformers

    from lserve.models import resolve_model

    resolved = resolve_model(model)
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    if resolved.kind == "gguf":
        directory, name = os.path.dirname(str(resolved.path)), os.path.basename(str(resolved.path))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch_dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        return hf_model, tokenizer
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch_dtype)
    tokenizer = None
    if os.path.exists(os.path.join(str(resolved.path), "tokenizer.json")) or \
            os.path.exists(os.path.join(str(resolved.path), "tokenizer_config.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolved.path))
    return hf_model, tokenizer


def sampler_for(model, tokenizer, config: CalibrationConfig):
    """The passkey sampler for a model: text through its tokenizer, else raw token ids."""
    from lserve.calibrate.data import TextPasskeyData, TokenPasskeyData

    if tokenizer is None:
        return TokenPasskeyData(model.config.vocab_size, config.seq_len).sample
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    data = TextPasskeyData(tokenizer, config.seq_len, config.num_passkeys,
                           bos_token_id=prefix[0] if prefix else None)
    return data.sample


def calibrate(model: str, config: CalibrationConfig, show_progress: bool = True) -> CalibrationResult:
    """Loads `model` with transformers and calibrates its gates (see calibrate_gates). Needs the
    `calibrate` extra (MissingExtraError before anything loads when it is not installed)."""
    from lserve.extras import require_extra

    require_extra("calibrate", "lserve calibrate", CALIBRATE_MODULES)
    import torch

    torch.manual_seed(config.seed)
    hf_model, tokenizer = load_hf_model(model, config.dtype)
    return calibrate_gates(hf_model, sampler_for(hf_model, tokenizer, config), config, show_progress)
