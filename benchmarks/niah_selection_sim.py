"""Passkey retrieval under decode page-selection strategies, simulated with transformers (fp32).

For a NIAH case (lserve.eval.niah.make_case) the model prefills once with the streaming heads
Lambda-masked (sink 128 + local 1024, the shipped SmolLM2 pattern), then decodes greedily under each
strategy from a copy of that cache: streaming heads see sink 128 + local 256 at decode, dense heads the
pages a strategy selects (budget 1024 tokens in 64-token pages, first and newest pages kept) from
per-logical-page kmax/kmin of the post-RoPE keys. On the cells checked it reproduces lserve's engine
replies token for token (e.g. 4096 tokens, depth 0.25: '33952.'; 8176, depth 0.5: '8322471.'); it exists
to try selection rules quickly, not to replace `lserve eval niah`.

Strategy keys (JSON): budget (tokens), logical (tokens per logical page), reuse (steps), local (newest
pages forced), dense_layers (layers read in full), combine ("sum" of group scores, "max",
"softmax_max", "softmax_sum", "oracle" = true attention mass per page), est ("mean" = q . mean key,
else kmax/kmin), alpha (score = q.centre + alpha * |q|.halfwidth: 1 = the paper's bound, 0 = "center"),
gran ("logical": select logical pages instead of physical ones).

Usage: python3 benchmarks/niah_selection_sim.py GGUF '{"bound": {}, "center": {"alpha": 0}}' 4096 0,0.25,0.5
"""
import copy, json, math, sys, time
import numpy as np
import torch
from transformers import AttentionInterface

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "python"))
from lserve.calibrate.trainer import load_hf_model
from lserve.eval.niah import make_case, score_reply
from lserve.sparsity import SparsityConfig
from lserve.tokenizer import Tokenizer

GGUF = sys.argv[1] if __name__ == "__main__" else None
torch.set_num_threads(max(1, torch.get_num_threads()))
model, hf_tok = load_hf_model(GGUF)
model.eval()
tok = Tokenizer.from_gguf(GGUF)
sp = SparsityConfig.preset("lserve", model="smollm2-135m-instruct")
L, KVH, H = 30, 3, 9
G = H // KVH
STREAM = np.asarray(sp.streaming_mask(L, KVH), dtype=bool)
PF_SINK, PF_LOCAL, DC_SINK, DC_LOCAL = 128, 1024, 128, 256
PAGE, LOGICAL = 64, 16

state = {"mode": "prefill", "strategy": None, "sel": {}, "step": 0}


def select_pages(q, k, strategy, layer, kvh):
    """q (G, D) float, k (T, D): list of selected physical pages (torch)."""
    T = k.shape[0]
    npages = -(-T // PAGE)
    budget = strategy.get("budget", 1024) // PAGE
    if layer in strategy.get("dense_layers", ()) or npages <= budget:
        return None
    LOGICAL = strategy.get("logical", 16)
    nlog = -(-T // LOGICAL)
    pad = nlog * LOGICAL - T
    kp = torch.cat([k, k[-1:].expand(pad, -1)]) if pad else k
    kl = kp.view(nlog, LOGICAL, -1)
    kmax, kmin = kl.max(1).values, kl.min(1).values  # (nlog, D)
    if strategy.get("est") == "mean":
        s = q @ kl.mean(1).T
    elif "alpha" in strategy:
        a = strategy["alpha"]
        s = q @ ((kmax + kmin) / 2).T + a * (q.abs() @ ((kmax - kmin) / 2).T)
    else:
        s = torch.maximum(q[:, None, :] * kmax[None], q[:, None, :] * kmin[None]).sum(-1)  # (G, nlog)
    comb = strategy.get("combine", "sum")
    if comb == "sum":
        sl = s.sum(0)
    elif comb == "softmax_max":
        sl = torch.softmax(s * k.shape[1] ** -0.5, dim=1).max(0).values
    elif comb == "softmax_sum":
        sl = torch.softmax(s * k.shape[1] ** -0.5, dim=1).sum(0)
    elif comb == "max":
        sl = s.max(0).values
    elif comb == "oracle":
        p = torch.softmax((q @ k.T) * k.shape[1] ** -0.5, dim=1).sum(0)  # (T,)
        pp = torch.cat([p, torch.zeros(nlog * LOGICAL - T)])
        sl = pp.view(nlog, LOGICAL).sum(1)
    if strategy.get("gran") == "logical":
        nsel = strategy.get("budget", 1024) // LOGICAL
        sl = sl.clone(); sl[0] = float("inf"); sl[-(PAGE // LOGICAL):] = float("inf")
        top = torch.topk(sl, min(nsel, nlog)).indices
        return ("logical", top, LOGICAL)
    lpp = PAGE // LOGICAL
    padl = npages * lpp - nlog
    if padl:
        sl = torch.cat([sl, torch.full((padl,), -float("inf"))])
    sp_ = sl.view(npages, lpp).sum(1) if comb == "oracle" else sl.view(npages, lpp).max(1).values
    forced = [0] + list(range(max(1, npages - strategy.get("local", 1)), npages))
    sp_[forced] = float("inf")
    return torch.topk(sp_, budget).indices


def attn(module, query, key, value, attention_mask, scaling=None, **kw):
    layer = int(module.layer_idx)
    B, Hq, Tq, D = query.shape
    Tk = key.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    out = torch.empty(B, Tq, Hq, D)
    qpos = torch.arange(Tk - Tq, Tk)
    kpos = torch.arange(Tk)
    causal = kpos[None, :] <= qpos[:, None]
    for h in range(KVH):
        q = query[0, h * G:(h + 1) * G]  # (G, Tq, D)
        k, v = key[0, h], value[0, h]
        if STREAM[layer, h]:
            if state["mode"] == "prefill":
                sink, local = PF_SINK, PF_LOCAL
            else:
                sink, local = DC_SINK, DC_LOCAL
            mask = causal & ((kpos[None, :] < sink) | (qpos[:, None] - kpos[None, :] < local))
        elif state["mode"] == "prefill" or state["strategy"] is None:
            mask = causal
        else:
            assert Tq == 1
            st = state["strategy"]
            key_ = (layer, h)
            reuse = st.get("reuse", 1)
            if state["step"] % reuse == 0 or key_ not in state["sel"]:
                pages = select_pages(q[:, 0], k, st, layer, h)
                state["sel"][key_] = (pages, Tk)
            pages, t_at = state["sel"][key_]
            if pages is None:
                mask = causal
            elif isinstance(pages, tuple):
                _, top, LG = pages
                keep = torch.zeros(-(-Tk // LG), dtype=torch.bool)
                keep[top] = True
                keep[(t_at - 1) // LG:] = True
                mask = causal & keep.repeat_interleave(LG)[:Tk][None, :]
            else:
                newest_then = (t_at - 1) // PAGE
                keep = torch.zeros(-(-Tk // PAGE), dtype=torch.bool)
                keep[pages] = True
                keep[newest_then:] = True
                mask = causal & keep.repeat_interleave(PAGE)[:Tk][None, :]
        o = torch.nn.functional.scaled_dot_product_attention(q, k[None].expand(G, -1, -1), v[None].expand(G, -1, -1),
                                                             attn_mask=mask, scale=scale)
        out[0, :, h * G:(h + 1) * G] = o.transpose(0, 1)
    return out, None


AttentionInterface.register("simattn", attn)
model.set_attn_implementation("simattn")


def run_case(length, depth, strategies, max_new=12):
    case = make_case(tok, length, depth, seed=0)
    ids = torch.tensor([case.prompt_token_ids])
    state.update(mode="prefill", strategy=None)
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    cache0, first = out.past_key_values, int(out.logits[0, -1].argmax())
    res = {}
    for name, st in strategies.items():
        cache = copy.deepcopy(cache0)
        state.update(mode="decode", strategy=st, sel={}, step=0)
        toks = [first]
        with torch.no_grad():
            for i in range(max_new - 1):
                o = model(torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True)
                toks.append(int(o.logits[0, -1].argmax()))
                state["step"] += 1
        reply = tok.decode(toks)
        res[name] = (score_reply(reply, case.passkey), reply.strip()[:16])
    return case.passkey, res


if __name__ == "__main__":
    strategies = json.loads(sys.argv[2])
    lengths = [int(x) for x in sys.argv[3].split(",")]
    depths = [float(x) for x in sys.argv[4].split(",")]
    totals = {n: 0 for n in strategies}
    for length in lengths:
        for depth in depths:
            t0 = time.time()
            key, res = run_case(length, depth, strategies)
            for n, (ok, _) in res.items():
                totals[n] += ok
            print(length, depth, key, {n: r for n, r in res.items()}, f"{time.time()-t0:.0f}s", flush=True)
    print("TOTAL", totals, flush=True)
