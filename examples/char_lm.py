"""A small character-level causal language model with and without flooding, on Shakespeare's sonnets.

The text (``examples/data/sonnets.txt``, ~14 KB, public domain) is small enough that a tiny transformer
memorizes it within minutes on a CPU: without flooding the training loss keeps falling and the validation
loss turns up (overfitting). With flooding (Ishida et al., 2020) the training loss floats around ``b`` --
gradient descent above it, ascent below it -- and the validation loss stays lower.

The loss is computed by ``flood_kernels.linear.LinearFloodedCrossEntropyLoss`` on the final hidden states and
the LM head's weight (the fused linear + flooded cross-entropy: the logits of a chunk of tokens at a time).

    python examples/char_lm.py                        # the full run (a few minutes on one CPU thread)
    python examples/char_lm.py --quick --out /tmp/lm  # seconds, for the tests
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir))
from flood_kernels import FloodedCrossEntropyLoss, available_backends, flooded_cross_entropy  # noqa: E402

try:
    from flood_kernels.linear import LinearFloodedCrossEntropyLoss
except ImportError:  # older builds without the fused linear variant: the LM head's logits, then the loss
    LinearFloodedCrossEntropyLoss = None

TEXT = os.path.join(HERE, "data", "sonnets.txt")


class CharTransformer(nn.Module):
    """Token + position embeddings, pre-norm causal transformer blocks; the LM head is applied by the loss."""

    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def hidden(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position[:t]
        return self.norm(self.blocks(x, mask=self.mask[:t, :t], is_causal=True))


def make_loss(flood_level: float, flood: Optional[str]):
    """``loss(model, hidden, targets) -> (loss, raw)`` through the fused linear loss when it is available."""
    if LinearFloodedCrossEntropyLoss is not None:
        module = LinearFloodedCrossEntropyLoss(flood_level=flood_level, flood=flood)

        def fused(model: CharTransformer, h: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
            loss = module(h.reshape(-1, h.shape[-1]), model.head.weight, y.reshape(-1), model.head.bias)
            raw = getattr(module, "last_raw_loss", None)
            return loss, (raw if raw is not None else loss.detach())

        return fused
    module = FloodedCrossEntropyLoss(flood_level=flood_level, flood=flood)

    def dense(model: CharTransformer, h: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        loss = module(model.head(h).reshape(-1, model.head.out_features), y.reshape(-1))
        return loss, module.last_raw_loss

    return dense


def batches(data: Tensor, batch: int, context: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
    idx = start.unsqueeze(1) + torch.arange(context + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: CharTransformer, data: Tensor, context: int) -> float:
    """Mean next-character loss (nats) over the whole split, in non-overlapping windows."""
    model.eval()
    n = (len(data) - 1) // context
    x = data[: n * context].reshape(n, context)
    y = data[1: n * context + 1].reshape(n, context)
    logits = model.head(model.hidden(x))
    loss = flooded_cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), flood=None)
    model.train()
    return float(loss)


def train(b: float, args: argparse.Namespace, train_data: Tensor, val_data: Tensor, vocab: int) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    model = CharTransformer(vocab, args.context, args.dim, args.layers, args.heads, args.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    loss_fn = make_loss(b, "batch" if b > 0 else None)
    g = torch.Generator().manual_seed(args.seed)
    train_curve: List[float] = []
    val_curve: List[Tuple[int, float]] = []
    for step in range(1, args.steps + 1):
        x, y = batches(train_data, args.batch, args.context, g)
        loss, raw = loss_fn(model, model.hidden(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_curve.append(float(raw))
        if step % args.eval_every == 0 or step == args.steps:
            val_curve.append((step, evaluate(model, val_data, args.context)))
    vals = [v for _, v in val_curve]
    tail = train_curve[-max(1, len(train_curve) // 10):]
    return {"b": b, "train_curve": train_curve, "val_curve": val_curve, "best_val": min(vals),
            "best_step": val_curve[vals.index(min(vals))][0], "final_val": vals[-1],
            "final_train": sum(tail) / len(tail),
            "final_train_eval": evaluate(model, train_data, args.context)}


def table(runs: List[Dict[str, object]], args: argparse.Namespace, command: str, seconds: float, backend: str,
          sizes: Tuple[int, int, int]) -> str:
    lines = [
        "# Character-level LM on Shakespeare's sonnets: validation loss with and without flooding",
        "",
        f"Command: `{command}` ({seconds:.0f} s, {args.threads} CPU thread(s)). Loss: {backend}, kernel backend "
        f"`{available_backends('cpu')[0]}`, torch {torch.__version__}.",
        f"Data: {sizes[0]} training / {sizes[1]} validation characters (the last {args.val_fraction:.0%} of the "
        f"text), {sizes[2]} symbols. Model: causal transformer, {args.layers} layers, d={args.dim}, "
        f"{args.heads} heads, context {args.context}, dropout {args.dropout}; AdamW lr={args.lr}, "
        f"batch {args.batch} x {args.context} characters, {args.steps} steps, seed {args.seed}.",
        "Losses in nats per character. 'train (last 10%)': mean unflooded mini-batch loss over the last 10% of "
        "the steps; 'train (eval)': the final model on the whole training text.",
        "",
        "| flood level b | train (last 10%) | train (eval) | final val | best val (step) |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        name = "none (plain CE)" if r["b"] == 0 else f"{r['b']:g}"
        lines.append(f"| {name} | {r['final_train']:.3f} | {r['final_train_eval']:.3f} | {r['final_val']:.3f} | "
                     f"{r['best_val']:.3f} ({r['best_step']}) |")
    return "\n".join(lines) + "\n"


def plot(runs: List[Dict[str, object]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i}"
        label = "plain CE" if r["b"] == 0 else f"flood b={r['b']:g}"
        curve = torch.tensor(r["train_curve"])
        window = max(1, len(curve) // 50)
        smooth = curve.unfold(0, window, 1).mean(1) if len(curve) >= window else curve
        left.plot(range(window, window + len(smooth)), smooth, color=color, label=label)
        if r["b"] > 0:
            left.axhline(r["b"], color=color, linestyle=":", linewidth=1)
        steps, vals = zip(*r["val_curve"])
        right.plot(steps, vals, color=color, marker=".", label=label)
    left.set_title("training loss (unflooded, moving average); dotted: b")
    right.set_title("validation loss")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylabel("nats / character")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flood-levels", type=float, nargs="+", default=[0.0, 1.0, 1.5, 2.0, 2.5],
                   help="0 means no flooding (plain cross-entropy)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) for tests")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.dim, args.layers, args.context, args.batch = 12, 6, 16, 1, 16, 8
        args.flood_levels = [0.0, 3.0]
    return args


def main(argv: Optional[List[str]] = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = ("python examples/char_lm.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    text = open(TEXT, encoding="utf-8").read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(len(data) * (1 - args.val_fraction))
    train_data, val_data = data[:split], data[split:]
    backend = ("flood_kernels.linear.LinearFloodedCrossEntropyLoss" if LinearFloodedCrossEntropyLoss is not None
               else "FloodedCrossEntropyLoss on the LM head's logits (flood_kernels.linear not available)")
    start = time.time()
    runs = []
    for b in args.flood_levels:
        run = train(b, args, train_data, val_data, len(chars))
        print(f"  b={b:g}: train {run['final_train']:.3f}, val final {run['final_val']:.3f}, best "
              f"{run['best_val']:.3f} at step {run['best_step']}", flush=True)
        runs.append(run)
    seconds = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    out = table(runs, args, command, seconds, backend, (len(train_data), len(val_data), len(chars)))
    with open(os.path.join(args.out, "char_lm.md"), "w") as f:
        f.write(out)
    plot(runs, os.path.join(args.out, "char_lm.png"))
    print(out)
    assert all(math.isfinite(r["final_val"]) for r in runs)
    return out


if __name__ == "__main__":
    main()
