"""Where the shape signal stops: the diagnostics behind docs/results.md, "Why shape and count are
not learnt". An experiment script, not part of the product; run it from the repository root.

    captions CKPT [--world W]
        greedy captions of the test split's one-kind scenes: background, colour, shape and count
        of the first object mention against the truth
    encoder --stem patch|conv --readout cls|max [--world W] [--epochs E]
        the small ViT alone, trained on "which shapes does the scene hold" (six binary labels) from
        the human split; per-label accuracy on held-out images
    binding --stem patch|conv --readout attention|max|mean [--single] [--query-norm N] [--world W]
            [--steps S]
        the small ViT trained to name one object kind's shape; "attention" reads the tokens with one
        cross-attention layer whose query is the kind's colour (as ITM and the decoder read them)

A larger world for the last two: `capfilt data synth --out runs/big --web 100 --human 24000
--test 100 --seed 7`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import random
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from capfilt.data import iter_samples
from capfilt.model.config import med_config
from capfilt.model.vit import VisionTransformer
from capfilt.world.scene import OBJECT_COLOURS, SHAPES, object_kinds

COLOURS = list(OBJECT_COLOURS)


def _split(world: str, split: str) -> tuple[torch.Tensor, list[dict]]:
    """Images of a split as (N, 3, S, S) floats, roughly normalised, and their scene contents."""
    truth = {
        r["key"]: json.loads(r["content"])
        for r in pq.read_table(f"{world}/truth.parquet").to_pylist()
        if r["split"] == split
    }
    images, contents = [], []
    for s in iter_samples(f"{world}/{split}"):
        images.append(np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")))
        contents.append(truth[s.key])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - 0.45) / 0.27, contents


def captions(args: argparse.Namespace) -> None:
    from capfilt.inference import Captioner
    from capfilt.model.generate import GenerationConfig
    from capfilt.world.attributes import parse_caption

    _, contents = _split(args.world, "test")
    images = [
        np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in iter_samples(f"{args.world}/test")
    ]
    texts = Captioner(args.checkpoint, batch_size=64).caption(images, GenerationConfig(method="greedy"))
    right, seen = collections.Counter(), collections.Counter()
    for content, (text, *_) in zip(contents, texts):
        parsed, kinds = parse_caption(text), object_kinds(content)
        seen["background"] += 1
        right["background"] += parsed.background == content["background"]["colour"]
        if len(kinds) == 1 and parsed.objects:
            for attribute in ("colour", "shape", "count"):
                seen[attribute] += 1
                right[attribute] += getattr(parsed.objects[0], attribute) == getattr(kinds[0], attribute)
    print(json.dumps({a: round(right[a] / seen[a], 3) for a in seen} | {"one_kind_scenes": seen["shape"]}))


def _vit(stem: str) -> tuple[VisionTransformer, int]:
    config = dataclasses.replace(med_config("small").vision, stem=stem)
    return VisionTransformer(config), config.width


def _read(tokens: torch.Tensor, readout: str) -> torch.Tensor:
    if readout == "cls":
        return tokens[:, 0]
    if readout == "max":
        return tokens[:, 1:].amax(1)
    return tokens[:, 1:].mean(1)


def encoder(args: argparse.Namespace) -> None:
    x, contents = _split(args.world, "human")
    y = torch.tensor([[float(any(o["shape"] == s for o in c["objects"])) for s in SHAPES] for c in contents])
    train = int(len(x) * 0.75)
    vit, width = _vit(args.stem)
    head = nn.Linear(width, len(SHAPES))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    start, step = time.time(), 0
    for epoch in range(args.epochs):
        vit.train()
        for batch in torch.randperm(train).split(64):
            loss = nn.functional.binary_cross_entropy_with_logits(
                head(_read(vit(x[batch]), args.readout)), y[batch]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        vit.eval()
        with torch.no_grad():
            predicted = head(_read(vit(x[train:]), args.readout)) > 0
        accuracy = (predicted == (y[train:] > 0.5)).float().mean().item()
        print(f"epoch {epoch} step {step}: held-out accuracy {accuracy:.3f} ({time.time() - start:.0f} s)")


def binding(args: argparse.Namespace) -> None:
    x, contents = _split(args.world, "human")
    rng = random.Random(0)
    keep, queries, labels = [], [], []
    for i, content in enumerate(contents):
        kinds = object_kinds(content)
        if args.single and len(kinds) > 1:
            continue
        kind = rng.choice(kinds)
        keep.append(i)
        queries.append(COLOURS.index(kind.colour))
        labels.append(SHAPES.index(kind.shape))
    x, q, y = x[keep], torch.tensor(queries), torch.tensor(labels)
    train = len(x) - min(1000, len(x) // 5)
    vit, width = _vit(args.stem)
    colour = nn.Embedding(len(COLOURS), width)
    attention = nn.MultiheadAttention(width, 4, batch_first=True)
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(SHAPES)))
    if args.query_norm:  # a sharper attention from the start
        with torch.no_grad():
            colour.weight.mul_(args.query_norm / colour.weight.norm(dim=1, keepdim=True))
    params = [*vit.parameters(), *colour.parameters(), *attention.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)

    def logits(rows: torch.Tensor) -> torch.Tensor:
        tokens = vit(x[rows])
        if args.readout != "attention":
            return head(_read(tokens, args.readout))
        return head(attention(colour(q[rows])[:, None], tokens, tokens)[0][:, 0])

    start = time.time()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, train, (64,))
        loss = nn.functional.cross_entropy(logits(rows), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0:
            with torch.no_grad():
                accuracy = (logits(torch.arange(train, len(x))).argmax(1) == y[train:]).float().mean().item()
            print(
                f"step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f} ({time.time() - start:.0f} s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("captions")
    p.add_argument("checkpoint")
    p.add_argument("--world", default="runs/world0")
    p = sub.add_parser("encoder")
    p.add_argument("--stem", choices=["patch", "conv"], default="patch")
    p.add_argument("--readout", choices=["cls", "max", "mean"], default="cls")
    p.add_argument("--world", default="runs/world0")
    p.add_argument("--epochs", type=int, default=30)
    p = sub.add_parser("binding")
    p.add_argument("--stem", choices=["patch", "conv"], default="conv")
    p.add_argument("--readout", choices=["attention", "max", "mean"], default="attention")
    p.add_argument("--single", action="store_true", help="only scenes with one object kind")
    p.add_argument("--world", default="runs/big")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--query-norm", type=float, default=None, help="scale each colour query to this norm")
    args = parser.parse_args()
    torch.manual_seed(0)
    {"captions": captions, "encoder": encoder, "binding": binding}[args.command](args)


if __name__ == "__main__":
    main()
