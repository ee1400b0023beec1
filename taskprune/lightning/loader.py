"""A DataLoader that resumes mid-epoch, for calibration runs that may be killed and restarted.

Lightning saves the state of a loader that has ``state_dict`` / ``load_state_dict`` in its checkpoints and loads it
before it creates the iterator. The state is the number of batches whose attributions have been added to the scores
(``mark_done()`` is called by the module at the end of each ``training_step``, i.e. before any checkpoint of that
step), so a resumed run skips exactly the batches already counted, and its final scores equal an uninterrupted run's.
"""

from __future__ import annotations

from torch.utils.data import DataLoader


class CalibrationLoader(DataLoader):
    """``DataLoader`` with a resumable position. Same arguments as ``DataLoader``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._done = 0
        self._skip = 0

    def mark_done(self) -> None:
        self._done += 1

    def state_dict(self) -> dict:
        return {"batches_done": self._done}

    def load_state_dict(self, state_dict: dict) -> None:
        self._skip = self._done = int(state_dict.get("batches_done", 0))

    def __iter__(self):
        skip, self._skip = self._skip, 0
        if skip == 0:
            self._done = 0  # a new epoch
        if skip == 0:
            return super().__iter__()
        return self._skipping(skip)

    def _skipping(self, skip: int):
        # skip whole batches at the index level: the skipped samples are never loaded or collated
        batch_sampler = self.batch_sampler if self.batch_sampler is not None else None
        if batch_sampler is None:  # batch_size=None: one sample per step
            indices = list(self.sampler)[skip:]
            for i in indices:
                yield self.collate_fn(self.dataset[i]) if self.collate_fn else self.dataset[i]
            return
        for n, batch_idx in enumerate(batch_sampler):
            if n < skip:
                continue
            yield self.collate_fn([self.dataset[i] for i in batch_idx])
