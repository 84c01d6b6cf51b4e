// PageSelector: the one owner of LServe's sparse-attention state. The scheduler asks it for room
// (acquire/release), the engine asks it to plan each step (plan_chunk, once per step on the host)
// and to commit it, and the model reads the plan and its selection store; none of them keeps a
// piece of this state.
//
// What it owns:
//  - Streaming-head memory, in two tiers of one page pool per layer (the model allocates the pages;
//    the selector decides how many and where, and every address is arithmetic):
//      decode slots   [0, num_slots * slot_pages): slot i = sink pages + a decode ring sized for
//                     the decode window (ceil(decode_local / page_size) + 1 pages), held by every
//                     running sequence: constant memory whatever its context or the prefill window;
//      prefill rings  after them: num_prefill_rings rings of sink-less pages sized for the prefill
//                     window plus a chunk, held only while a long prompt prefills. Its sinks go to the
//                     decode slot's sink pages, and every chunk also writes its last decode-ring worth
//                     of tokens into the decode ring (rope_kv_append's mirror_slot_mapping), so the
//                     decode ring is complete when prefill ends and the prefill ring is handed back.
//                     A prompt that fits the decode slot (no wrap) prefills there directly.
//    A sequence's page of logical page lp is sink_base + lp below num_sink, else
//    ring_base + (lp - num_sink) % num_ring (AttentionArgs::stream_ring).
//  - The selection store: per layer (num_slots, num_dense_kv_heads, num_select) int32 positions and
//    (num_slots, num_dense_kv_heads) counts on the backend, written by page_select for fresh
//    sequences, read by attention; never copied to the host.
//  - The reuse policy: a decoding sequence past the budget selects afresh every
//    selection_reuse_interval steps (and after any prefill, preemption or slot change) and reuses
//    its slot's selection otherwise, plus every page made since (attention computes that).
//  - The memory split between streaming and dense heads (size_memory).
//  - With prefix caching, the streaming heads' part of cached prefixes: a third tier of shadow
//    pages after the prefill rings. When a dense page is named in the prefix cache, the streaming
//    heads' keys and values of the same tokens (still in the sequence's ring) are copied into a
//    shadow page tied to that page's name; a request that hits a cached prefix of k pages gets its
//    sinks and the windows before page k copied from the shadows into its decode slot and prefill
//    ring, so it holds exactly the streaming state a full prefill would have left. A hit is cut to
//    the longest prefix whose sinks and trailing window have shadows. Shadows are few (a share of
//    the KV budget) and recycled least recently used first; a chain's sink shadows are refreshed
//    whenever it names a page.
#pragma once

#include <cstdint>
#include <list>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lserve/backend.h"
#include "lserve/sparsity.h"

namespace lserve {

// One step's sparse metadata, planned on the host, uploaded with the step's other metadata.
// Per token, then per sequence (in the batch's order).
struct SparsePlan {
  std::vector<int64_t> stream_slot_mapping;    // (num_tokens,) streaming-cache slot of each token
  std::vector<int64_t> stream_mirror_mapping;  // (num_tokens,) decode-ring slot while prefilling via a ring, or -1
  std::vector<int32_t> stream_ring;            // (num_seqs, 4) sink_base, num_sink, ring_base, num_ring
  std::vector<int32_t> window_sink;            // (num_seqs,) Lambda mask of the streaming heads
  std::vector<int32_t> window_local;           // (num_seqs,)
  std::vector<int32_t> select_mode;            // (num_seqs,) SelectMode (ops/page_select.h)
  std::vector<int32_t> select_slot;            // (num_seqs,) store row; -1 with kSelectDense
  std::vector<int32_t> select_base;            // (num_seqs,) pages when the selection was made
  // Pages one dense KV head reads this step, summed over sequences, and what dense attention would read.
  int64_t pages_read_per_head = 0;
  int64_t pages_total_per_head = 0;

  void clear();
  void reserve(int64_t max_tokens, int64_t max_seqs);
};

class PageSelector {
 public:
  // page_size: tokens per page of both the dense and the streaming caches (= physical_page_size).
  PageSelector(const SparsityConfig& sparsity, int page_size, int max_num_seqs, int max_num_batched_tokens,
               int max_model_len);

  // Geometry (pages of page_size tokens).
  int page_size() const { return page_size_; }
  int num_sink_pages() const { return num_sink_pages_; }
  int decode_ring_pages() const { return decode_ring_pages_; }
  int slot_pages() const { return num_sink_pages_ + decode_ring_pages_; }
  int prefill_ring_pages() const { return prefill_ring_pages_; }
  // Pages the smallest dense-head budget selects: a decoding sequence with more pages than this
  // selects (the heads whose budget covers its pages read them all); with head_token_budgets the
  // heads of a layer select per-head counts (head_num_select) within their layer's store width.
  int num_select() const { return num_select_; }
  // Tokens a decode slot holds without wrapping: prompts up to this prefill in the slot itself.
  int64_t decode_slot_tokens() const { return static_cast<int64_t>(slot_pages()) * page_size_; }

  // Splits `budget` bytes of KV memory. stream_bytes_per_token: the streaming heads of every layer;
  // dense_bytes_per_token: the dense heads (K, V and kmax/kmin). Takes the prefill rings, then decode
  // slots for as many sequences as the budget holds at half of max_model_len (a slot plus the
  // dense pages of max_model_len / 2 tokens each), between 1 and max_num_seqs. Returns the bytes
  // taken; call once, before allocate_store.
  int64_t size_memory(int64_t budget, int64_t stream_bytes_per_token, int64_t dense_bytes_per_token);
  int num_slots() const { return num_slots_; }
  int num_prefill_rings() const { return num_prefill_rings_; }
  int num_stream_pages() const {
    return num_slots_ * slot_pages() + num_prefill_rings_ * prefill_ring_pages_ + num_shadow_pages_;
  }
  int64_t slot_bytes() const { return slot_bytes_; }
  int64_t prefill_ring_bytes() const { return prefill_ring_bytes_; }

  // The selection store on `backend`: num_dense_kv_heads[layer] heads per layer; counts start at -1
  // (no selection: attention reads every page).
  void allocate_store(Backend& backend, const std::vector<int>& num_dense_kv_heads);
  // Takes `sparsity`'s decode-time selection settings (SparsityConfig::layout_difference is null)
  // while no sequence holds a slot, and reallocates the store for its budgets; the streaming tiers
  // and the prefix cache's shadows stay as they are.
  void set_decode_settings(const SparsityConfig& sparsity, Backend& backend,
                           const std::vector<int>& num_dense_kv_heads);
  TensorView selection(int layer_idx) const { return store_[static_cast<size_t>(layer_idx)].selection.view(); }
  TensorView selection_count(int layer_idx) const { return store_[static_cast<size_t>(layer_idx)].count.view(); }
  // (num_dense_kv_heads,) int32 pages each dense head of the layer selects, in the model's dense-head
  // order (ascending KV head index); undefined without head_token_budgets (every head: the store width).
  TensorView head_num_select(int layer_idx) const { return store_[static_cast<size_t>(layer_idx)].head_select.view(); }

  // Scheduler side. acquire: what seq_id needs to run: its decode slot and, when prefill_tokens (the
  // tokens it will prefill from position 0) or the dense_below_tokens context exceed the decode slot,
  // a prefill ring. False, and nothing taken, when either is missing. A sequence that holds its
  // resources already gets true. release: gives everything back (finish, abort, preemption).
  bool acquire(int64_t seq_id, int64_t prefill_tokens);
  void release(int64_t seq_id);
  bool has(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  // A sample forked from src after src's prefill (Engine::add_request_group): dst takes a free
  // decode slot and src's decode state (no prefill ring; a fresh selection at its first decode).
  // The caller copies src's slot pages onto dst's. False, nothing taken, when no slot is free or
  // src still prefills through a prefill ring.
  bool fork(int64_t src_seq_id, int64_t dst_seq_id);
  int num_free_slots() const { return static_cast<int>(free_slots_.size()); }
  int num_free_prefill_rings() const { return static_cast<int>(free_rings_.size()); }
  int slot_of(int64_t seq_id) const;

  // Engine side, once per step. plan_chunk appends the metadata of a chunk of num_new_tokens tokens
  // at start_position of seq_id, whose page list then holds num_pages pages (kv_len tokens); a chunk
  // after which the sequence samples its first token ends its prefill (commit). commit then moves
  // those sequences to decode and hands their prefill rings back.
  void plan_chunk(int64_t seq_id, int64_t start_position, int64_t num_new_tokens, int64_t num_pages,
                  bool samples, SparsePlan* plan);
  void commit();

  // Prefix caching's streaming tier (call before allocate_store; 0 pages: off).
  void set_shadow_pages(int num_shadow_pages);
  int num_shadow_pages() const { return num_shadow_pages_; }
  // Pages before a hit's boundary whose streaming K/V a request needs restored (besides its sinks).
  int restore_window_pages() const;
  // How many of a cached run's pages (their names, in order) a request may take:
  // the longest k whose sink pages and restore_window_pages() pages before k all have shadows.
  int usable_prefix_pages(const std::vector<uint64_t>& names) const;
  // seq_id's logical page `logical_page` was just named `name` in the prefix cache: returns
  // (the stream page now holding its streaming K/V, the shadow page to copy it into), or (-1, -1)
  // when it has a shadow already. chain: the sequence's page names (its sink pages' shadows are kept fresh).
  std::pair<int, int> shadow_page_for(int64_t seq_id, int64_t logical_page, uint64_t name,
                                      const std::vector<uint64_t>& chain);
  // seq_id (holding its slot, and a prefill ring when it needs one) starts at page num_pages of a
  // cached prefix: the (shadow, stream page) copies that restore its sinks and windows.
  // names: its chain's page names.
  std::vector<std::pair<int, int>> restore_copies(int64_t seq_id, const std::vector<uint64_t>& names,
                                                  int64_t num_pages);

 private:
  struct SeqState {
    int slot = -1;
    int prefill_ring = -1;       // >= 0 while prefilling through a prefill ring
    bool decoding = false;       // prefill done and the context past dense_below_tokens
    bool ends_prefill = false;   // planned this step: the chunk samples (commit moves to decode)
    int64_t next_position = 0;   // the first position after this step's chunk
    int steps = 0;               // decode steps since the selection was made (0: none valid)
    int32_t base_pages = 0;      // the sequence's pages when it was made
  };
  struct Store {
    Tensor selection, count, head_select;
  };

  void size_selection();  // num_select_ and mean_select_ from sparsity_'s budgets

  SparsityConfig sparsity_;
  int page_size_, max_num_seqs_, max_num_batched_tokens_, max_model_len_;
  int num_sink_pages_ = 0, decode_ring_pages_ = 0, prefill_ring_pages_ = 0, num_select_ = 0, mean_select_ = 0;
  int num_slots_ = 0, num_prefill_rings_ = 0;
  int64_t slot_bytes_ = 0, prefill_ring_bytes_ = 0;
  std::vector<int> free_slots_, free_rings_;  // LIFO
  std::unordered_map<int64_t, SeqState> seqs_;
  std::vector<int64_t> planned_;  // sequences planned this step, for commit
  std::vector<Store> store_;
  // Shadows: per shadow, the name it holds (0 with shadow_used_ false); name -> shadow; LRU order.
  int num_shadow_pages_ = 0;
  std::vector<uint64_t> shadow_name_;
  std::vector<char> shadow_used_;
  std::unordered_map<uint64_t, int> shadow_of_;
  std::list<int> shadow_lru_;  // front: least recently used
  std::vector<std::list<int>::iterator> shadow_pos_;
  int shadow_base() const { return num_slots_ * slot_pages() + num_prefill_rings_ * prefill_ring_pages_; }
  // A sequence's decode ring and the ring it writes now (its prefill ring while it holds one, else
  // the decode ring), as AttentionArgs::stream_ring rows.
  void rings_of(const SeqState& state, int32_t decode_ring[4], int32_t ring[4]) const;
  int prefill_restore_pages() const;  // pages before a hit a prefill ring needs back
  void touch_shadow(int shadow);
  int find_shadow(uint64_t name) const;
};

}  // namespace lserve
