"""
bench.py -- flowzoo's speed table for the current device. A benchmark, not a test: nothing here asserts a timing.

    python bench.py                 # every group on the default device (CUDA if present)
    python bench.py --only common   # one group
    python bench.py --device cpu

Each group yields rows (model, variant, train step ms, samples/s, peak memory MB, note) and ratios between variants;
model files add their group with the @bench decorator below.
"""
import argparse
import time

import torch

import common

GROUPS = {}


def bench(name):
    def register(fn):
        GROUPS[name] = fn
        return fn
    return register


def timeit(fn, device, warmup=2, iters=5) -> float:
    """Median wall time of fn() in ms (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mb(device) -> float | None:
    if device.type != "cuda":
        return None
    mb = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return mb


@bench("common")
def bench_common(device):
    """The shared transformer: a training step, and decoding with the preallocated KV cache vs recomputing the prefix."""
    dim, heads, depth, T, B = (256, 4, 4, 64, 16) if device.type == "cpu" else (1024, 16, 8, 256, 16)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([common.Block(dim, heads) for _ in range(depth)]).to(device)
    x = torch.randn(B, T, dim, device=device)
    opt = torch.optim.AdamW(blocks.parameters(), lr=1e-4)

    def forward(h, **kw):
        for b in blocks:
            h = b(h, causal=True, **kw)
        return h

    def step():
        forward(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timeit(step, device)
    yield dict(model="common", variant=f"Block x{depth} d{dim} train step", ms=ms, per_s=B / ms * 1e3,
               mem=peak_mb(device), note=f"B={B} T={T}")

    @torch.no_grad()
    def decode_cached():
        caches = [b.attn.new_cache(B, T, device) for b in blocks]
        for t in range(T):
            h = x[:, t:t + 1]
            for b, c in zip(blocks, caches):
                h = b(h, causal=True, cache=c)

    @torch.no_grad()
    def decode_recompute():
        for t in range(T):
            forward(x[:, :t + 1])

    cached, recompute = timeit(decode_cached, device, 1, 3), timeit(decode_recompute, device, 1, 3)
    yield dict(model="common", variant="decode, KV cache", ms=cached, per_s=B / cached * 1e3, mem=peak_mb(device),
               note=f"{T} tokens")
    yield dict(model="common", variant="decode, recompute prefix", ms=recompute, per_s=B / recompute * 1e3,
               mem=peak_mb(device), note=f"{T} tokens")
    yield dict(ratio="KV-cache decoding speed-up over recomputing the prefix", value=recompute / cached)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(GROUPS), nargs="*", help="groups to run (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'model':<10} {'variant':<40} {'ms':>10} {'items/s':>10} {'peak MB':>9}  note")
    ratios = []
    for name in args.only or GROUPS:
        for row in GROUPS[name](device):
            if "ratio" in row:
                ratios.append(row)
                continue
            mem = f"{row['mem']:.0f}" if row["mem"] is not None else "-"
            print(f"{row['model']:<10} {row['variant']:<40} {row['ms']:>10.2f} {row['per_s']:>10.1f} {mem:>9}  "
                  f"{row['note']}")
    for r in ratios:
        print(f"ratio: {r['ratio']}: {r['value']:.2f}x")


if __name__ == "__main__":
    main()
