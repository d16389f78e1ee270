"""A training process to kill: trains a small model and saves checkpoints, optionally SIGKILLing itself just before
the N-th file-system call of a save that ends a stage (``makedirs``, ``fsync`` after each file is written,
``rename``/``replace``, ``rmtree``), so a test can stop a save at each of its stages with a real kill.

    python fault_injection.py OUT_DIR PHASE KILL_AT

PHASE ``first``: train 3 steps and save ``OUT_DIR/ckpt`` (no older copy). PHASE ``replace``: train 2 steps, save
``OUT_DIR/ckpt`` completely, train a third step and save ``OUT_DIR/ckpt`` again over it. KILL_AT counts the calls of
the armed save (the last one); -1 never kills and prints the number of calls instead. PHASE ``long``: trains
``KILL_AT`` steps, saving ``OUT_DIR/checkpoint-N`` after every step, for a parent that kills it at a random time.
"""
import os
import shutil
import signal
import sys

import torch
from torch import nn

from mmlatent.train import EpochBatches, TrainConfig, Trainer


def make_run(output_dir=None, max_steps=6, save_every=0, lr=3e-2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.2), nn.ReLU(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(40, 4, generator=g)
    records = [(x, x.sum(0, keepdim=True)) for x in xs]

    def collate(items, epoch):
        return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    def loss_fn(m, batch):
        return ((m(batch["x"]) - batch["y"]) ** 2).mean()

    config = TrainConfig(max_steps=max_steps, lr=lr, warmup_steps=2, grad_accum=2, clip=1.0, seed=0,
                         output_dir=output_dir, save_every=save_every, progress=False)
    return model, Trainer(model, loss_fn, EpochBatches(records, 6, collate, seed=0), config)


class KillSwitch:
    """Counts the armed file-system calls and SIGKILLs this process just before call number ``kill_at``."""

    def __init__(self, kill_at: int):
        self.kill_at, self.calls, self.armed = kill_at, 0, False

    def wrap(self, owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            if self.armed:
                if self.calls == self.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.calls += 1
            return real(*args, **kwargs)
        setattr(owner, name, call)


def main(out_dir: str, phase: str, kill_at: int) -> None:
    if phase == "long":
        _, trainer = make_run(out_dir, max_steps=kill_at, save_every=1)
        trainer.fit()
        return
    switch = KillSwitch(kill_at)
    for owner, name in ((os, "rename"), (os, "replace"), (os, "fsync"), (os, "makedirs"), (shutil, "rmtree")):
        switch.wrap(owner, name)
    _, trainer = make_run()
    path = os.path.join(out_dir, "ckpt")
    if phase == "replace":
        trainer.fit(until=2)
        trainer.save(path)
    trainer.fit(until=3)
    switch.armed = True
    trainer.save(path)
    switch.armed = False
    print(switch.calls)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
