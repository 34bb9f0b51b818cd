"""Write data/sample_model.json: a small bank and shop, the model the demo and docs import.

    .venv/bin/python scripts/make_sample_model.py [--out data/sample_model.json] [--check]

The output is deterministic (a fixed seed, no clock), so rerunning the script
reproduces the shipped file byte for byte; ``--check`` verifies that instead
of writing.

Shape (amounts are integer cents, dates ISO 8601 strings, so the JSON is exact)::

    {"accounts":  {"A0001": {"owner": "C0001", "currency": "EUR", "opened": "2021-..",
                             "balance": 123456, "entries": [{"id": "E000001", "date": ..,
                             "amount": 100000, "memo": "opening deposit"}, ...]}, ...},
     "customers": {"C0001": {"name": .., "email": .., "city": .., "accounts": ["A0001"],
                             "orders": [{"id": "O00001", "date": .., "status": ..,
                                         "lines": [{"sku": "P001", "qty": 2, "price": 1999}],
                                         "total": 3998}, ...]}, ...},
     "products":  {"P001": {"name": .., "price": 1999, "stock": 40}, ...},
     "meta":      {"total_balance": 100000000, "currency": "EUR", "generator": ..}}

Invariants a reader (or the demo, after concurrent transfers) can check:

* the balances of all accounts add up to exactly ``TOTAL_BALANCE`` cents
  (1,000,000.00 EUR);
* each account's balance is the sum of its entries' amounts;
* each order's total is the sum of qty * price over its lines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from pathlib import Path
from typing import Any

SEED = 20261125
ACCOUNTS = 400
CUSTOMERS = 300
PRODUCTS = 60
#: The sum of all account balances, in cents: 1,000,000.00 EUR.
TOTAL_BALANCE = 100_000_000

_FIRST = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim"]
_LAST = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson"]
_CITIES = ["Lyon", "Porto", "Gent", "Bergen", "Graz", "Turku", "Brno", "Cork", "Split"]
_CREDITS = ["salary", "transfer in", "refund", "interest"]
_DEBITS = ["card payment", "transfer out", "rent", "fee"]
_GOODS = ["notebook", "pencil", "lamp", "mug", "chair", "kettle", "scarf", "atlas", "clock"]
_STATUSES = ["delivered", "delivered", "delivered", "shipped", "cancelled"]


def _date(rng: random.Random, start: datetime.date, days: int) -> datetime.date:
    return start + datetime.timedelta(days=rng.randrange(days))


def _targets(rng: random.Random) -> list[int]:
    """ACCOUNTS positive balances (at least 100.00) that add up to TOTAL_BALANCE exactly."""
    floor = 10_000
    weights = [rng.paretovariate(1.5) for _ in range(ACCOUNTS)]
    spread = TOTAL_BALANCE - floor * ACCOUNTS
    scale = spread / sum(weights)
    balances = [floor + int(w * scale) for w in weights]
    balances[-1] += TOTAL_BALANCE - sum(balances)
    return balances


def build_model() -> dict[str, Any]:
    rng = random.Random(SEED)
    epoch = datetime.date(2021, 1, 1)

    products = {}
    for i in range(1, PRODUCTS + 1):
        products[f"P{i:03}"] = {
            "name": f"{rng.choice(_GOODS)} {rng.choice(['small', 'large', 'blue', 'oak'])}",
            "price": rng.randrange(199, 19_999, 100),
            "stock": rng.randrange(0, 200),
        }

    customers: dict[str, dict[str, Any]] = {}
    for i in range(1, CUSTOMERS + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        customers[f"C{i:04}"] = {
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{i}@example.org",
            "city": rng.choice(_CITIES),
            "accounts": [],
            "orders": [],
        }

    accounts = {}
    entry_id = 0
    customer_ids = sorted(customers)
    for i, target in enumerate(_targets(rng), start=1):
        account_id = f"A{i:04}"
        owner = customer_ids[(i - 1) % CUSTOMERS] if i <= CUSTOMERS else rng.choice(customer_ids)
        customers[owner]["accounts"].append(account_id)
        opened = _date(rng, epoch, 700)
        movements = []
        day = opened
        for _ in range(rng.randrange(2, 10)):
            day += datetime.timedelta(days=rng.randrange(1, 40))
            amount = rng.randrange(-4_000, 4_000) * 10
            memo = rng.choice(_CREDITS if amount >= 0 else _DEBITS)
            movements.append((day, amount, memo))
        # The opening deposit makes the balance the target: the movements are
        # at most 40.00 each, so it stays comfortably positive.
        opening = target - sum(amount for _, amount, _ in movements)
        entries = []
        for day, amount, memo in [(opened, opening, "opening deposit"), *movements]:
            entry_id += 1
            entries.append(
                {"id": f"E{entry_id:06}", "date": day.isoformat(), "amount": amount, "memo": memo}
            )
        accounts[account_id] = {
            "owner": owner,
            "currency": "EUR",
            "opened": opened.isoformat(),
            "balance": target,
            "entries": entries,
        }

    order_id = 0
    for customer_id in customer_ids:
        for _ in range(rng.randrange(0, 5)):
            order_id += 1
            lines = []
            for sku in rng.sample(sorted(products), rng.randrange(1, 4)):
                qty = rng.randrange(1, 4)
                lines.append({"sku": sku, "qty": qty, "price": products[sku]["price"]})
            customers[customer_id]["orders"].append(
                {
                    "id": f"O{order_id:05}",
                    "date": _date(rng, epoch, 1000).isoformat(),
                    "status": rng.choice(_STATUSES),
                    "lines": lines,
                    "total": sum(line["qty"] * line["price"] for line in lines),
                }
            )

    return {
        "accounts": accounts,
        "customers": customers,
        "products": products,
        "meta": {
            "total_balance": TOTAL_BALANCE,
            "currency": "EUR",
            "amounts": "integer cents",
            "generator": "scripts/make_sample_model.py",
            "seed": SEED,
        },
    }


def render(model: dict[str, Any]) -> str:
    return json.dumps(model, indent=1, ensure_ascii=False) + "\n"


def count_objects(value: Any) -> int:
    """Dicts and lists in *value*: the persistent containers an import creates."""
    if isinstance(value, dict):
        return 1 + sum(count_objects(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(count_objects(v) for v in value)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "data" / "sample_model.json"
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--check", action="store_true", help="verify --out is up to date")
    args = parser.parse_args(argv)
    model = build_model()
    text = render(model)
    balances = sum(a["balance"] for a in model["accounts"].values())
    assert balances == TOTAL_BALANCE, balances
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE'}")
        return 0 if same else 1
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(
        f"wrote {args.out}: {len(text.encode()):,} bytes, {count_objects(model):,} objects "
        f"({len(model['accounts'])} accounts, {len(model['customers'])} customers), "
        f"balances total {TOTAL_BALANCE} cents"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
