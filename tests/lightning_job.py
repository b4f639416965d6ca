"""A `lightning.Trainer` run with softshare's callback as a script (tests/test_train_lightning.py): a
timm-style ResNet shared with k=2 learns which half of an image is brighter; checkpoints every epoch
(last.ckpt) and continues from the last one. KILL_AT=pass,batch SIGKILLs this process there."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning
import torch
from torch import nn

from helpers import TinyResNet, brighter_half
import softshare
from softshare.train.lightning import SoftshareCallback


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = softshare.share(TinyResNet(num_classes=2, width=4, depth=2), 2)
        self.passes, self.kill_at = -1, None

    def forward(self, x):
        return self.net(x)

    def on_train_epoch_start(self):
        self.passes += 1

    def training_step(self, batch, index):
        if self.kill_at == (self.passes, index):
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def main(out: str) -> None:
    lightning.seed_everything(0, workers=True)
    x, y = brighter_half(256)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*brighter_half(128, seed=1)), batch_size=64)
    model = Classifier()
    kill = os.environ.get("KILL_AT")
    model.kill_at = tuple(int(v) for v in kill.split(",")) if kill else None
    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=Path(out) / "checkpoints", save_last=True)
    trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", devices=1, default_root_dir=out, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                                callbacks=[SoftshareCallback(recurrence_reg=0.1), checkpoints])
    last = Path(out) / "checkpoints" / "last.ckpt"
    trainer.fit(model, train, val, ckpt_path=last if last.exists() else None)
    print(json.dumps({"val_acc": float(trainer.callback_metrics["val_acc"])}))


if __name__ == "__main__":
    main(sys.argv[1])
