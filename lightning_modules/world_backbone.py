"""`WorldBackboneTraining`: teach a world backbone (received by injection) its world, in two stages.

Stage 0: the vision tower alone learns colour, shape and pattern through linear heads on its
mean-pooled patch tokens. Learning *which entity* a picture shows through the language-model loss
alone was the slow part in the feasibility runs; attribute heads make the tower see first.
Stage 1: the tower is frozen and the projector (or Q-Former) and the language model learn the facts
through `vlm.loss`, the same prompt layout and label masking that editing uses.

Which stage a batch belongs to is read off the batch (`WorldTrainData` yields the whole schedule in
order), so one `train.py fit` runs both. At the end of fit the backbone is written with
`save_pretrained` to `output_dir`, where `LlavaVLM(pretrained=...)` / `Blip2OptVLM(pretrained=...)`
load it like any real checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from backbones.base import VLM
from world.backbones import save_backbone


class WorldBackboneTraining(pl.LightningModule):
    """Train a world backbone.

    Args:
        backbone: the model to train (`world.backbones.WorldLlavaVLM` or `WorldBlip2VLM`).
        output_dir: where the trained backbone is saved (model, tokenizer, image processor).
        lr: peak AdamW learning rate of both stages.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up at the start of each stage; cosine decay to 10% after it.
        torch_threads: intra-op threads (None: torch's default). On 2 shared cores 1 thread avoids
            OpenMP spin-waiting against other processes, which cost 5x in our measurements.
        stage0_through_projector: stage 0 trains the projector with the vision tower, its heads
            reading what the language model will read (`VLM.image_features`), and stage 1 freezes
            only the tower. BLIP-2's own recipe: its Q-Former learns to extract the picture before
            it learns to talk, instead of starting from scratch under the language-model loss.
    """

    def __init__(
        self,
        backbone: VLM,
        output_dir: str = "checkpoints/world_llava",
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 30,
        torch_threads: int | None = None,
        stage0_through_projector: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.backbone = backbone
        self.through_projector = stage0_through_projector
        if stage0_through_projector:
            width = backbone.text_config().hidden_size
        else:
            width = backbone.vision_modules()[0].config.hidden_size
        # Colour, shape and pattern heads; 16 classes covers every attribute list of `world.config`.
        self.heads = nn.ModuleList([nn.Linear(width, 16) for _ in range(3)])
        self._stage = 0
        self._stage_steps = (0, 0)
        self._times: dict[str, float] = {}
        self._start = 0.0

    # ----------------------------------------------------------------- schedule
    def on_fit_start(self) -> None:
        data = self.trainer.datamodule
        self._stage_steps = (data.stage0_steps, data.stage1_steps)
        self._start = time.perf_counter()
        # The backbone stays in eval mode: its dropout (OPT, Q-Former) only slows learning a small
        # closed world, and the towers have no other train-mode behaviour.
        self.backbone.model.eval()

    def _lr_factor(self, step: int) -> float:
        s0, s1 = self._stage_steps or (0, 0)
        local, total = (step, s0) if step < s0 else (step - s0, s1)
        warm = self.hparams.warmup_steps
        if local < warm:
            return (local + 1) / warm
        progress = (local - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- steps
    def _enter_stage1(self) -> None:
        self._times["stage0_s"] = time.perf_counter() - self._start
        self._stage = 1
        for module in self.backbone.vision_modules():
            for p in module.parameters() if isinstance(module, nn.Module) else [module]:
                p.requires_grad_(False)
        for p in self.heads.parameters():
            p.requires_grad_(False)

    def attribute_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        vlm = self.backbone
        inputs = {k: v.to(self.device) for k, v in vlm.image_inputs(batch["images"]).items()}
        if self.through_projector:
            pooled = torch.stack([f.mean(0) for f in vlm.image_features(inputs)])
        else:
            tower = vlm.vision_modules()[0]
            # Patch tokens only (position 0 is CLS in both CLIP and BLIP-2 towers): what the LM will read.
            pooled = tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 1:].mean(1)
        labels = batch["labels"]
        losses = [
            nn.functional.cross_entropy(head(pooled), labels[:, i]) for i, head in enumerate(self.heads)
        ]
        acc = torch.stack(
            [(h(pooled).argmax(-1) == labels[:, i]).float().mean() for i, h in enumerate(self.heads)]
        )
        return sum(losses) / len(losses), acc.mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, dict):
            loss, acc = self.attribute_loss(batch)
            self.log("train/attr_acc", acc, prog_bar=True, batch_size=len(batch["images"]))
            self.log("train/attr_loss", loss, prog_bar=True, batch_size=len(batch["images"]))
            return loss
        if self._stage == 0:
            self._enter_stage1()
        loss = self.backbone.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    # ----------------------------------------------------------------- output
    def on_fit_end(self) -> None:
        if self.trainer.global_rank != 0:
            return
        total = time.perf_counter() - self._start
        self._times.setdefault("stage0_s", total)
        self._times["stage1_s"] = total - self._times["stage0_s"]
        self._times["total_s"] = total
        self.backbone.model.eval()
        out = save_backbone(self.backbone, self.hparams.output_dir)
        summary = {
            "steps": int(self.global_step),
            "stage_steps": list(self._stage_steps),
            "seconds": {k: round(v, 1) for k, v in self._times.items()},
            "threads": torch.get_num_threads(),
            "hparams": {k: v for k, v in self.hparams.items() if isinstance(v, int | float | str | None)},
        }
        (Path(out) / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"world backbone: saved to {out} after {total:.0f}s ({summary['seconds']})", flush=True)
