"""Give a Hugging Face model fastattn in one line, and measure what it changes here.

A Llama-shaped model is built from a config (no download), then run with transformers' own
"sdpa" attention and with attn_implementation="fastattn": the same weights, the same input.
Prints the largest logit difference, the time of a forward pass and of greedy generation,
and the peak memory of each, on this machine.

    python examples/patch_huggingface.py                 # small model, on CUDA if present
    python examples/patch_huggingface.py --seq 4096 --layers 8 --width 2048

On a CPU without a GPU, fastattn's "auto" backend hands these calls to torch's own SDPA
(the Triton kernels need CUDA), so expect no speedup there: the example says which path ran.
"""
import argparse
import statistics
import time

import torch

import fastattn


def peak_mb(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident-set high-water mark (Linux)
    rss = lambda field: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))  # noqa: E731
    before = rss("VmRSS:")
    fn()
    return max(0, rss("VmHWM:") - before) / 1024


def median_ms(fn, device, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    from transformers import AutoModelForCausalLM, LlamaConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq + args.new_tokens)
    name = fastattn.register_huggingface()
    torch.manual_seed(0)
    models = {"sdpa": AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)}
    models["fastattn"] = AutoModelForCausalLM.from_config(config, attn_implementation=name, dtype=dtype)
    models["fastattn"].load_state_dict(models["sdpa"].state_dict())
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    probe = torch.zeros(1, 1, 1, args.width // args.heads, device=device, dtype=dtype)
    reasons = fastattn.backend.refusals("flash", probe, probe, probe)
    print(f"device {device}, dtype {dtype}, fastattn path: "
          + ("Triton kernels" if not reasons else "torch fallback (" + "; ".join(reasons) + ")"))
    logits = {}
    for impl, model in models.items():
        model.to(device).eval()
        with torch.no_grad():
            logits[impl] = model(ids).logits.float()
            fwd = median_ms(lambda: model(ids), device, args.reps)
            mem = peak_mb(lambda: model(ids), device)
            gen = median_ms(lambda: model.generate(ids[:, :128], max_new_tokens=args.new_tokens, do_sample=False,
                                                   pad_token_id=0), device, max(1, args.reps // 2))
        print(f"{impl:9} forward {fwd:9.2f} ms   peak {mem:8.1f} MB   generate {args.new_tokens} tokens {gen:9.2f} ms")
    diff = (logits["fastattn"] - logits["sdpa"]).abs().max().item()
    print(f"max |logits difference| {diff:.3e} (logit scale {logits['sdpa'].abs().max().item():.2f})")


if __name__ == "__main__":
    main()
