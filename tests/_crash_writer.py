"""A writer process for the crash tests: commits transfers until it is killed.

Run as ``python _crash_writer.py DATA_FILE MODE THREADS SEED``, where MODE is
a durability mode, or ``batched`` (``group`` with ``store.run_batched``).
Each thread moves one unit between two accounts and stores its own
sequence number in the same transaction, continuing from the number the
file holds; after each call *returns* it prints ``THREAD SEQ`` on stdout:
what the store acknowledged. The test kills it with SIGKILL and checks
that every acknowledged number is in the file.
"""

from __future__ import annotations

import random
import sys
import threading
from typing import Any

import snaptree

ACCOUNTS = 100


def transfer(root: Any, source: str, target: str, thread: int, seq: int) -> None:
    accounts = root["accounts"]
    accounts[source]["balance"] -= 1
    accounts[target]["balance"] += 1
    root["seqs"][thread] = seq


def create(path: str, threads: int) -> None:
    """The file the writers start from: balanced accounts, every thread at seq 0."""
    with snaptree.open(path, durability="commit") as store:
        store.run(
            lambda root: root.update(
                accounts={f"a{i:03}": {"balance": 100} for i in range(ACCOUNTS)},
                seqs={t: 0 for t in range(threads)},
            )
        )


def check(store: snaptree.Store, acknowledged: dict[int, int]) -> str:
    """'' if the tree balances and holds every acknowledged sequence number, else what is wrong."""

    def read(root: Any) -> tuple[int, dict[int, int]]:
        total = sum(account["balance"] for account in root["accounts"].values())
        return total, dict(root["seqs"])

    total, seqs = store.run(read)
    if total != 100 * ACCOUNTS:
        return f"the balances add up to {total}, not {100 * ACCOUNTS}"
    for thread, seq in sorted(acknowledged.items()):
        if seqs.get(thread, 0) < seq:
            return f"thread {thread}: seq {seqs.get(thread, 0)} stored, {seq} acknowledged"
    return ""


def main(path: str, mode: str, threads: int, seed: int) -> None:
    durability = "group" if mode == "batched" else mode
    store = snaptree.open(path, durability=durability, sync_every=0.05)
    call = store.run_batched if mode == "batched" else store.run
    start = store.run(lambda root: dict(root["seqs"]))
    out = threading.Lock()

    def writer(thread: int) -> None:
        rng = random.Random(seed * 1000 + thread)
        seq = start[thread]
        while True:
            seq += 1
            a, b = rng.sample(range(ACCOUNTS), 2)
            call(transfer, f"a{a:03}", f"a{b:03}", thread, seq)
            with out:
                sys.stdout.write(f"{thread} {seq}\n")
                sys.stdout.flush()

    print("ready", flush=True)
    pool = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
