"""`EncoderTraining`: pre-train UniKE's knowledge encoders on cached knowledge states (Section 3.3, D.3).

`python train.py fit --config configs/train/unike_encoders.yaml` runs it with
`datamodules.knowledge_states.KnowledgeStatesData`. No backbone runs: the states were extracted once by
`python -m knowledge.mine`, and the encoders are built in `setup` from their width and layers.

Per layer, each step minimises Eq. 4 (truthfulness space) + Eq. 5 (semantic space) + the least-squares
fit of W_zeta (`editors/unike_encoders.py`), averaged over the layers; Adam, lr 1e-4 as the paper.
Logged: `train/loss` and its parts; `val/loss` and its parts, and what the spaces are for:

- `val/sem_top1`: share of validation h_sem whose nearest (cosine) Enc_Sem(h_pos) in the batch is its
  own triplet's; `val/sem_top1_fact`: ... is one of the same fact (other wordings and renderings of one
  fact are near-duplicates); `_raw` twins: the same with the raw h_pos (no encoder), the baseline.
- `val/tru_acc`: share of validation h_pos / h_neg that nearest-centroid classification in the
  truthfulness space (centroids: the validation set's mean Enc_Tru(h_pos), mean Enc_Tru(h_neg)) calls
  right; `val/tru_acc_raw`: the same on raw states.
- `val/zeta_r2`: how much of the variance of h_pos - h_neg W_zeta explains from the truthfulness difference.

Each is also logged per layer (`val/sem_top1/-1`, ...). A `ModelCheckpoint` in the YAML keeps the best
epoch by `val/loss`; at the end of fit its encoders are exported to `export_path` as a safetensors
checkpoint for the backbone the states came from (`load_encoders` refuses it for another).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from editors.checkpoint import fingerprint_diff
from editors.unike_encoders import (
    KnowledgeEncoders,
    save_encoders,
    semantic_loss,
    truthfulness_loss,
    zeta_loss,
)
from knowledge.store import KnowledgeStoreError

#: Where the states' backbone key is kept in a Lightning `.ckpt` of this module.
CKPT_BACKBONE_KEY = "encoders_backbone_key"


class EncoderTraining(pl.LightningModule):
    """Train `KnowledgeEncoders` by contrastive learning on a `KnowledgeStatesData`'s states.

    Args:
        truth_dim, width, depth: the encoders' sizes (`KnowledgeEncoders`).
        lr: Adam's learning rate of the encoders (the paper: 1e-4).
        zeta_lr: Adam's learning rate of W_zeta (None: `lr`). Its fit is linear least squares, which
            1e-4 approaches slowly (world states, 20 epochs: R^2 0.2 where the closed-form fit on the
            same truthfulness space reaches 0.77).
        temperature: cosine similarities are divided by it in Eq. 4 and Eq. 5 (the paper's s is plain
            cosine similarity: 1.0).
        include_self: Eq. 4's sums include h_i itself, as the equation is written.
        sem_weight, tru_weight, zeta_weight: weights of Eq. 5, Eq. 4 and the W_zeta fit in the loss.
        export_path: where the best encoders are written at the end of fit; None writes nothing.
        torch_threads: intra-op threads (None: torch's default).
    """

    def __init__(
        self,
        truth_dim: int = 64,
        width: int = 256,
        depth: int = 2,
        lr: float = 1e-4,
        zeta_lr: float | None = None,
        temperature: float = 1.0,
        include_self: bool = True,
        sem_weight: float = 1.0,
        tru_weight: float = 1.0,
        zeta_weight: float = 1.0,
        export_path: str | None = None,
        torch_threads: int | None = None,
    ) -> None:
        super().__init__()
        if torch_threads is not None:
            # Small MLPs on 2 shared cores: a second intra-op thread only spins against other jobs.
            torch.set_num_threads(torch_threads)
        if not lr > 0 or not temperature > 0 or (zeta_lr is not None and not zeta_lr > 0):
            raise ValueError(
                f"EncoderTraining: lr, zeta_lr and temperature must be > 0, got {lr}, {zeta_lr} and {temperature}"
            )
        if min(sem_weight, tru_weight, zeta_weight) < 0:
            raise ValueError("EncoderTraining: loss weights must be >= 0")
        self.save_hyperparameters()
        self.encoders: KnowledgeEncoders | None = None
        self.states_backbone: dict[str, Any] = {}
        self._val: dict[str, list[torch.Tensor]] = {}

    # ----------------------------------------------------------------- life cycle
    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        # The states' backbone (checked against a live one by the data module, when it is given one).
        self.states_backbone = data.backbone
        if self.encoders is None:
            hp = self.hparams
            self.encoders = KnowledgeEncoders(data.hidden_size, data.layers, hp.truth_dim, hp.width, hp.depth)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        zeta = list(self.encoders.w_zeta.parameters())
        ids = {id(p) for p in zeta}
        encoders = [p for p in self.encoders.parameters() if id(p) not in ids]
        return torch.optim.Adam(
            [{"params": encoders, "lr": hp.lr}, {"params": zeta, "lr": hp.zeta_lr or hp.lr}], lr=hp.lr
        )

    # ----------------------------------------------------------------- losses
    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """The weighted loss and its parts (means over layers), and per-layer encodings for the metrics."""
        hp, enc = self.hparams, self.encoders
        parts = {"loss_sem": [], "loss_tru": [], "loss_zeta": []}
        encoded = []
        for k, layer in enumerate(enc.layers):
            sem, pos, neg = batch["sem"][:, k], batch["pos"][:, k], batch["neg"][:, k]
            tru_pos, tru_neg = enc.truthful(layer, pos), enc.truthful(layer, neg)
            sem_pos, sem_neg = enc.semantic(layer, pos), enc.semantic(layer, neg)
            parts["loss_tru"].append(truthfulness_loss(tru_pos, tru_neg, hp.temperature, hp.include_self))
            parts["loss_sem"].append(semantic_loss(sem, sem_pos, sem_neg, hp.temperature))
            parts["loss_zeta"].append(zeta_loss(enc, layer, pos, neg))
            encoded.append({"sem_pos": sem_pos, "tru_pos": tru_pos, "tru_neg": tru_neg})
        out = {name: torch.stack(values).mean() for name, values in parts.items()}
        out["loss"] = (
            hp.sem_weight * out["loss_sem"]
            + hp.tru_weight * out["loss_tru"]
            + hp.zeta_weight * out["loss_zeta"]
        )
        return out, encoded

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses, _ = self._losses(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["index"]))
        return losses["loss"]

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses, encoded = self._losses(batch)
        n = len(batch["index"])
        for name, value in losses.items():
            self.log(f"val/{name}", value, batch_size=n)
        fact = batch["fact"]
        same_fact = fact[:, None] == fact[None, :]
        for k, layer in enumerate(self.encoders.layers):
            sem = batch["sem"][:, k]
            for suffix, keys in (("", encoded[k]["sem_pos"]), ("_raw", batch["pos"][:, k])):
                nearest = (F.normalize(sem, dim=-1) @ F.normalize(keys, dim=-1).T).argmax(1)
                own = (nearest == torch.arange(n, device=nearest.device)).float()
                fact_hit = same_fact[torch.arange(n, device=nearest.device), nearest].float()
                self._keep(f"sem_top1{suffix}/{layer}", own)
                self._keep(f"sem_top1_fact{suffix}/{layer}", fact_hit)
            for name in ("tru_pos", "tru_neg"):
                self._keep(f"{name}/{layer}", encoded[k][name])
            self._keep(f"raw_pos/{layer}", batch["pos"][:, k])
            self._keep(f"raw_neg/{layer}", batch["neg"][:, k])
            diff = (encoded[k]["tru_pos"] - encoded[k]["tru_neg"]).detach()
            self._keep(f"zeta_pred/{layer}", self.encoders.zeta_map(layer, diff))
            self._keep(f"zeta_target/{layer}", batch["pos"][:, k] - batch["neg"][:, k])

    def _keep(self, name: str, value: torch.Tensor) -> None:
        self._val.setdefault(name, []).append(value.detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        got = {name: torch.cat(values) for name, values in self._val.items()}
        self._val = {}
        per_metric: dict[str, list[float]] = {}
        for layer in self.encoders.layers:
            values = {
                "sem_top1": got[f"sem_top1/{layer}"].mean().item(),
                "sem_top1_fact": got[f"sem_top1_fact/{layer}"].mean().item(),
                "sem_top1_raw": got[f"sem_top1_raw/{layer}"].mean().item(),
                "sem_top1_fact_raw": got[f"sem_top1_fact_raw/{layer}"].mean().item(),
                "tru_acc": centroid_accuracy(got[f"tru_pos/{layer}"], got[f"tru_neg/{layer}"]),
                "tru_acc_raw": centroid_accuracy(got[f"raw_pos/{layer}"], got[f"raw_neg/{layer}"]),
                "zeta_r2": explained_variance(got[f"zeta_pred/{layer}"], got[f"zeta_target/{layer}"]),
            }
            for name, value in values.items():
                self.log(f"val/{name}/{layer}", value)
                per_metric.setdefault(name, []).append(value)
        for name, values in per_metric.items():
            self.log(f"val/{name}", sum(values) / len(values))

    # ----------------------------------------------------------------- .ckpt (resuming) and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_BACKBONE_KEY] = self.states_backbone

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(CKPT_BACKBONE_KEY)
        if stored is not None and self.states_backbone and fingerprint_diff(stored, self.states_backbone):
            raise KnowledgeStoreError(
                "this training checkpoint was written for the states of another backbone; it cannot be resumed"
            )

    def on_fit_end(self) -> None:
        source = self._restore_best()
        if self.hparams.export_path is None or not self.trainer.is_global_zero:
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_score", None)
        data = self.trainer.datamodule
        path = save_encoders(
            self.hparams.export_path,
            self.encoders,
            self.states_backbone,
            extra_meta={
                "training": {
                    "weights_from": source,
                    "states": data.states.meta.get("folder"),
                    "n_train": len(data.train_rows),
                    "n_val": len(data.val_rows),
                    "global_step": int(self.global_step),
                    "epoch": int(self.current_epoch),
                    "monitor": getattr(callback, "monitor", None),
                    "best_score": None if best is None or not math.isfinite(float(best)) else float(best),
                    "hparams": {k: v for k, v in self.hparams.items() if not k.startswith("_")},
                }
            },
        )
        print(f"encoders: exported to {path} (weights from {source})", flush=True)

    def _restore_best(self) -> str:
        """Load the best `.ckpt`'s encoder weights when a ModelCheckpoint kept one; returns where they come from."""
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not path:
            return "last"
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        prefix = "encoders."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        self.encoders.load_state_dict(state, strict=True)
        return str(path)


def centroid_accuracy(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Share of `pos` and `neg` rows whose nearer centroid (cosine; the two sets' means) is their own set's."""
    centroids = F.normalize(torch.stack([pos.mean(0), neg.mean(0)]), dim=-1)
    pos_right = (F.normalize(pos, dim=-1) @ centroids.T).argmax(1) == 0
    neg_right = (F.normalize(neg, dim=-1) @ centroids.T).argmax(1) == 1
    return torch.cat([pos_right, neg_right]).float().mean().item()


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SSE / SST of `pred` against `target` (rows are samples); 0 when the target does not vary."""
    total = (target - target.mean(0)).pow(2).sum()
    if total <= 0:
        return 0.0
    return (1 - (pred - target).pow(2).sum() / total).item()
