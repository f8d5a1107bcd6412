"""What a training client sends with its updates: the data-parallel job, and the order of steps."""
from __future__ import annotations

from dataclasses import dataclass

from memstore.errors import FailedPrecondition


@dataclass(frozen=True)
class Job:
    """The data-parallel job an update belongs to: `world_size` ranks train a table together.

    Each shard applies one optimizer step per training step, with the mean of the ranks'
    gradients, once all `world_size` contributions have arrived; a step that misses a rank for
    `step_timeout_s` is dropped on that shard and every waiting rank gets ABORTED. The job's
    `name` is its identity for exactly-once delivery: every rank of one run uses the same name.
    """
    name: str
    rank: int = 0
    world_size: int = 1
    step_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a Job needs a name (the same on every rank)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")
        if self.step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")

    @property
    def client_id(self) -> str:
        return f"job:{self.name}"


class StepOrder:
    """The sending side of exactly-once training steps, per (table, client_id); one thread only.

    failed[key]  the oldest step that failed and has not been re-sent successfully. Later steps
                 are refused unsent: a server applies a client's steps in order only (a seq at or
                 below the last applied is a retry), so a later step applied first would turn the
                 failed step's re-send into a no-op.
    acked[key]   the highest step acknowledged: a step at or below it is a re-send.
    """

    def __init__(self) -> None:
        self.failed: dict[tuple[str, str], int] = {}
        self.acked: dict[tuple[str, str], int] = {}

    def check(self, key: tuple[str, str], step: int, where: str) -> bool:
        """Refuse `step` while an earlier one is failed; returns whether this is its first send."""
        failed = self.failed.get(key)
        if failed is not None and step > failed:
            raise FailedPrecondition(
                f"step {step} of table {key[0]!r} not sent to {where}: step {failed} failed there and has "
                "not been re-sent; re-send it first (or restore a checkpoint)")
        return failed is None and step > self.acked.get(key, -1)

    def record(self, key: tuple[str, str], step: int, ok: bool) -> None:
        failed = self.failed.get(key)
        if not ok:
            self.failed[key] = step if failed is None else min(failed, step)
            return
        if failed == step:
            del self.failed[key]
        self.acked[key] = max(step, self.acked.get(key, -1))

    def forget(self, table: str) -> None:
        """The table was restored: its steps are numbered from the checkpoint again."""
        for memory in (self.failed, self.acked):
            for key in [k for k in memory if k[0] == table]:
                del memory[key]
