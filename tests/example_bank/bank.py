"""A small bank written against snaptree: the example application of docs/testing.md.

Its correct functions come first. Under "Retry bugs" each function has one
of the bugs a re-run exposes, with the fix named in its docstring;
tests/test_testing.py shows ``snaptree.testing`` telling the two apart, and
tests/example_bank/test_bank.py is the application's own suite, which must
pass under ``--snaptree-chaos``.
"""

from __future__ import annotations

import random
import time
from typing import Any

import snaptree

#: The audit log kept outside the tree (it stands for a log shipped elsewhere).
AUDIT_LOG: list[tuple[str, str, int]] = []

#: E-mails sent (it stands for an SMTP server).
OUTBOX: list[tuple[str, str]] = []


class InsufficientFunds(Exception):
    pass


def send_email(to: str, text: str) -> None:
    OUTBOX.append((to, text))


def open_bank(uri: str) -> snaptree.Store:
    """Open the bank's store, as the application does when it starts."""
    return snaptree.open(uri)


def create(root: Any, balances: dict[str, int]) -> None:
    root["accounts"] = {
        name: {"balance": balance, "owner": f"{name}@example.com"}
        for name, balance in balances.items()
    }
    root["ledger"] = []
    root["doctors"] = {"alice": {"on_call": True}, "bob": {"on_call": True}}


def transfer(root: Any, src: str, dst: str, amount: int) -> int:
    """Move money and record it in the ledger, in the tree: safe to run again."""
    accounts = root["accounts"]
    if accounts[src]["balance"] < amount:
        raise InsufficientFunds(f"{src} has less than {amount}")
    accounts[src]["balance"] -= amount
    accounts[dst]["balance"] += amount
    ledger = root["ledger"]
    ledger.append({"n": len(ledger) + 1, "src": src, "dst": dst, "amount": amount})
    return accounts[src]["balance"]


def transfer_and_notify(store: snaptree.Store, src: str, dst: str, amount: int) -> int:
    """Transfer, then audit and e-mail once: after store.run returns, the commit happened."""
    balance = store.run(transfer, src, dst, amount)
    AUDIT_LOG.append((src, dst, amount))
    send_email(f"{src}@example.com", f"you sent {amount} to {dst}")
    return balance


def transfer_at(root: Any, src: str, dst: str, amount: int, at: float) -> int:
    """The time of the transfer is an argument, read once before store.run."""
    balance = transfer(root, src, dst, amount)
    root["ledger"][-1]["at"] = at
    return balance


def transfer_with_reference(root: Any, src: str, dst: str, amount: int) -> str:
    """The reference is derived from the tree, so every attempt computes the same one."""
    transfer(root, src, dst, amount)
    entry = root["ledger"][-1]
    entry["reference"] = f"T{entry['n']:06}"
    return entry["reference"]


def apply_batch(root: Any, batch: list[dict[str, Any]]) -> int:
    """Apply transfers given as a list, which it only reads."""
    for item in batch:
        transfer(root, item["src"], item["dst"], item["amount"])
    return len(batch)


def total(root: Any) -> int:
    return sum(account["balance"] for account in root["accounts"].values())


def go_off_call(root: Any, me: str, other: str) -> bool:
    """Leave the rota if the other doctor stays on call; read_current guards that check."""
    doctors = root["doctors"]
    snaptree.read_current(doctors[other])
    if doctors[other]["on_call"]:
        doctors[me]["on_call"] = False
        return True
    return False


def random_transfer(root: Any, rng: random.Random) -> None:
    """An operation for snaptree.testing.race: its numbers come from the race's rng."""
    names = sorted(root["accounts"])
    src, dst = rng.sample(names, 2)
    amount = rng.randint(1, 20)
    if root["accounts"][src]["balance"] >= amount:
        transfer(root, src, dst, amount)


# -- Retry bugs ----------------------------------------------------------------------


def transfer_audited(root: Any, src: str, dst: str, amount: int) -> int:
    """Bug: appends to a module-level list, once per attempt. Fix: transfer_and_notify."""
    balance = transfer(root, src, dst, amount)
    AUDIT_LOG.append((src, dst, amount))
    return balance


def transfer_emailing(root: Any, src: str, dst: str, amount: int) -> int:
    """Bug: sends an e-mail per attempt. Fix: transfer_and_notify."""
    balance = transfer(root, src, dst, amount)
    send_email(root["accounts"][src]["owner"], f"you sent {amount} to {dst}")
    return balance


def counting_transfers() -> Any:
    """Bug: a closure counts transfers, once per attempt. Fix: count in the tree (the ledger)."""
    made = 0

    def transfer_counted(root: Any, src: str, dst: str, amount: int) -> int:
        nonlocal made
        made += 1
        transfer(root, src, dst, amount)
        return made

    return transfer_counted


def transfer_stamped(root: Any, src: str, dst: str, amount: int) -> int:
    """Bug: reads the clock, so a retry commits another time. Fix: transfer_at."""
    balance = transfer(root, src, dst, amount)
    root["ledger"][-1]["at"] = time.time()
    return balance


def transfer_with_random_reference(root: Any, src: str, dst: str, amount: int) -> str:
    """Bug: an unseeded random reference differs per attempt. Fix: transfer_with_reference."""
    transfer(root, src, dst, amount)
    entry = root["ledger"][-1]
    entry["reference"] = f"R{random.randrange(10**6):06}"
    return entry["reference"]


def apply_batch_consuming(root: Any, batch: list[dict[str, Any]]) -> int:
    """Bug: empties the list it was given, so a retry applies nothing. Fix: apply_batch."""
    applied = 0
    while batch:
        item = batch.pop(0)
        transfer(root, item["src"], item["dst"], item["amount"])
        applied += 1
    return applied


def go_off_call_unguarded(root: Any, me: str, other: str) -> bool:
    """Bug: checks the other doctor without read_current, so both may leave (write skew)."""
    doctors = root["doctors"]
    if doctors[other]["on_call"]:
        doctors[me]["on_call"] = False
        return True
    return False


def charge_fee_lossy(root: Any, rng: random.Random) -> None:
    """Bug: takes a fee from an account and credits nobody, so money disappears."""
    names = sorted(root["accounts"])
    account = root["accounts"][rng.choice(names)]
    if account["balance"] >= 1:
        account["balance"] -= 1
