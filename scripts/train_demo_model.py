"""Train the small ImageGPT that ships in igpt_fast/demo/, so `igpt-fast generate` works offline.

What it learns: scikit-learn's bundled 8x8 handwritten digits (sklearn.datasets.load_digits, no download),
rendered as RGB strokes on black in each of four tints (held-out digits: one tint each), upsampled with PIL
bilinear to 16x16. 16x16 (256 positions) keeps the strokes recognizable while a full image is 256 decode
steps, a quarter of real iGPT.
The color palette is 16 clusters fit here by seeded k-means on the training pixels, so it covers black, the
four tints and the ramps between them that upsampling creates. Images are tokenized by igpt_fast's own
ImageProcessor with that palette. The last 100 digits are held out (never trained on) for evaluation.

The model is ImageGPT-architecture (vocab 17 = 16 clusters + SOS, 256 positions, 128 wide, 3 layers, 4
heads, 631k parameters, 2.5 MB), trained with igpt_fast.reference.ReferenceImageGPT: AdamW (warmup, then
cosine decay), next-token cross entropy on SOS + 256 pixel ids, seeded initialisation, k-means and data
order. The default run (600 steps of 32 images, ~2.8 epochs) is about 0.5 s a step on 2 idle CPU cores,
5 minutes in all (the shipped model took 13 on a busy machine), and reaches 0.59 bits/dim on the held-out
digits (a uniform model: log2(16) = 4); its next-token distributions are peaked (mean top probability
0.83). It writes a Hugging Face folder (config.json, model.safetensors, preprocessor_config.json) that
transformers' ImageGPTForCausalImageModeling.from_pretrained also loads. Everything is seeded, but a rerun
on another machine or torch version may round differently and end with a slightly different model.

Rerun (from the repository root; overwrites the shipped model):
    python scripts/train_demo_model.py
    python scripts/train_demo_model.py --out /tmp/demo --steps 50   # a quick try elsewhere
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from igpt_fast.checkpoint import save_pretrained
from igpt_fast.config import ImageGPTConfig
from igpt_fast.processor import ImageProcessor, resize_images
from igpt_fast.reference import ReferenceImageGPT

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "igpt_fast" / "demo"
# Stroke colors (RGB at full intensity); every training digit appears once in each.
TINTS = np.array([[255, 255, 255], [255, 150, 30], [70, 220, 90], [80, 150, 255]], dtype=np.float64)
HELD_OUT = 100  # the last digits of load_digits, kept out of training


def render_digits(images: np.ndarray, tint_ids: np.ndarray, size: int) -> np.ndarray:
    """load_digits images [N, 8, 8] (values 0..16) -> uint8 RGB [N, size, size, 3], digit i drawn in
    TINTS[tint_ids[i]], upsampled with PIL bilinear (what the image processor does)."""
    rgb = np.rint(images[..., None] / 16.0 * TINTS[tint_ids][:, None, None, :]).astype(np.uint8)
    return resize_images(list(rgb), size)


def digit_images():
    """(train [N, 8, 8], held_out [HELD_OUT, 8, 8]) in load_digits order."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    return images[:-HELD_OUT], images[-HELD_OUT:]


def held_out_pixels(size: int) -> np.ndarray:
    """The held-out digits as uint8 [HELD_OUT, size, size, 3], tints cycling through TINTS."""
    _, held_out = digit_images()
    return render_digits(held_out, np.arange(len(held_out)) % len(TINTS), size)


def kmeans(points: np.ndarray, k: int, seed: int, iters: int = 40) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding: points [N, 3] -> centers [k, 3], sorted by brightness."""
    rng = np.random.default_rng(seed)
    centers = [points[rng.integers(len(points))]]
    for _ in range(k - 1):  # k-means++: next center drawn with probability ~ squared distance to the nearest
        d2 = ((points[:, None, :] - np.array(centers)[None]) ** 2).sum(-1).min(1)
        centers.append(points[rng.choice(len(points), p=d2 / d2.sum())])
    centers = np.array(centers)
    for _ in range(iters):
        assign = ((points[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            members = points[assign == j]
            if len(members):  # an empty cluster keeps its center
                centers[j] = members.mean(0)
    return centers[np.argsort(centers.sum(1), kind="stable")]


def build_dataset(size: int, n_clusters: int, seed: int):
    """(clusters [n_clusters, 3] float32 in [-1, 1], train ids int64 [N, size * size])."""
    train, _ = digit_images()
    tint_ids = np.repeat(np.arange(len(TINTS))[None], len(train), 0).reshape(-1)
    pixels = render_digits(np.repeat(train, len(TINTS), axis=0), tint_ids, size)  # [4 N, size, size, 3]
    flat = pixels.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
    sample = flat[np.random.default_rng(seed).choice(len(flat), size=min(len(flat), 30_000), replace=False)]
    clusters = np.clip(kmeans(sample, n_clusters, seed), -1.0, 1.0).astype(np.float32)
    processor = ImageProcessor(clusters, size=size)
    return clusters, processor(list(pixels))["input_ids"]


def init_weights(model: ReferenceImageGPT, config: ImageGPTConfig) -> None:
    """GPT-2's initialisation (embeddings and head N(0, 0.02), residual projections scaled by depth)."""
    for name, p in model.named_parameters():
        if p.dim() == 2:  # wte, wpe, lm_head and every Conv1D weight
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
            torch.nn.init.normal_(p, std=std)


def bits_per_dim(model: ReferenceImageGPT, ids: torch.Tensor, batch_size: int = 100) -> float:
    """Mean next-token NLL of ids [N, L] (pixels only; the SOS is prepended here) in bits."""
    sos = model.config.sos_token_id
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            inputs = torch.cat((torch.full_like(chunk[:, :1], sos), chunk[:, :-1]), dim=1)
            logits = model(inputs).logits
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk.reshape(-1), reduction="sum"
            ).item()
    return total / ids.numel() / math.log(2)


def train(args) -> Path:
    torch.manual_seed(args.seed)
    started = time.time()
    clusters, ids = build_dataset(args.size, args.clusters, args.seed)
    held_out = ImageProcessor(clusters, size=args.size)(list(held_out_pixels(args.size)))["input_ids"]
    print(
        f"data: {len(ids)} training sequences of {ids.shape[1]} pixels, {len(held_out)} held out, "
        f"{args.clusters} clusters ({time.time() - started:.1f} s)"
    )

    config = ImageGPTConfig(
        vocab_size=args.clusters + 1,
        n_positions=args.size * args.size,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    model = ReferenceImageGPT(config)
    init_weights(model, config)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
        ),
    )
    print(f"model: {config.num_parameters():,} parameters, {args.steps} steps of {args.batch_size}")

    data_order = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(ids), generator=data_order), 0
    sos = torch.full((args.batch_size, 1), config.sos_token_id, dtype=torch.int64)
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(ids):  # a fresh seeded permutation each epoch
            order, cursor = torch.randperm(len(ids), generator=data_order), 0
        targets = ids[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        logits = model(torch.cat((sos, targets[:, :-1]), dim=1)).logits  # SOS + pixels predict pixels
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            print(
                f"step {step:4d}  loss {loss.item():.4f}  {loss.item() / math.log(2):.3f} bits/dim  "
                f"lr {schedule.get_last_lr()[0]:.2e}  {time.time() - started:.0f} s",
                flush=True,
            )

    print(f"held-out: {bits_per_dim(model, held_out):.3f} bits/dim (uniform: {math.log2(args.clusters):.3f})")
    folder = save_pretrained(args.out, config, model.state_dict(), clusters=clusters, image_size=args.size)
    size_mb = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6
    print(f"wrote {folder} ({size_mb:.2f} MB) in {time.time() - started:.0f} s")
    return folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder to write")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation, k-means and data order")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    parser.add_argument("--size", type=int, default=16, help="image side: n_positions = size * size")
    parser.add_argument("--clusters", type=int, default=16, help="palette size: vocab_size = clusters + 1")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=3)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "size", "clusters", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


if __name__ == "__main__":
    train(parse_args())
