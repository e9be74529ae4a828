"""Consistency checks a test switches on (`TrainConfig.debug_checks`): each rank writes what it
holds to OUT/debug/rank{r}.json, so a test can compare ranks after a Ray Train run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from capfilt.model.losses import MEDObjectives


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over named tensors' bytes, in name order: equal digests mean equal values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DebugChecks:
    """Per step, checks that this rank's momentum features sit in the ITC queue at its offset of the
    global batch; at the end, writes them with digests of weights and queue to out/debug/rank{r}.json."""

    def __init__(self, objectives: MEDObjectives, rank: int, world: int) -> None:
        self.objectives, self.rank, self.world = objectives, rank, world
        self.rows: list[dict[str, Any]] = []
        self.ptr = 0

    def before(self) -> None:
        if self.objectives.itc:
            self.ptr = int(self.objectives.queue_ptr)

    @torch.no_grad()
    def after(self, step: int, batch: dict[str, Tensor]) -> None:
        obj = self.objectives
        if not obj.itc:
            return
        # The momentum encoders change only inside forward, so these are the features just enqueued.
        img, txt = obj.momentum_features(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        b = img.shape[0]
        slots = (self.ptr + self.rank * b + torch.arange(b, device=img.device)) % obj.queue_size
        err = max(
            (obj.image_queue[:, slots].float() - img.t()).abs().max().item(),
            (obj.text_queue[:, slots].float() - txt.t()).abs().max().item(),
        )
        self.rows.append(
            {
                "step": step,
                "ptr_before": self.ptr,
                "ptr_after": int(obj.queue_ptr),
                "own_error": err,
                "pairs": batch["image_ids"].tolist(),  # which images this rank trained on
            }
        )

    def write(self, out: Path, step: int) -> None:
        obj = self.objectives
        state = obj.state_dict()
        queues = {
            k: v for k, v in state.items() if k in ("image_queue", "text_queue", "idx_queue", "queue_ptr")
        }
        record = {
            "rank": self.rank,
            "world": self.world,
            "step": step,
            "params_sha256": tensor_digest({k: v for k, v in state.items() if k not in queues}),
            "queue_sha256": tensor_digest(queues) if queues else None,
            "queue_ptr": int(obj.queue_ptr) if obj.itc else None,
            "queue_size": obj.queue_size if obj.itc else None,
            "rows": self.rows,
        }
        (out / "debug").mkdir(exist_ok=True)
        (out / "debug" / f"rank{self.rank}.json").write_text(json.dumps(record))
