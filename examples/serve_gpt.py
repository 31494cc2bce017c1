"""Continuous batching with a paged KV cache, against static padded batching.

    python examples/serve_gpt.py                      # CPU, under a minute
    python examples/serve_gpt.py --device cuda --requests 256 --d-model 512 --layers 8

Requests with different prompt and output lengths arrive over time (exponential gaps, in
decode steps). Two servers run the same requests with the same GPT (random weights: the
tokens do not matter, their count and the work do), greedy decoding:

- continuous: a scheduler admits waiting requests whenever the page pool
  (``fastattn.nn.PagedKVCache``) has room for a request's prompt plus its output budget, and
  at most ``--max-batch`` run at once; each admitted prompt is prefilled on its own, then the
  whole running set decodes in ONE batched call per step (ragged lengths, one block table),
  and a finished request frees its pages at once.
- chunked: the same admission, but no separate prefill: each step is ONE model call whose
  tokens are every running request's next decode token plus chunks of admitted prompts, up to
  ``--chunk`` tokens in all (chunked prefill, as serving engines schedule). The call is ragged:
  ``PagedKVCache.set_batch(ids, new_tokens)`` and ``GPT(..., cu_seqlens=cache.cu_seqlens())``
  run one ``attention_with_kvcache(cu_seqlens_q=...)`` per layer.
- static: requests are served in groups of ``--max-batch`` in arrival order; a group waits
  for the previous one to finish, is right-padded to its longest prompt and preallocates a
  contiguous ``fastattn.nn.KVCache`` of batch x (longest prompt + longest output); every row
  decodes until the group's longest output is done.

Reported per server: generated tokens per second of wall time, decode steps, mean latency
(steps from arrival to the last token) and the peak KV-cache memory (pages in use x page
bytes for the pool; the preallocated buffers for static). It also checks that the servers
produce the same tokens for every request, and (``--check``, on with ``--tiny``) that these
equal each request's greedy tokens generated alone (``GPT.generate``).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

import fastattn
from fastattn.models import GPT, GPTConfig
from fastattn.nn import KVCache, PagedKVCache


@dataclass
class Request:
    rid: int
    arrival: int  # decode step at which it arrives
    prompt: torch.Tensor  # (L,) int64
    max_new: int
    out: list = field(default_factory=list)
    done_at: int = -1


def workload(n: int, prompt_range, output_range, mean_gap: float, vocab: int, seed: int) -> list:
    """n requests with uniform prompt / output lengths in the ranges and exponential
    inter-arrival gaps of mean ``mean_gap`` decode steps."""
    g = torch.Generator().manual_seed(seed)
    reqs, t = [], 0.0
    for i in range(n):
        t += float(torch.empty(1).exponential_(1.0 / mean_gap, generator=g)) if mean_gap > 0 else 0.0
        lp = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        lo = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=g))
        reqs.append(Request(i, int(t), torch.randint(0, vocab, (lp,), generator=g), lo))
    return reqs


def _fresh(reqs):
    return [Request(r.rid, r.arrival, r.prompt, r.max_new) for r in reqs]


def _paged_cache(model: GPT, num_pages: int, page_size: int, device) -> PagedKVCache:
    cfg = model.config
    return PagedKVCache(cfg.n_layers, cfg.kv_heads, cfg.head_dim, num_pages=num_pages, page_size=page_size,
                        dtype=model.tok.weight.dtype, device=device)


def _admissible(waiting: list, clock: int, n_running: int, max_batch: int, cache: PagedKVCache, budget: dict):
    """The pages the first waiting request needs if it may start now (it has arrived, the batch
    has room, and the free pages cover its prompt and whole output beyond what the running
    requests reserved), else None: requests start in arrival order."""
    if not waiting or waiting[0].arrival > clock or n_running >= max_batch:
        return None
    need = cache.pages_for(len(waiting[0].prompt) + waiting[0].max_new)
    return need if cache.free_pages() - sum(budget.values()) >= need else None


def _retire(finished: list, clock: int, cache: PagedKVCache, budget: dict) -> None:
    """Finished (request, sequence id) pairs: done at ``clock``, their pages freed."""
    for r, sid in finished:
        r.done_at = clock
        cache.free(sid)
        del budget[sid]


@torch.no_grad()
def serve_continuous(model: GPT, reqs: list, *, max_batch: int, num_pages: int, page_size: int, device) -> dict:
    cache = _paged_cache(model, num_pages, page_size, device)
    waiting, running, clock, steps = list(reqs), [], 0, 0  # running: (request, sequence id)
    budget = {}  # sequence id -> pages it may still take (reserved at admission)
    start = time.perf_counter()
    while waiting or running:
        # Admit in arrival order while there is room: pages for the prompt and the whole output.
        while (need := _admissible(waiting, clock, len(running), max_batch, cache, budget)) is not None:
            r = waiting.pop(0)
            sid = cache.add()
            cache.set_batch([sid])
            logits, _ = model(r.prompt[None].to(device), cache=cache)  # prefill: (1, L, V)
            r.out.append(int(logits[0, -1].argmax()))
            budget[sid] = need - len(cache.pages(sid))
            running.append((r, sid))
        if not running:  # idle until the next arrival
            clock = max(clock, waiting[0].arrival)
            continue
        # One batched decode step over every running request (ragged lengths).
        active = [(r, sid) for r, sid in running if len(r.out) < r.max_new]
        if active:
            ids = [sid for _, sid in active]
            cache.set_batch(ids)
            last = torch.tensor([[r.out[-1]] for r, _ in active], device=device)  # (B, 1)
            pos = torch.tensor([cache.length(sid) for sid in ids], device=device)  # (B,) positions
            logits, _ = model(last, cache=cache, offset=pos)  # (B, 1, V)
            for (r, sid), tok in zip(active, logits[:, -1].argmax(-1).tolist()):
                r.out.append(tok)
                budget[sid] = cache.pages_for(len(r.prompt) + r.max_new) - len(cache.pages(sid))
            steps += 1
            clock += 1
        finished = [(r, sid) for r, sid in running if len(r.out) >= r.max_new]
        if finished:
            running = [x for x in running if x not in finished]
            cache.set_batch([sid for _, sid in running])
            _retire(finished, clock, cache, budget)
    wall = time.perf_counter() - start
    return _summary("continuous", reqs, wall, steps, cache.peak_pages * cache.page_bytes())


@torch.no_grad()
def serve_chunked(model: GPT, reqs: list, *, max_batch: int, num_pages: int, page_size: int, chunk: int,
                  device) -> dict:
    cache = _paged_cache(model, num_pages, page_size, device)
    waiting, running, clock, steps = list(reqs), [], 0, 0  # running: [request, sequence id, prompt tokens fed]
    budget = {}  # sequence id -> pages it may still take (reserved at admission)
    start = time.perf_counter()
    while waiting or running:
        while (need := _admissible(waiting, clock, len(running), max_batch, cache, budget)) is not None:
            r = waiting.pop(0)
            sid = cache.add()
            budget[sid] = need
            running.append([r, sid, 0])
        if not running:  # idle until the next arrival
            clock = max(clock, waiting[0].arrival)
            continue
        # One model call: every decoding request's last token, then prompt chunks in admission
        # order while the step's token budget lasts.
        room = chunk - sum(fed == len(r.prompt) for r, _, fed in running)
        step, tokens = [], []  # step: (entry, new tokens)
        for entry in running:
            r, _, fed = entry
            if fed == len(r.prompt):
                step.append((entry, 1))
                tokens.append(r.out[-1])
            elif room > 0:
                n = min(len(r.prompt) - fed, room)
                room -= n
                step.append((entry, n))
                tokens.extend(r.prompt[fed:fed + n].tolist())
        cache.set_batch([entry[1] for entry, _ in step], [n for _, n in step])
        cu = cache.cu_seqlens()
        logits, _ = model(torch.tensor(tokens, device=device)[None], cache=cache, cu_seqlens=cu)  # (1, total, V)
        nxt = logits[0, cu[1:].long() - 1].argmax(-1).tolist()  # each sequence's last new token predicts
        for (entry, n), tok in zip(step, nxt):
            r, sid, fed = entry
            if fed < len(r.prompt):
                entry[2] = fed + n
            if entry[2] == len(r.prompt):  # a decode step, or the prompt's last chunk: a new token
                r.out.append(tok)
            budget[sid] = cache.pages_for(len(r.prompt) + r.max_new) - len(cache.pages(sid))
        steps += 1
        clock += 1
        finished = [entry for entry in running if len(entry[0].out) >= entry[0].max_new]
        if finished:
            running = [entry for entry in running if len(entry[0].out) < entry[0].max_new]
            cache.set_batch([])
            _retire([(r, sid) for r, sid, _ in finished], clock, cache, budget)
    wall = time.perf_counter() - start
    return _summary("chunked", reqs, wall, steps, cache.peak_pages * cache.page_bytes())


@torch.no_grad()
def one_at_a_time(model: GPT, reqs: list) -> list:
    """Each request's greedy tokens from ``model.generate`` on its prompt alone."""
    return [model.generate(r.prompt[None].to(model.tok.weight.device), r.max_new)[0, len(r.prompt):].tolist()
            for r in reqs]


@torch.no_grad()
def serve_static(model: GPT, reqs: list, *, max_batch: int, device) -> dict:
    cfg = model.config
    dtype = model.tok.weight.dtype
    elt = torch.empty((), dtype=dtype).element_size()
    waiting, clock, steps, peak = list(reqs), 0, 0, 0
    start = time.perf_counter()
    while waiting:
        clock = max(clock, waiting[0].arrival)
        group = [r for r in waiting if r.arrival <= clock][:max_batch]
        waiting = [r for r in waiting if r not in group]
        b, lp = len(group), max(len(r.prompt) for r in group)
        capacity = lp + max(r.max_new for r in group)
        cache = KVCache(cfg.n_layers, b, cfg.kv_heads, cfg.head_dim, dtype=dtype, device=device,
                        capacity=capacity, chunk_size=capacity)
        peak = max(peak, cfg.n_layers * 2 * b * cfg.kv_heads * capacity * cfg.head_dim * elt)
        padded = torch.zeros(b, lp, dtype=torch.long)
        for i, r in enumerate(group):  # right padding: causal attention keeps it out of the real tokens
            padded[i, :len(r.prompt)] = r.prompt
        logits, _ = model(padded.to(device), cache=cache)  # (B, Lp, V)
        lengths = torch.tensor([len(r.prompt) for r in group], device=device)
        cache.set_seqlens(lengths)  # the next tokens overwrite the padding
        for i, r in enumerate(group):
            r.out.append(int(logits[i, len(r.prompt) - 1].argmax()))
        for _ in range(max(r.max_new for r in group) - 1):
            last = torch.tensor([[r.out[-1]] for r in group], device=device)  # (B, 1)
            logits, _ = model(last, cache=cache, offset=cache.seqlens(0).long())
            for r, tok in zip(group, logits[:, -1].argmax(-1).tolist()):
                if len(r.out) < r.max_new:
                    r.out.append(tok)
                    if len(r.out) == r.max_new:
                        r.done_at = clock + 1
            steps += 1
            clock += 1
        for r in group:
            if r.done_at < 0:  # a one-token output: done at prefill
                r.done_at = clock
    wall = time.perf_counter() - start
    return _summary("static", reqs, wall, steps, peak)


def _summary(name, reqs, wall, steps, peak_bytes) -> dict:
    tokens = sum(len(r.out) for r in reqs)
    return dict(server=name, tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall, steps=steps,
                mean_latency_steps=sum(r.done_at - r.arrival for r in reqs) / len(reqs),
                peak_cache_mib=peak_bytes / 2 ** 20)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    p.add_argument("--output", type=int, nargs=2, default=(4, 64), metavar=("MIN", "MAX"))
    p.add_argument("--mean-gap", type=float, default=1.0, help="mean decode steps between arrivals")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64, help="tokens per model call of the chunked server")
    p.add_argument("--check", action="store_true", help="compare with generating each request alone")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--pages", type=int, default=None,
                   help="pool size; default: what static batching preallocates for a full group of the longest")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs per server; the fastest is reported")
    p.add_argument("--tiny", action="store_true", help="a few short requests on a tiny model (tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.tiny:
        args.requests, args.prompt, args.output, args.max_batch = 6, (3, 20), (1, 12), 3
        args.d_model, args.layers, args.repeats, args.chunk, args.check = 32, 2, 1, 8, True
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                    n_kv_heads=args.kv_heads, positional="rope", max_seq_len=args.prompt[1] + args.output[1],
                    init_std=0.5)  # wide enough that greedy tokens vary (GPT-2's 0.02 repeats one token)
    model = GPT(cfg).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    reqs = workload(args.requests, args.prompt, args.output, args.mean_gap, 256, args.seed)
    longest = args.prompt[1] + args.output[1]
    pages = args.pages or args.max_batch * -(-longest // args.page_size)
    print(f"{args.requests} requests, prompts {args.prompt[0]}-{args.prompt[1]}, outputs {args.output[0]}-"
          f"{args.output[1]} tokens, mean gap {args.mean_gap} steps; GPT d_model={args.d_model} x {args.layers} "
          f"layers, {args.heads} heads / {args.kv_heads} kv heads, {args.dtype} on {device}, backend={args.backend}; "
          f"max batch {args.max_batch}, pool {pages} pages of {args.page_size}, chunks of {args.chunk} tokens")
    with fastattn.use_backend(args.backend):
        runs = {}
        warm = workload(2, (args.prompt[0], args.prompt[0]), (2, 2), 0.0, 256, args.seed)
        serve_continuous(model, warm, max_batch=2, num_pages=pages, page_size=args.page_size, device=device)
        serve_chunked(model, _fresh(warm), max_batch=2, num_pages=pages, page_size=args.page_size, chunk=args.chunk,
                      device=device)
        serve_static(model, _fresh(warm), max_batch=2, device=device)  # first calls (lazy inits) untimed
        paged = dict(max_batch=args.max_batch, num_pages=pages, page_size=args.page_size, device=device)
        for name, serve in (("chunked", lambda r: serve_chunked(model, r, chunk=args.chunk, **paged)),
                            ("continuous", lambda r: serve_continuous(model, r, **paged)),
                            ("static", lambda r: serve_static(model, r, max_batch=args.max_batch, device=device))):
            for _ in range(args.repeats):  # the best of a few runs: a shared machine is noisy
                done = _fresh(reqs)
                result = serve(done)
                if name not in runs or result["wall_s"] < runs[name][0]["wall_s"]:
                    runs[name] = (result, done)
        alone = one_at_a_time(model, reqs) if args.check else None
    outs = [[r.out for r in runs[name][1]] for name in runs]
    same = sum(all(o[i] == outs[0][i] for o in outs) for i in range(len(reqs))) / len(reqs)
    print(f"{'server':<12}{'tokens':>8}{'tokens/s':>11}{'steps':>8}{'latency':>10}{'peak cache MiB':>16}")
    for name, (s, _) in runs.items():
        print(f"{name:<12}{s['tokens']:>8}{s['tokens_per_s']:>11.1f}{s['steps']:>8}"
              f"{s['mean_latency_steps']:>10.1f}{s['peak_cache_mib']:>16.2f}")
    print(f"same tokens for {same:.0%} of the requests")
    result = {name: s for name, (s, _) in runs.items()}
    result["same_tokens"] = same
    if alone is not None:
        result["same_as_alone"] = sum(o == a for o, a in zip(outs[0], alone)) / len(reqs)
        print(f"chunked tokens equal to generating each request alone for {result['same_as_alone']:.0%}")
    return result


if __name__ == "__main__":
    main()
