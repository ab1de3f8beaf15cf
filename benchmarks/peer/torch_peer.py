"""PyTorch peer: the same ternary model and optimizer as ``project_step.py``, timed the same way.

PyTorch is not a dependency of this project. Install it into its own environment:

    python3 -m venv /work/peer-venv && /work/peer-venv/bin/pip install torch numpy
    /work/peer-venv/bin/python benchmarks/peer/torch_peer.py                 # eager
    /work/peer-venv/bin/python benchmarks/peer/torch_peer.py --compile       # torch.compile

(The CPU-only wheel, ``pip install torch --index-url https://download.pytorch.org/whl/cpu``,
is smaller; the default CUDA wheel runs on the CPU just the same.)

The model follows ``nanochat/model`` and ``reference/``: tied token embedding (std 0.02); per
layer ``x += attn(rmsnorm(x))``, ``x += ffn(rmsnorm(x))``; BitLinear = per-group absmean
ternary weights (G = 128, scale rounded to float16) times per-token absmax int8 activations,
with the straight-through backward ``dX = dY W_q``, ``dW = dY^T X_q``; RoPE (NeoX half split,
theta 1e4), causal attention with scale 1/sqrt(hd), SwiGLU FFN, RMSNorm (eps 1e-6), no SubLN,
final RMSNorm, tied LM head, mean cross-entropy. Optimizer as the trainer's
``build_optimizers``: Muon (momentum 0.95, Nesterov, 5 quintic float32 Newton-Schulz steps,
lr 0.02 x sqrt(max(1, rows/cols))) on the BitLinear weights, AdamW (0.9, 0.95, eps 1e-8) at
0.01 on the embedding and 0.003 on the norms, global gradient clipping at 1.0, WSD schedule.
``--torch-muon`` uses ``torch.optim.Muon`` instead (its Newton-Schulz runs in bfloat16).

Rounding differs in one place: ``round`` here is half-to-even where the project rounds half
away from zero (ties are rare and this is a speed peer, not a numerics reference).
Prints one JSON line in ``project_step.py``'s format.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from statistics import median

import torch
import torch.nn.functional as F

SHAPES = {
    # name: (vocab, dim, layers, heads, ffn, seq, batch)
    "tiny": (4096, 256, 4, 4, 768, 256, 8),
    "nano_125m": (16384, 768, 12, 12, 3072, 1024, 16),  # the nano_125m preset's shape
}
GROUP = 128
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def weight_quant(w, group=GROUP):
    """Ternary q * s per row group; s = mean|w| over the group, rounded to float16."""
    m, k = w.shape
    g = w.reshape(m, k // group, group)
    s = g.abs().mean(dim=-1, keepdim=True).to(torch.float16).to(w.dtype)
    q = torch.where(s > 0, (g / s.clamp_min(1e-30)).round().clamp(-1, 1), torch.zeros_like(g))
    return (q * s).reshape(m, k)


def act_quant(x):
    """Per-token absmax int8: q * s with s = max|x| / 127."""
    s = x.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(s > 0, (x / s.clamp_min(1e-30)).round().clamp(-127, 127), torch.zeros_like(x))
    return q * s


def bitlinear(x, w):
    """Straight-through BitLinear: forward on quantized operands, backward dX = dY W_q, dW = dY^T X_q."""
    xq = x + (act_quant(x) - x).detach()
    wq = w + (weight_quant(w) - w).detach()
    return F.linear(xq, wq)


def rmsnorm(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def rope_tables(seq, hd, theta=10000.0):
    inv = theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv
    return ang.cos().float(), ang.sin().float()


def rope(x, cos, sin):
    """x [B, T, H, hd]; NeoX pairs (i, i + hd/2)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Model(torch.nn.Module):
    def __init__(self, vocab, dim, layers, heads, ffn, seq, seed=1337):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim, self.heads, self.hd = dim, heads, dim // heads
        self.tok = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) * 0.02)
        self.layers = torch.nn.ModuleList()
        out_gain = 1.0 / math.sqrt(2 * layers)

        def lin(out_dim, in_dim, gain=1.0):
            return torch.nn.Parameter(torch.randn(out_dim, in_dim, generator=g) * (gain / math.sqrt(in_dim)))

        for _ in range(layers):
            blk = torch.nn.Module()
            blk.attn_norm = torch.nn.Parameter(torch.ones(dim))
            blk.wq, blk.wk, blk.wv = lin(dim, dim), lin(dim, dim), lin(dim, dim)
            blk.wo = lin(dim, dim, out_gain)
            blk.ffn_norm = torch.nn.Parameter(torch.ones(dim))
            blk.w_gate, blk.w_up = lin(ffn, dim), lin(ffn, dim)
            blk.w_down = lin(dim, ffn, out_gain)
            self.layers.append(blk)
        self.norm = torch.nn.Parameter(torch.ones(dim))
        cos, sin = rope_tables(seq, self.hd)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens):
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        b, t = idx.shape
        x = F.embedding(idx, self.tok)
        cos, sin = self.cos[:t], self.sin[:t]
        for blk in self.layers:
            u = rmsnorm(x, blk.attn_norm)
            q = rope(bitlinear(u, blk.wq).view(b, t, self.heads, self.hd), cos, sin)
            k = rope(bitlinear(u, blk.wk).view(b, t, self.heads, self.hd), cos, sin)
            v = bitlinear(u, blk.wv).view(b, t, self.heads, self.hd)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            x = x + bitlinear(o.transpose(1, 2).reshape(b, t, self.dim), blk.wo)
            u = rmsnorm(x, blk.ffn_norm)
            x = x + bitlinear(F.silu(bitlinear(u, blk.w_gate)) * bitlinear(u, blk.w_up), blk.w_down)
        logits = F.linear(rmsnorm(x, self.norm).reshape(b * t, self.dim), self.tok)
        return F.cross_entropy(logits, targets.reshape(-1))


def newton_schulz(u, steps=5):
    x = u / (torch.linalg.norm(u) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon as reference/optim.py: float32 Newton-Schulz, Nesterov momentum, ``original`` lr scale."""

    def __init__(self, params, lr=0.02, momentum=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "buf" not in st:
                    st["buf"] = torch.zeros_like(p)
                buf = st["buf"]
                buf.lerp_(p.grad, 1.0 - beta)
                u = p.grad.lerp(buf, beta)
                rows, cols = p.shape
                p.add_(newton_schulz(u), alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))


def wsd(step, total, warmup=20, decay_frac=0.2, min_ratio=0.1):
    warm = (step + 1) / warmup if step < warmup else 1.0
    d = int(round(decay_frac * total))
    if d == 0 or step < total - d:
        return warm
    t = min(1.0, (step - (total - d) + 1) / d)
    return min(warm, min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward + backward")
    p.add_argument("--torch-muon", action="store_true", help="torch.optim.Muon (bfloat16 Newton-Schulz)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    vocab, dim, layers, heads, ffn, seq, batch = SHAPES[args.shape]
    batch = args.batch or batch
    model = Model(vocab, dim, layers, heads, ffn, seq)
    hidden = [q for n, q in model.named_parameters() if q.ndim == 2 and n.split(".")[-1].startswith("w")]
    norms = [q for n, q in model.named_parameters() if q.ndim == 1]
    if args.torch_muon:
        muon = torch.optim.Muon(hidden, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                                adjust_lr_fn="original")
    else:
        muon = Muon(hidden, lr=0.02)
    adamw = torch.optim.AdamW([dict(params=[model.tok], lr=0.01), dict(params=norms, lr=0.003)],
                              betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    opts = [(muon, [0.02]), (adamw, [0.01, 0.003])]
    loss_fn = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed)
    total = args.warmup + args.steps
    params = list(model.parameters())
    fwd, bwd, opt, tot, losses, cpu = [], [], [], [], [], []
    compile_s = None
    for step in range(total):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        c0 = time.process_time()
        t0 = time.perf_counter()
        for q in params:
            q.grad = None
        loss = loss_fn(tokens)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        mult = wsd(step, max(total, 2))
        for o, bases in opts:
            for grp, base in zip(o.param_groups, bases):
                grp["lr"] = base * mult
            o.step()
        t3 = time.perf_counter()
        losses.append(float(loss.detach()))
        if step == 0:
            compile_s = t3 - t0
        if step >= args.warmup:
            fwd.append(t1 - t0); bwd.append(t2 - t1); opt.append(t3 - t2); tot.append(t3 - t0)
            cpu.append(time.process_time() - c0)
    med = median(tot)
    mode = ("compiled" if args.compile else "eager") + (" + torch.optim.Muon" if args.torch_muon else "")
    print(json.dumps({
        "who": "torch", "mode": mode, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shape": args.shape, "batch": batch, "seq": seq, "params": sum(q.numel() for q in params),
        "steps": len(tot), "step_s": med, "tokens_per_s": batch * seq / med,
        "step_min_s": min(tot), "step_max_s": max(tot),
        "cpu_s": median(cpu), "forward_s": median(fwd), "backward_s": median(bwd), "optimizer_s": median(opt),
        "first_step_s": compile_s, "loss_first": losses[0], "loss_last": losses[-1],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
