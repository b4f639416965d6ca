"""A `softshare.fit` run as a script (tests/test_train_fit.py): a timm-style ResNet shared with k=2,
trained on a slice of Fashion-MNIST with resume="auto", LSM history and the recurrence regulariser.
With KILL_AT=pass,batch[,SIGNAL] it sends itself SIGNAL (default SIGKILL: a kill -9 at a known instant;
INT: the stop request that checkpoints mid-epoch) when this process's pass over the data reaches that
batch. Prints the run directory."""

from __future__ import annotations

import os
import signal
import sys

import torch

from helpers import TinyResNet
import softshare
from softshare.data import load_dataset


class Batches:
    """Shuffled (x, y) batches of a slice of Fashion-MNIST, as a DataLoader would give them."""

    def __init__(self, x, y, batch_size, kill_at=None, sig=signal.SIGKILL):
        self.x, self.y, self.batch_size, self.kill_at, self.sig, self.epoch = x, y, batch_size, kill_at, sig, -1

    def __len__(self):
        return len(self.y) // self.batch_size

    def __iter__(self):
        self.epoch += 1
        order = torch.randperm(len(self.y))  # from the torch RNG: fit seeds it per epoch
        for b in range(len(self)):
            if self.kill_at == (self.epoch, b):
                os.kill(os.getpid(), self.sig)
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[index], self.y[index]


def main(out: str) -> None:
    data = load_dataset("fashion_mnist")
    mean, std = data.mean[0], data.std[0]
    x = (data.train_images[:1024].float() / 255 - mean) / std
    kill = os.environ.get("KILL_AT", "").split(",")
    kill_at = (int(kill[0]), int(kill[1])) if kill[0] else None
    sig = getattr(signal, f"SIG{kill[2]}") if len(kill) > 2 else signal.SIGKILL
    train = Batches(x, data.train_labels[:1024], 64, kill_at, sig)
    test_x = (data.test_images[:256].float() / 255 - mean) / std
    val = list(zip(test_x.split(128), data.test_labels[:256].split(128)))
    torch.manual_seed(0)
    model = softshare.share(TinyResNet(width=8), 2)
    run = softshare.fit(model, train, val, epochs=3, lr=1e-2, optimizer="adam", lsm_every=1, recurrence_reg=0.1,
                        deterministic=True, device="cpu", out_dir=out, name="resnet", resume="auto")
    print(run)


if __name__ == "__main__":
    main(sys.argv[1])
