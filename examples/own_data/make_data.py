"""Regenerate the example's CSV files (already committed): short product reviews composed from hand-written phrases,
and restaurant reviews as the unseen domain. Seeded; plain Python, no taskprune import.

    python examples/own_data/make_data.py
"""

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRODUCTS = ["headphones", "kettle", "phone case", "backpack", "desk lamp", "blender", "keyboard", "water bottle",
            "running shoes", "charger", "umbrella", "coffee grinder"]
GOOD = ["works perfectly", "exceeded my expectations", "is sturdy and well made", "was worth every penny",
        "arrived early and works great", "feels premium", "does exactly what it promises", "is a joy to use",
        "has held up for months", "is the best purchase I made this year"]
BAD = ["broke after two days", "stopped working within a week", "feels cheap and flimsy", "was a waste of money",
       "arrived damaged", "does not do what it promises", "is far too loud", "fell apart on first use",
       "smells of plastic and leaks", "is the worst purchase I made this year"]
MIXED = ["is fine, nothing special", "works but the finish is rough", "is okay for the price",
         "does the job, I suppose", "is average in every way"]
OPENERS = ["This", "The", "My new", "Our"]
CLOSERS = ["", " Would buy again.", " Highly recommended.", " Returned it.", " Avoid.", " Five stars from me.",
           " Do not bother."]
GOOD_CLOSERS, BAD_CLOSERS = CLOSERS[:3] + [CLOSERS[5]], [CLOSERS[0], CLOSERS[3], CLOSERS[4], CLOSERS[6]]

DISHES = ["the pasta", "the soup", "the curry", "dessert", "the coffee", "the pizza", "the salad", "breakfast"]
TASTY = ["was delicious", "was cooked to perfection", "tasted wonderful", "was fresh and generous"]
NASTY = ["was cold and bland", "tasted burnt", "was stale", "was greasy and overpriced"]
STAFF_GOOD = ["the staff were lovely", "service was quick", "the waiter was friendly"]
STAFF_BAD = ["the staff were rude", "we waited an hour", "the waiter ignored us"]


def product_review(rng: random.Random, rating: int) -> str:
    part = {5: GOOD, 4: GOOD, 3: MIXED, 2: BAD, 1: BAD}[rating]
    closer = rng.choice(GOOD_CLOSERS if rating >= 4 else BAD_CLOSERS if rating <= 2 else [""])
    return f"{rng.choice(OPENERS)} {rng.choice(PRODUCTS)} {rng.choice(part)}.{closer}"


def restaurant_review(rng: random.Random, positive: bool) -> str:
    food, staff = (TASTY, STAFF_GOOD) if positive else (NASTY, STAFF_BAD)
    return f"{rng.choice(DISHES).capitalize()} {rng.choice(food)} and {rng.choice(staff)}."


def write(path: Path, header: list[str], rows: list[tuple]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def main() -> None:
    rng = random.Random(13)
    for name, n in (("reviews_train.csv", 240), ("reviews_eval.csv", 80)):
        ratings = [rng.choice([1, 2, 3, 4, 5]) for _ in range(n)]
        write(HERE / name, ["review", "rating"], [(product_review(rng, r), r) for r in ratings])
    write(HERE / "restaurants_ood.csv", ["text", "sentiment"],
          [(restaurant_review(rng, p), "pos" if p else "neg") for p in (rng.random() < 0.5 for _ in range(60))])


if __name__ == "__main__":
    main()
