"""
lserve C++ core
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['Backend', 'Engine', 'EngineConfig', 'EngineStats', 'Error', 'GgufFile', 'KvCacheManager', 'ModelConfig', 'OPS', 'PagePool', 'PageSelector', 'RopeScaling', 'SamplingParams', 'SparsityConfig', 'StepOutput', 'Support', 'TokenLogprob', 'cpu_isa', 'cpu_isas', 'gguf_hf_weights', 'gguf_load_stored_weights', 'gguf_model_config_dict', 'has_cuda_backend', 'rope_cos_sin_cache', 'rope_frequencies', 'sample_workspace_bytes', 'weight_shapes']
class Error(ValueError):
    pass
class PagePool:
    """
    Fixed pool of KV pages with reference counts; LIFO free list.
    """
    def __init__(self, num_pages: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def allocate(self) -> int:
        """
        A free page with reference count 1, or -1 when none is left.
        """
    def decref(self, page_idx: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Drops one reference; the page returns to the free list at zero.
        """
    def incref(self, page_idx: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def is_cached(self, page_idx: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def num_cached(self) -> int:
        ...
    def num_evictable(self) -> int:
        ...
    def num_evictions(self) -> int:
        ...
    def num_free(self) -> int:
        ...
    def num_pages(self) -> int:
        ...
    def refcount(self, page_idx: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
class KvCacheManager:
    """
    Per-sequence page tables over a PagePool, sized in tokens.
    
    Example: kv = KvCacheManager(num_pages=8, page_size=16); kv.reserve(0, 20);
    kv.pages(0) == [0, 1]; kv.slot(0, 17) == 1 * 16 + 1
    """
    def __init__(self, num_pages: typing.SupportsInt | typing.SupportsIndex, page_size: typing.SupportsInt | typing.SupportsIndex, enable_prefix_caching: bool = False, prefix_cache_salt: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        ...
    def cache_full_pages(self, seq_id: typing.SupportsInt | typing.SupportsIndex, tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], num_computed: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Names seq_id's pages that its first num_computed tokens fill, so later sequences can find them.
        """
    def fork(self, src_seq_id: typing.SupportsInt | typing.SupportsIndex, dst_seq_id: typing.SupportsInt | typing.SupportsIndex, num_tokens: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        New sequence dst shares the pages that src's first num_tokens tokens fill completely.
        """
    def has(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def match_prefix(self, seq_id: typing.SupportsInt | typing.SupportsIndex, tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], max_tokens: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        A new sequence takes the longest cached run of full pages of tokens[:max_tokens]; returns the tokens mapped (0: nothing, and no table).
        """
    def num_free_pages(self) -> int:
        ...
    def num_seqs(self) -> int:
        ...
    def num_total_pages(self) -> int:
        ...
    def page_size(self) -> int:
        ...
    def pages(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> list[int]:
        """
        seq_id's pages in token order, as a new list (empty for an unknown sequence).
        """
    def pages_needed(self, seq_id: typing.SupportsInt | typing.SupportsIndex, num_tokens: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        Pages seq_id still needs to hold num_tokens tokens (0 if it has them).
        """
    def pool(self) -> PagePool:
        """
        A snapshot of the underlying PagePool (refcounts, free count).
        """
    def prefix_caching(self) -> bool:
        ...
    def release(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Releases every page of seq_id (no-op for an unknown sequence).
        """
    def reserve(self, seq_id: typing.SupportsInt | typing.SupportsIndex, num_tokens: typing.SupportsInt | typing.SupportsIndex) -> bool:
        """
        Grows seq_id's page table to hold num_tokens tokens; False (and no change) when the pool has too few free pages.
        """
    def reset_prefix_cache(self) -> None:
        ...
    def slot(self, seq_id: typing.SupportsInt | typing.SupportsIndex, position: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        Cache slot of token `position`: page_idx * page_size + position % page_size.
        """
class SamplingParams:
    """
    vLLM-style sampling parameters (lserve/sampling.h); the constructor validates, raising ValueError that names the field, its value and the rule.
    """
    def __init__(self, *, temperature: typing.Any = 1.0, top_p: typing.Any = 1.0, top_k: typing.Any = 0, min_p: typing.Any = 0.0, repetition_penalty: typing.Any = 1.0, presence_penalty: typing.Any = 0.0, frequency_penalty: typing.Any = 0.0, max_tokens: typing.Any = 16, min_tokens: typing.Any = 0, stop_token_ids: typing.Any = [], ignore_eos: typing.Any = False, logprobs: typing.Any = None, seed: typing.Any = None) -> None:
        ...
    def __repr__(self) -> str:
        ...
    def validate(self) -> None:
        """
        Raises ValueError naming the parameter, its value and its range.
        """
    def validate_for_model(self, vocab_size: typing.SupportsInt | typing.SupportsIndex, eos_token_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = []) -> None:
        """
        validate(), and that min_tokens masking leaves some token of the vocabulary to sample.
        """
    @property
    def frequency_penalty(self) -> float:
        ...
    @frequency_penalty.setter
    def frequency_penalty(self, arg1: typing.Any) -> None:
        ...
    @property
    def ignore_eos(self) -> bool:
        ...
    @ignore_eos.setter
    def ignore_eos(self, arg1: typing.Any) -> None:
        ...
    @property
    def logprobs(self) -> int | None:
        ...
    @logprobs.setter
    def logprobs(self, arg1: typing.Any) -> None:
        ...
    @property
    def max_tokens(self) -> int:
        ...
    @max_tokens.setter
    def max_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def min_p(self) -> float:
        ...
    @min_p.setter
    def min_p(self, arg1: typing.Any) -> None:
        ...
    @property
    def min_tokens(self) -> int:
        ...
    @min_tokens.setter
    def min_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def presence_penalty(self) -> float:
        ...
    @presence_penalty.setter
    def presence_penalty(self, arg1: typing.Any) -> None:
        ...
    @property
    def repetition_penalty(self) -> float:
        ...
    @repetition_penalty.setter
    def repetition_penalty(self, arg1: typing.Any) -> None:
        ...
    @property
    def seed(self) -> int | None:
        ...
    @seed.setter
    def seed(self, arg1: typing.Any) -> None:
        ...
    @property
    def stop_token_ids(self) -> list[int]:
        ...
    @stop_token_ids.setter
    def stop_token_ids(self, arg1: typing.Any) -> None:
        ...
    @property
    def temperature(self) -> float:
        ...
    @temperature.setter
    def temperature(self, arg1: typing.Any) -> None:
        ...
    @property
    def top_k(self) -> int:
        ...
    @top_k.setter
    def top_k(self, arg1: typing.Any) -> None:
        ...
    @property
    def top_p(self) -> float:
        ...
    @top_p.setter
    def top_p(self, arg1: typing.Any) -> None:
        ...
class GgufFile:
    """
    A GGUF file, memory-mapped read-only; raises ValueError on corrupt input.
    """
    def __contains__(self, key: str) -> bool:
        ...
    def __init__(self, path: typing.Any) -> None:
        ...
    def get(self, key: str) -> typing.Any:
        """
        The value of a metadata key (arrays as lists); ValueError when missing.
        """
    def has_key(self, key: str) -> bool:
        ...
    def keys(self) -> list[str]:
        """
        Metadata keys in file order.
        """
    def read_f32(self, name: str) -> numpy.typing.NDArray[numpy.float32]:
        """
        Dequantised float32 numpy array of the tensor's shape.
        """
    def tensor_info(self, name: str) -> dict:
        """
        {name, shape (row-major), type, type_name, offset (absolute), nbytes}.
        """
    def tensor_names(self) -> list[str]:
        ...
    def value_type(self, key: str) -> tuple[str, str]:
        """
        (type, item type) names, e.g. ('array', 'string').
        """
    @property
    def alignment(self) -> int:
        ...
    @property
    def data_offset(self) -> int:
        ...
    @property
    def path(self) -> str:
        ...
    @property
    def version(self) -> int:
        ...
class SparsityConfig:
    """
    LServe sparse attention settings (lserve/sparsity.h); setters refuse values of the wrong kind and validate() the rest, raising ValueError naming the field.
    """
    group_score: str
    page_score: str
    def __init__(self) -> None:
        ...
    @typing.overload
    def validate(self) -> None:
        """
        The settings alone; raises ValueError naming the field, its value and the rule.
        """
    @typing.overload
    def validate(self, num_layers: typing.SupportsInt | typing.SupportsIndex, num_kv_heads: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        validate(), and streaming_heads against the model's shape (when enabled).
        """
    @property
    def always_select_sink_page(self) -> bool:
        ...
    @always_select_sink_page.setter
    def always_select_sink_page(self, arg1: typing.Any) -> None:
        ...
    @property
    def decode_local_tokens(self) -> int:
        ...
    @decode_local_tokens.setter
    def decode_local_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def decode_sink_tokens(self) -> int:
        ...
    @decode_sink_tokens.setter
    def decode_sink_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def decode_token_budget(self) -> int:
        ...
    @decode_token_budget.setter
    def decode_token_budget(self, arg1: typing.Any) -> None:
        ...
    @property
    def dense_below_tokens(self) -> int:
        ...
    @dense_below_tokens.setter
    def dense_below_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def enabled(self) -> bool:
        ...
    @enabled.setter
    def enabled(self, arg1: typing.Any) -> None:
        ...
    @property
    def forced_pages(self) -> int:
        """
        Pages every selection holds whatever the scores: the pages of the newest select_recent_tokens (at least one) and, with always_select_sink_page, page 0.
        """
    @property
    def head_token_budgets(self) -> list[int]:
        """
        Per-head decode budgets in tokens, num_layers * num_kv_heads layer-major (streaming heads' entries ignored); empty: decode_token_budget for every dense head.
        """
    @head_token_budgets.setter
    def head_token_budgets(self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    @property
    def logical_page_size(self) -> int:
        ...
    @logical_page_size.setter
    def logical_page_size(self, arg1: typing.Any) -> None:
        ...
    @property
    def page_score_spread(self) -> float:
        ...
    @page_score_spread.setter
    def page_score_spread(self, arg1: typing.Any) -> None:
        ...
    @property
    def physical_page_size(self) -> int:
        ...
    @physical_page_size.setter
    def physical_page_size(self, arg1: typing.Any) -> None:
        ...
    @property
    def prefill_local_tokens(self) -> int:
        ...
    @prefill_local_tokens.setter
    def prefill_local_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def prefill_sink_tokens(self) -> int:
        ...
    @prefill_sink_tokens.setter
    def prefill_sink_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def select_recent_tokens(self) -> int:
        ...
    @select_recent_tokens.setter
    def select_recent_tokens(self, arg1: typing.Any) -> None:
        ...
    @property
    def selection_reuse_interval(self) -> int:
        ...
    @selection_reuse_interval.setter
    def selection_reuse_interval(self, arg1: typing.Any) -> None:
        ...
    @property
    def streaming_heads(self) -> list[int]:
        ...
    @streaming_heads.setter
    def streaming_heads(self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
class PageSelector:
    """
    The sparse-attention state owner (kv/page_selector.h), bound for tests of its policy.
    """
    def __init__(self, sparsity: SparsityConfig, page_size: typing.SupportsInt | typing.SupportsIndex, max_num_seqs: typing.SupportsInt | typing.SupportsIndex, max_num_batched_tokens: typing.SupportsInt | typing.SupportsIndex, max_model_len: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def acquire(self, seq_id: typing.SupportsInt | typing.SupportsIndex, prefill_tokens: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def commit(self) -> None:
        ...
    def has(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def plan_chunk(self, seq_id: typing.SupportsInt | typing.SupportsIndex, start_position: typing.SupportsInt | typing.SupportsIndex, num_new_tokens: typing.SupportsInt | typing.SupportsIndex, num_pages: typing.SupportsInt | typing.SupportsIndex, samples: bool) -> dict:
        """
        One chunk's plan (what Engine::step appends to the step's SparsePlan), as a dict.
        """
    def release(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def size_memory(self, budget: typing.SupportsInt | typing.SupportsIndex, stream_bytes_per_token: typing.SupportsInt | typing.SupportsIndex, dense_bytes_per_token: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def slot_of(self, seq_id: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    @property
    def decode_ring_pages(self) -> int:
        ...
    @property
    def decode_slot_tokens(self) -> int:
        ...
    @property
    def num_free_prefill_rings(self) -> int:
        ...
    @property
    def num_free_slots(self) -> int:
        ...
    @property
    def num_prefill_rings(self) -> int:
        ...
    @property
    def num_select(self) -> int:
        ...
    @property
    def num_sink_pages(self) -> int:
        ...
    @property
    def num_slots(self) -> int:
        ...
    @property
    def num_stream_pages(self) -> int:
        ...
    @property
    def prefill_ring_pages(self) -> int:
        ...
    @property
    def slot_pages(self) -> int:
        ...
class RopeScaling:
    def __init__(self) -> None:
        ...
    @property
    def attention_factor(self) -> float:
        ...
    @attention_factor.setter
    def attention_factor(self, arg1: typing.Any) -> None:
        ...
    @property
    def beta_fast(self) -> float:
        ...
    @beta_fast.setter
    def beta_fast(self, arg1: typing.Any) -> None:
        ...
    @property
    def beta_slow(self) -> float:
        ...
    @beta_slow.setter
    def beta_slow(self, arg1: typing.Any) -> None:
        ...
    @property
    def factor(self) -> float:
        ...
    @factor.setter
    def factor(self, arg1: typing.Any) -> None:
        ...
    @property
    def high_freq_factor(self) -> float:
        ...
    @high_freq_factor.setter
    def high_freq_factor(self, arg1: typing.Any) -> None:
        ...
    @property
    def low_freq_factor(self) -> float:
        ...
    @low_freq_factor.setter
    def low_freq_factor(self, arg1: typing.Any) -> None:
        ...
    @property
    def mscale(self) -> float:
        ...
    @mscale.setter
    def mscale(self, arg1: typing.Any) -> None:
        ...
    @property
    def mscale_all_dim(self) -> float:
        ...
    @mscale_all_dim.setter
    def mscale_all_dim(self, arg1: typing.Any) -> None:
        ...
    @property
    def original_max_position_embeddings(self) -> int:
        ...
    @original_max_position_embeddings.setter
    def original_max_position_embeddings(self, arg1: typing.Any) -> None:
        ...
    @property
    def rope_type(self) -> str:
        ...
    @rope_type.setter
    def rope_type(self, arg1: typing.Any) -> None:
        ...
    @property
    def truncate(self) -> bool:
        ...
    @truncate.setter
    def truncate(self, arg1: typing.Any) -> None:
        ...
class ModelConfig:
    rope_scaling: RopeScaling
    def __init__(self) -> None:
        ...
    def validate(self) -> None:
        """
        Derives head_dim (0: hidden_size / num_qo_heads) and checks every field; ValueError names it.
        """
    @property
    def architecture(self) -> str:
        ...
    @architecture.setter
    def architecture(self, arg1: typing.Any) -> None:
        ...
    @property
    def attention_bias(self) -> bool:
        ...
    @attention_bias.setter
    def attention_bias(self, arg1: typing.Any) -> None:
        ...
    @property
    def bos_token_id(self) -> int:
        ...
    @bos_token_id.setter
    def bos_token_id(self, arg1: typing.Any) -> None:
        ...
    @property
    def eos_token_id(self) -> int:
        ...
    @eos_token_id.setter
    def eos_token_id(self, arg1: typing.Any) -> None:
        ...
    @property
    def head_dim(self) -> int:
        ...
    @head_dim.setter
    def head_dim(self, arg1: typing.Any) -> None:
        ...
    @property
    def hidden_size(self) -> int:
        ...
    @hidden_size.setter
    def hidden_size(self, arg1: typing.Any) -> None:
        ...
    @property
    def intermediate_size(self) -> int:
        ...
    @intermediate_size.setter
    def intermediate_size(self, arg1: typing.Any) -> None:
        ...
    @property
    def max_position_embeddings(self) -> int:
        ...
    @max_position_embeddings.setter
    def max_position_embeddings(self, arg1: typing.Any) -> None:
        ...
    @property
    def num_kv_heads(self) -> int:
        ...
    @num_kv_heads.setter
    def num_kv_heads(self, arg1: typing.Any) -> None:
        ...
    @property
    def num_layers(self) -> int:
        ...
    @num_layers.setter
    def num_layers(self, arg1: typing.Any) -> None:
        ...
    @property
    def num_qo_heads(self) -> int:
        ...
    @num_qo_heads.setter
    def num_qo_heads(self, arg1: typing.Any) -> None:
        ...
    @property
    def partial_rotary_factor(self) -> float:
        ...
    @partial_rotary_factor.setter
    def partial_rotary_factor(self, arg1: typing.Any) -> None:
        ...
    @property
    def rms_norm_eps(self) -> float:
        ...
    @rms_norm_eps.setter
    def rms_norm_eps(self, arg1: typing.Any) -> None:
        ...
    @property
    def rope_theta(self) -> float:
        ...
    @rope_theta.setter
    def rope_theta(self, arg1: typing.Any) -> None:
        ...
    @property
    def tie_word_embeddings(self) -> bool:
        ...
    @tie_word_embeddings.setter
    def tie_word_embeddings(self, arg1: typing.Any) -> None:
        ...
    @property
    def vocab_size(self) -> int:
        ...
    @vocab_size.setter
    def vocab_size(self, arg1: typing.Any) -> None:
        ...
class EngineConfig:
    capture_logits: bool
    device: str
    dtype: str
    enable_prefix_caching: bool
    enforce_eager: bool
    kv_cache_dtype: str
    sparsity: SparsityConfig
    def __init__(self) -> None:
        ...
    def validate(self) -> None:
        ...
    @property
    def eos_token_ids(self) -> list[int]:
        ...
    @eos_token_ids.setter
    def eos_token_ids(self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    @property
    def gpu_memory_utilization(self) -> float:
        ...
    @gpu_memory_utilization.setter
    def gpu_memory_utilization(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def kv_cache_memory(self) -> int:
        ...
    @kv_cache_memory.setter
    def kv_cache_memory(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def max_model_len(self) -> int:
        ...
    @max_model_len.setter
    def max_model_len(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def max_num_batched_tokens(self) -> int:
        ...
    @max_num_batched_tokens.setter
    def max_num_batched_tokens(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def max_num_seqs(self) -> int:
        ...
    @max_num_seqs.setter
    def max_num_seqs(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_kv_pages(self) -> int:
        ...
    @num_kv_pages.setter
    def num_kv_pages(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_threads(self) -> int:
        ...
    @num_threads.setter
    def num_threads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def page_size(self) -> int:
        ...
    @page_size.setter
    def page_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def seed(self) -> int:
        ...
    @seed.setter
    def seed(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
class TokenLogprob:
    @property
    def logprob(self) -> float:
        ...
    @property
    def top_logprobs(self) -> list[tuple[int, float]]:
        ...
class StepOutput:
    @property
    def error(self) -> str:
        ...
    @property
    def finish_reason(self) -> str:
        ...
    @property
    def finished(self) -> bool:
        ...
    @property
    def logits(self) -> typing.Any:
        ...
    @property
    def new_logprobs(self) -> list[TokenLogprob]:
        ...
    @property
    def new_token_ids(self) -> list[int]:
        ...
    @property
    def num_cached_tokens(self) -> int:
        ...
    @property
    def num_output_tokens(self) -> int:
        ...
    @property
    def num_prompt_tokens(self) -> int:
        ...
    @property
    def request_id(self) -> int:
        ...
class EngineStats:
    @property
    def graph_batch_sizes(self) -> list[int]:
        ...
    @property
    def isolation_violations(self) -> int:
        ...
    @property
    def kv_cache_bytes(self) -> int:
        ...
    @property
    def kv_cache_bytes_in_use(self) -> int:
        ...
    @property
    def last_step_pages_selected(self) -> int:
        ...
    @property
    def last_step_pages_total(self) -> int:
        ...
    @property
    def num_cached_pages(self) -> int:
        ...
    @property
    def num_forked_samples(self) -> int:
        ...
    @property
    def num_free_pages(self) -> int:
        ...
    @property
    def num_free_prefill_rings(self) -> int:
        ...
    @property
    def num_free_stream_slots(self) -> int:
        ...
    @property
    def num_graph_replays(self) -> int:
        ...
    @property
    def num_preemptions(self) -> int:
        ...
    @property
    def num_prefill_rings(self) -> int:
        ...
    @property
    def num_prompt_tokens_computed(self) -> int:
        ...
    @property
    def num_running(self) -> int:
        ...
    @property
    def num_shadow_pages(self) -> int:
        ...
    @property
    def num_steps(self) -> int:
        ...
    @property
    def num_stream_slots(self) -> int:
        ...
    @property
    def num_total_pages(self) -> int:
        ...
    @property
    def num_waiting(self) -> int:
        ...
    @property
    def page_size(self) -> int:
        ...
    @property
    def prefix_cache_hits(self) -> int:
        ...
    @property
    def prefix_cache_queries(self) -> int:
        ...
    @property
    def prefix_caching(self) -> bool:
        ...
    @property
    def streaming_bytes_per_seq(self) -> int:
        ...
    @property
    def streaming_kv_bytes(self) -> int:
        ...
    @property
    def streaming_kv_bytes_in_use(self) -> int:
        ...
    @property
    def weight_bytes_mapped(self) -> int:
        ...
    @property
    def weight_bytes_packed(self) -> int:
        ...
class Engine:
    @staticmethod
    def from_gguf(path: str, config: EngineConfig) -> Engine:
        ...
    def __init__(self, model_config: ModelConfig, config: EngineConfig) -> None:
        ...
    def abort_request(self, request_id: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def add_request(self, request_id: typing.SupportsInt | typing.SupportsIndex, prompt_token_ids: typing.Any, params: SamplingParams) -> None:
        """
        Queues one request; raises ValueError naming what is wrong (empty prompt, a token id outside the vocabulary, a prompt that leaves max_model_len no room, the params).
        """
    def add_request_group(self, request_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], prompt_token_ids: typing.Any, params: collections.abc.Sequence[SamplingParams]) -> None:
        ...
    def finalize(self) -> None:
        ...
    def generate(self, prompts: collections.abc.Sequence[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]], params: SamplingParams) -> list[list[int]]:
        ...
    def has_unfinished_requests(self) -> bool:
        ...
    def load_weight(self, name: str, tensor: typing.Any) -> None:
        ...
    def reset_prefix_cache(self) -> None:
        ...
    def set_decode_sparsity(self, sparsity: SparsityConfig) -> None:
        ...
    def stats(self) -> EngineStats:
        ...
    def step(self) -> list[StepOutput]:
        ...
    @property
    def config(self) -> EngineConfig:
        ...
    @property
    def model_config(self) -> ModelConfig:
        ...
    @property
    def ready(self) -> bool:
        ...
class Support:
    """
    Backend.supports()'s answer: truthy when supported, else `reason` says why.
    """
    def __bool__(self) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    @property
    def reason(self) -> str:
        ...
    @property
    def supported(self) -> bool:
        ...
class Backend:
    """
    A backend by device name ('cpu', 'cuda', 'cuda:N'). Ops write preallocated outputs in place; invalid inputs raise ValueError.
    """
    def __init__(self, device: str = 'cpu', num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        ...
    def attention(self, query: typing.Any, k_cache: typing.Any, v_cache: typing.Any, qo_indptr: typing.Any, kv_page_indptr: typing.Any, kv_page_indices: typing.Any, kv_lens: typing.Any, output: typing.Any, sm_scale: typing.SupportsFloat | typing.SupportsIndex, max_q_len: typing.SupportsInt | typing.SupportsIndex = 0, max_kv_len: typing.SupportsInt | typing.SupportsIndex = 0, repeat: typing.SupportsInt | typing.SupportsIndex = 1, *, window_sink: typing.Any = None, window_local: typing.Any = None, stream_ring: typing.Any = None, selection: typing.Any = None, selection_count: typing.Any = None, select_slot: typing.Any = None, select_base: typing.Any = None) -> None:
        """
        Paged causal GQA (ops/attention.h); kv_page_indptr/kv_page_indices may be None with stream_ring. The keywords are the sparse block-iterator policy.
        """
    def begin_isolated(self) -> None:
        """
        Opens the per-layer region where allocation, copies and synchronisation are counted as violations.
        """
    def copy(self, dst: typing.Any, src: typing.Any) -> None:
        """
        dst[...] = src, converting between float32/bfloat16/float16.
        """
    def embed(self, token_ids: typing.Any, weight: typing.Any, output: typing.Any, weight_dtype: str = '') -> None:
        """
        output (num_tokens, hidden_size) = weight[token_ids]; weight_dtype q8_0 | q4_0 | q4_1: weight is the (vocab_size, row_bytes) uint8 array of its blocks
        """
    def end_isolated(self) -> None:
        ...
    def fill_zero(self, dst: typing.Any) -> None:
        ...
    def gather_rows(self, input: typing.Any, indices: typing.Any, output: typing.Any) -> None:
        ...
    def gemm(self, input: typing.Any, weight: typing.Any, bias: typing.Any, output: typing.Any, repeat: typing.SupportsInt | typing.SupportsIndex = 1, weight_dtype: str = '', pack: bool = False) -> None:
        """
        output = input @ weight^T (+ bias); `repeat` launches it that many times before the one wait (benchmarks); weight_dtype q8_0 | q4_0 | q4_1: weight is the (out_features, row_bytes) uint8 array of its blocks; pack: first copy the weight into the layout the backend's gemm reads fastest (Backend::pack_gemm_weight; the CPU interleaves block formats in groups of 8 rows), as a model does at load
        """
    def logprobs(self, logits: typing.Any, row_indices: typing.Any, token_ids: typing.Any, logprobs: typing.Any, top_token_ids: typing.Any, top_logprobs: typing.Any) -> None:
        """
        logprobs[r] = log_softmax(logits[row_indices[r]])[token_ids[r]]; top_token_ids[r] / top_logprobs[r]: the row's num_top best tokens (larger logit first, lower id on ties) and their logprobs. See ops/logprobs.h.
        """
    def memory_info(self) -> tuple[int, int]:
        """
        (free, total) device bytes, or (-1, -1) on the host
        """
    def page_select(self, query: typing.Any, kmax: typing.Any, kmin: typing.Any, kv_page_indptr: typing.Any, kv_page_indices: typing.Any, kv_lens: typing.Any, selected: typing.Any, num_selected: typing.Any, physical_page_size: typing.SupportsInt | typing.SupportsIndex, keep_first_page: bool = True, page_score: str = 'bound', group_score: str = 'sum', *, qo_indptr: typing.Any = None, select_mode: typing.Any = None, select_slot: typing.Any = None, spread: typing.Any = 0.0, keep_last_pages: typing.SupportsInt | typing.SupportsIndex = 1, head_num_select: typing.Any = None) -> None:
        """
        The selector's store: selected[slot, h, :num_selected[slot, h]] = the ascending page positions KV head h of each fresh sequence attends (select_mode 1; 0 dense and 2 reuse leave the store), slot = select_slot[s]; the query of sequence s is row qo_indptr[s+1]-1. See ops/page_select.h. page_score is 'bound', 'center' or 'blend' (centre + spread x the bound's spread term); group_score 'sum', 'max' or 'mass'. Every selection keeps the keep_last_pages newest pages; head_num_select (num_kv_heads,) int32 gives each head its own page count (at most the store's width).
        """
    def page_stats_append(self, key: typing.Any, slot_mapping: typing.Any, kmax: typing.Any, kmin: typing.Any, physical_page_size: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Folds each key into kmax/kmin of its slot's logical page (the first slot of a logical page resets it); see ops/page_select.h.
        """
    def rms_norm(self, input: typing.Any, residual: typing.Any, weight: typing.Any, output: typing.Any, eps: typing.SupportsFloat | typing.SupportsIndex = 9.999999974752427e-07) -> None:
        ...
    def rope_kv_append(self, query: typing.Any, key: typing.Any, value: typing.Any, positions: typing.Any, cos_sin_cache: typing.Any, k_cache: typing.Any, v_cache: typing.Any, slot_mapping: typing.Any, *, mirror_slot_mapping: typing.Any = None) -> None:
        ...
    def sample(self, logits: typing.Any, temperature: typing.Any, top_k: typing.Any, top_p: typing.Any, min_p: typing.Any, seed: typing.Any, offset: typing.Any, output: typing.Any, *, history_indptr: typing.Any = None, history_token_ids: typing.Any = None, num_prompt_tokens: typing.Any = None, repetition_penalty: typing.Any = None, presence_penalty: typing.Any = None, frequency_penalty: typing.Any = None, workspace: typing.Any = None, banned_indptr: typing.Any = None, banned_token_ids: typing.Any = None, raise_invalid_rows: bool = True) -> None:
        """
        output[r] = one token sampled from logits[r] (used as scratch) with row r's parameters; see ops/sample.h. The penalty tensors (history_*, num_prompt_tokens, *_penalty, workspace of sample_workspace_bytes(num_rows, vocab_size) uint8) go together, as do banned_indptr/banned_token_ids. Invalid rows: CUDA writes -1; the CPU raises, or writes -1 with raise_invalid_rows=False.
        """
    def silu_mul(self, input: typing.Any, output: typing.Any) -> None:
        ...
    def supports(self, op: str, *, dtype: str = 'float32', weight_dtype: str = 'float32', kv_cache_dtype: str = 'float32', head_dim: typing.SupportsInt | typing.SupportsIndex = 0, window: bool = False, stream_ring: bool = False, selection: bool = False, group_score: str = 'sum') -> Support:
        """
        Can this backend run `op` (one of _C.OPS) with these argument kinds? dtype: the activations; head_dim 0: not asked; window / stream_ring / selection: attention's sparse policy; group_score: page_select's. The op itself refuses whatever this refuses (a backend's own limits with this reason; what no op contract allows through the contract's check, which fires first).
        """
    def synchronize(self) -> None:
        ...
    @property
    def device(self) -> str:
        ...
    @property
    def isolation_violations(self) -> int:
        ...
    @property
    def low_precision_activations(self) -> bool:
        ...
    @property
    def name(self) -> str:
        ...
def cpu_isa() -> str:
    """
    The kernel level ('generic' | 'avx2' | 'avx512' | 'avx512vnni') a CPU backend made now runs: LSERVE_CPU_ISA's value, or the best this CPU runs when unset; ValueError for a value that is not a level or that this CPU cannot run
    """
def cpu_isas() -> list[str]:
    """
    The kernel levels this CPU and OS run, lowest first: the values LSERVE_CPU_ISA accepts here
    """
def gguf_hf_weights(file: GgufFile, callback: typing.Any = None) -> typing.Any:
    """
    Hugging Face-named float32 weights: {name: array}, or callback(name, array) for each.
    """
def gguf_load_stored_weights(file: GgufFile, engine: ..., callback: typing.Any = None) -> None:
    """
    engine.load_weight(name, weight) for every weight as stored (q4_1 stays q4_1: an Engine with dtype 'native'), then callback(name) when given.
    """
def gguf_model_config_dict(file: GgufFile) -> dict:
    """
    ModelConfig fields of a llama GGUF as a dict (rope_scaling nested).
    """
def rope_cos_sin_cache(head_dim: typing.SupportsInt | typing.SupportsIndex, rope_theta: typing.SupportsFloat | typing.SupportsIndex, max_positions: typing.SupportsInt | typing.SupportsIndex, partial_rotary_factor: typing.SupportsFloat | typing.SupportsIndex = 1.0, rope_scaling: typing.Any = None, max_position_embeddings: typing.SupportsInt | typing.SupportsIndex = 2048) -> numpy.typing.NDArray[numpy.float32]:
    """
    (max_positions, rotary_dim) float32: row p = [cos(p * inv_freq) | sin(p * inv_freq)] * attention_scaling; rope_scaling is Hugging Face's dict (rope_type default, linear, llama3 or yarn).
    """
def rope_frequencies(head_dim: typing.SupportsInt | typing.SupportsIndex, rope_theta: typing.SupportsFloat | typing.SupportsIndex, partial_rotary_factor: typing.SupportsFloat | typing.SupportsIndex = 1.0, rope_scaling: typing.Any = None, max_position_embeddings: typing.SupportsInt | typing.SupportsIndex = 2048) -> tuple[numpy.typing.NDArray[numpy.float64], float]:
    """
    (inv_freq (rotary_dim / 2,) float64, attention_scaling) as transformers' ROPE_INIT_FUNCTIONS return them.
    """
def sample_workspace_bytes(num_rows: typing.SupportsInt | typing.SupportsIndex, vocab_size: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Bytes of the sample op's workspace (uint8) for num_rows rows of vocab_size logits.
    """
def weight_shapes(model_config: ModelConfig) -> list[tuple[str, tuple]]:
    """
    [(Hugging Face name, shape)] of every tensor a checkpoint of this config holds, in model order (LlamaModel::weight_specs, the one table); validates the config.
    """
OPS: tuple = ('embed', 'rms_norm', 'gemm', 'silu_mul', 'rope_kv_append', 'attention', 'gather_rows', 'sample', 'logprobs', 'page_select', 'page_stats_append')
has_cuda_backend: bool
