"""Zoo recipes: how each of the project's multi-task models is trained. Everything here goes into the recipe hash."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

GLUE_TASKS = ("sst2", "mrpc", "qnli", "mnli", "qqp", "rte", "cola", "stsb")


@dataclass(frozen=True)
class Recipe:
    """How a zoo model is built (fine-tuning all-MiniLM-L6-v2 with one linear head per task).

    Attributes:
        rows_per_task: seeded rows drawn from each task's train file; ``None`` = every row not in the reserve.
        reserve: ``((task, n), ...)``: rows of each train file set aside *before* training (seeded), never trained
            on; benchmarks choose defaults on them (the selection split). Their ``idx`` go to ``build.json``.
        epoch_rows: size-aware sampling: a task with more train rows than this sees a fresh seeded sample of this
            many rows per epoch (smaller tasks are seen whole every epoch); ``None`` = every row every epoch.
        curve: evaluate the dev subsets after every epoch (the learning curve in ``build.json``).
    """

    base: str = "sentence-transformers/all-MiniLM-L6-v2"
    tasks: tuple[str, ...] = GLUE_TASKS
    rows_per_task: int | None = 1000
    epochs: int = 1
    batch_size: int = 16
    lr: float = 8e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    dropout: float = 0.1
    pooling: str = "mean"
    max_length: int = 128
    freeze_embeddings: bool = True
    seed: int = 0
    dev_rows: int = 500  # build-time dev metrics on a seeded subset; benchmarks/build_multitask.py runs full dev
    reserve: tuple[tuple[str, int], ...] = ()
    epoch_rows: int | None = None
    curve: bool = False

    def reserve_rows(self, task: str) -> int:
        return dict(self.reserve).get(task, 0)

    def hashed(self) -> dict:
        """The fields that define the model. Fields added after the first recipe count only when not at their
        default, so ``minilm-glue`` keeps its hash (and its cache folder) as the recipe grows options."""
        d = asdict(self)
        for f in fields(self):
            if f.name in _LATER_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d


_LATER_FIELDS = ("reserve", "epoch_rows", "curve")

#: The selection reserve of the large recipe: rows per task kept out of training to choose defaults on.
SELECTION_RESERVE = (("sst2", 500), ("mrpc", 300), ("qnli", 500), ("mnli", 500), ("qqp", 500), ("rte", 200),
                     ("cola", 500), ("stsb", 500))

RECIPES: dict[str, Recipe] = {
    # the demo model: 1000 rows per task, one epoch; its train rows are the embedded files' rows
    "minilm-glue": Recipe(),
    # the benchmarks' model: every train row but the selection reserve, size-aware sampling, several epochs
    "minilm-glue-large": Recipe(rows_per_task=None, reserve=SELECTION_RESERVE, epochs=3, epoch_rows=4000,
                                batch_size=32, lr=8e-5, curve=True),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(RECIPES)}. Pass recipe=Recipe(...) to build "
                         "a model of your own under another name.")
    return RECIPES[name]
