"""The training state beside the weights: where a resumed run continues from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainState:
    """Progress of a run. Saved with every checkpoint; a run restored from it reads exactly the batches the
    uninterrupted run would have read next (the sampler starts at ``consumed_samples``)."""

    step: int = 0
    """Optimizer steps completed."""

    consumed_samples: int = 0
    """Training samples read so far by the whole job (all DP ranks), the data loader's position."""

    def advance(self, global_batch_size: int) -> None:
        self.step += 1
        self.consumed_samples += global_batch_size

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainState":
        return cls(**{f.name: int(state[f.name]) for f in dataclasses.fields(cls)})
