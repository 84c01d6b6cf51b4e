"""From a model name to a configured core engine: config, tokenizer and a weight stream.

load_model_source() resolves the model (lserve.models), reads its architecture into a ModelSpec
(GGUF metadata through _C.gguf_model_config_dict, or config.json through lserve.loader.hf) and its
tokenizer, and returns a ModelSource whose load_weights() feeds every tensor, under its Hugging
Face name, into lserve._C.Engine.load_weight with a progress bar. Names and shapes are checked
before any tensor data is read: a bad checkpoint fails fast, naming the culprit.

Example:
    >>> source = load_model_source("model_dir")          # or a .gguf file, or "smollm2-135m-instruct"
    >>> core = _C.Engine(source.model_config, engine_config)
    >>> source.load_weights(core); core.finalize()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np

from lserve import _C
from lserve.loader.spec import ModelSpec, core_model_config
from lserve.progress import progress_bar

WeightSink = Callable[[str, np.ndarray], None]  # (Hugging Face name, array)
LOAD_FORMATS = ("auto", "dummy")


@dataclass
class ModelSource:
    """A resolved model, ready to build a core engine from.

    spec:          the architecture (ModelConfig fields, every EOS id, sliding window).
    model_config:  spec.fields as the C++ ModelConfig.
    tokenizer:     a lserve.tokenizer.Tokenizer, or None (an HF directory without tokenizer files).
    eos_token_ids: the ids that end a sequence (the config's, then the tokenizer's EOS).
    num_weights:   how many tensors feed_weights delivers (for the progress bar).
    feed_weights:  (seed, sink) -> None; calls sink(hf_name, array) once per weight.
    load_stored:   GGUF only: (core, on_tensor) -> None loads every weight as stored (q4_1 blocks
                   as q4_1) into a core engine with native weights, calling on_tensor(hf_name);
                   None for dummy weights (float32 arrays, which native weights keep as float32).
    is_gguf:       the model is a GGUF file.
    """

    spec: ModelSpec
    model_config: "_C.ModelConfig"
    tokenizer: Optional[object]
    eos_token_ids: List[int]
    num_weights: int
    feed_weights: Callable[[int, WeightSink], None]
    load_stored: Optional[Callable[["_C.Engine", Callable[[str], None]], None]] = None
    is_gguf: bool = False

    @property
    def max_model_len(self) -> int:
        """The longest sequence the engine serves exactly (context length, capped by a sliding window)."""
        return self.spec.max_model_len

    def load_weights(self, core: "_C.Engine", seed: int = 0, show_progress: bool = True,
                     as_stored: bool = False) -> None:
        """Feeds every weight into `core`; as_stored (a GGUF into an engine with dtype 'native')
        hands over the stored blocks instead of float32 arrays where the source has them."""
        with progress_bar(total=self.num_weights, desc="Loading weights", enabled=show_progress,
                          unit="tensor") as bar:
            if as_stored and self.load_stored is not None:
                self.load_stored(core, lambda name: bar.update(1))
                return

            def sink(name: str, array: np.ndarray) -> None:
                core.load_weight(name, np.ascontiguousarray(array))
                bar.update(1)

            self.feed_weights(seed, sink)


def load_model_source(model: str, load_format: str = "auto", tokenizer: Optional[str] = None) -> ModelSource:
    """Resolves `model` (a registered name, a .gguf file or a Hugging Face directory) and reads its
    config and tokenizer; `tokenizer` names a Hugging Face directory whose tokenizer replaces the
    model's. load_format "dummy" draws random weights of the model's shapes instead of reading them.

    Raises ValueError naming the problem: an unknown model, an unsupported architecture or tensor
    type, a corrupt file, missing or unexpected tensors.
    """
    from lserve.loader.dummy import dummy_weights
    from lserve.loader.hf import expected_weight_shapes
    from lserve.models import resolve_model

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    resolved = resolve_model(model)
    load_stored = None
    if resolved.kind == "gguf":
        spec, tok, read_weights, load_stored = _gguf_source(str(resolved.path), tokenizer)
    else:
        spec, tok, read_weights = _hf_source(resolved.path, tokenizer)

    eos_ids = list(spec.eos_token_ids)
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
        eos_ids.append(tok.eos_token_id)

    def feed_weights(seed: int, sink: WeightSink) -> None:
        if load_format == "dummy":
            _feed(dummy_weights(spec, seed), sink)
        else:
            read_weights(sink)

    return ModelSource(spec, core_model_config(spec.fields), tok, eos_ids, len(expected_weight_shapes(spec)),
                       feed_weights, None if load_format == "dummy" else load_stored, resolved.kind == "gguf")


def _gguf_source(path: str, tokenizer: Optional[str]):
    from lserve.tokenizer import Tokenizer

    gguf = _C.GgufFile(path)
    fields = _C.gguf_model_config_dict(gguf)
    eos = (fields["eos_token_id"],) if fields["eos_token_id"] >= 0 else ()
    try:
        spec = ModelSpec(fields, eos)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    tok = Tokenizer.from_pretrained(tokenizer) if tokenizer else Tokenizer.from_gguf(gguf)

    def read_weights(sink: WeightSink) -> None:
        # Every name, shape and tensor type is checked before the first tensor is read.
        _C.gguf_hf_weights(gguf, sink)

    def load_stored(core: "_C.Engine", on_tensor: Callable[[str], None]) -> None:
        _C.gguf_load_stored_weights(gguf, core, on_tensor)

    return spec, tok, read_weights, load_stored


def _hf_source(model_dir, tokenizer: Optional[str]):
    from lserve.loader.hf import iter_hf_weights, load_hf_config
    from lserve.tokenizer import Tokenizer

    spec = load_hf_config(model_dir)
    if tokenizer:
        tok = Tokenizer.from_pretrained(tokenizer)
    elif (model_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_pretrained(model_dir)
    else:
        tok = None  # token ids in, token ids out

    def read_weights(sink: WeightSink) -> None:
        _feed(iter_hf_weights(model_dir, spec), sink)

    return spec, tok, read_weights


def _feed(weights: Iterable[Tuple[str, np.ndarray]], sink: WeightSink) -> None:
    for name, array in weights:
        sink(name, array)
