"""Driver of the kill-torture test (tests/test_reliability.py): run as a script, it trains a tiny
deterministic run straight, then again while killing it (SIGKILL at random instants, and
``os._exit`` at named points inside the save) and resuming with ``--resume auto`` semantics
until it completes; prints a JSON summary. Children are forked after the imports, so each
kill-and-resume costs training time, not interpreter start-up."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401  (imported once here, not in every child)
import torch  # noqa: E402

from softshare.checkpoint import load_checkpoint  # noqa: E402
from softshare.data import load_dataset  # noqa: E402
from softshare.storage import CRASH_ENV, NO_EXCHANGE_ENV  # noqa: E402
from softshare.train.config import resolve_config  # noqa: E402
from softshare.train.loop import train  # noqa: E402

EPOCHS = 4
# (crash point, force the two-rename fallback): the first kills the very first checkpoint write
POINTS = [("weights@last", False), ("between-best-and-last", False), ("half-swapped@last", True),
          ("state@last", False), ("synced@best", False), ("swapped@last", False), ("half-swapped@best", True),
          ("written@metrics.jsonl", False), ("written@last", True), ("swapped@last", True)]


def config(out: str):
    return resolve_config("digits_tiny", overrides={
        "out_dir": out, "name": "run", "epochs": EPOCHS, "batch_size": 256, "deterministic": True,
        "device": "cpu", "val_size": 0})


def child(out: str, env: dict[str, str]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ.update(env)
            train(config(out), resume="auto")
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def wait(pid: int, kill_after: float | None = None) -> int:
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(root: str, seed: int, kills: int) -> None:
    load_dataset("digits")  # its imports (scikit-learn) once here, not in every child
    rng = random.Random(seed)
    straight, tortured = os.path.join(root, "straight"), os.path.join(root, "tortured")
    began = time.monotonic()
    assert wait(child(straight, {})) == 0
    one_run = time.monotonic() - began
    codes = []
    for point, fallback in POINTS:
        env = {CRASH_ENV: point, NO_EXCHANGE_ENV: "1" if fallback else "0"}
        codes.append((point, wait(child(tortured, env))))
    for _ in range(kills):
        codes.append(("random", wait(child(tortured, {CRASH_ENV: "", NO_EXCHANGE_ENV: "0"}),
                                      kill_after=rng.uniform(0.0, one_run / 2))))
    final = wait(child(tortured, {CRASH_ENV: ""}))
    a = load_checkpoint(os.path.join(straight, "run", "checkpoints", "last")).state_dict
    last = load_checkpoint(os.path.join(tortured, "run", "checkpoints", "last"))
    best = load_checkpoint(os.path.join(tortured, "run", "checkpoints", "best"), train_state=False)
    leftovers = [os.path.join(d, f) for d, dirs, files in os.walk(tortured) for f in dirs + files
                 if f.endswith(".tmp") or ".old-" in f or ".previous-" in f]
    epochs = [json.loads(line)["epoch"] for line in
              open(os.path.join(tortured, "run", "metrics.jsonl")).read().splitlines()]
    print(json.dumps({
        "codes": codes, "final": final, "one_run_s": one_run,
        "equal": a.keys() == last.state_dict.keys() and all(torch.equal(a[k], last.state_dict[k]) for k in a),
        "last_epoch": last.meta["epoch"], "best_epoch": best.meta["epoch"],
        "last_records_best_epoch": last.train_state["best_epoch"], "leftovers": leftovers, "epochs": epochs}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
