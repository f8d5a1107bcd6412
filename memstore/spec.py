"""Table specifications: what a table is, validated once at the edge.

A `TableSpec` is immutable and fully validated on construction; backends and the servicer can
trust it. It round-trips through msgpack (snapshots, LMDB metadata) and protobuf (the wire).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from memstore import dtypes
from memstore.errors import InvalidArgument

MAX_ROWS = 10**11  # addressable rows per table (int64 ids)
MAX_DIM = 65536
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")  # never a path: no '/', no leading '.'

INIT_KINDS = ("zeros", "normal", "uniform")
OPTIMIZERS: dict[str, dict[str, float]] = {
    # kind → accepted args and their defaults (lr is separate)
    "sgd": {},
    "adagrad": {"eps": 1e-10, "initial_accumulator_value": 0.0},
    "rowwise_adagrad": {"eps": 1e-10, "initial_accumulator_value": 0.0},
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
}

# arg → (low, high, low allowed): eps > 0 (0/0 for a zero gradient), betas < 1 (Adam divides by 1 - beta^t).
_ARG_RANGES = {"eps": (0.0, 1e6, False), "initial_accumulator_value": (0.0, 1e6, True),
               "beta1": (0.0, 1.0, True), "beta2": (0.0, 1.0, True)}


def check_table_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid table name {name!r}: use 1-128 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class InitSpec:
    kind: str = "normal"   # zeros | normal (std=scale) | uniform(-scale, scale)
    scale: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise InvalidArgument(f"unknown init {self.kind!r}; expected one of {INIT_KINDS}")
        if not (0.0 <= self.scale < 1e6):
            raise InvalidArgument(f"init scale must be in [0, 1e6), got {self.scale}")
        if not (0 <= self.seed < 2**63):
            raise InvalidArgument(f"init seed must be in [0, 2^63), got {self.seed}")


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str = "sgd"
    lr: float = 0.01
    args: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise InvalidArgument(
                f"unknown optimizer {self.kind!r}; expected one of {sorted(OPTIMIZERS)}")
        if not (0.0 <= self.lr < 1e6):
            raise InvalidArgument(f"lr must be in [0, 1e6), got {self.lr}")
        unknown = set(self.args) - set(OPTIMIZERS[self.kind])
        if unknown:
            raise InvalidArgument(
                f"optimizer {self.kind!r} does not take {sorted(unknown)}; "
                f"it takes {sorted(OPTIMIZERS[self.kind]) or 'no extra arguments'}")
        # Fill defaults so two specs that mean the same thing compare equal.
        object.__setattr__(self, "args", {**OPTIMIZERS[self.kind], **{k: float(v) for k, v in self.args.items()}})
        for name, value in self.args.items():  # a NaN eps or beta1=1 would turn every updated row into NaN
            low, high, closed = _ARG_RANGES[name]
            if not (low < value < high or (closed and value == low)):
                raise InvalidArgument(f"optimizer arg {name} must be in {'[' if closed else '('}{low:g}, {high:g}), "
                                      f"got {value}")

    def arg(self, name: str) -> float:
        return self.args[name]


@dataclass(frozen=True)
class TableSpec:
    name: str
    num_rows: int
    dim: int
    dtype: str = "float32"
    init: InitSpec = field(default_factory=InitSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    # This table is shard `shard_index` of `shard_count` of a table of `num_rows` global rows:
    # global row g lives here iff g % shard_count == shard_index, at local row g // shard_count.
    # Backends index by local row and initialise rows from their global id (`to_global`), so a
    # row starts with the same value whatever the shard layout.
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self) -> None:
        check_table_name(self.name)
        if not (0 <= self.shard_index < self.shard_count):
            raise InvalidArgument(f"shard_index {self.shard_index} outside [0, {self.shard_count})")
        if not (0 < self.num_rows <= MAX_ROWS):
            raise InvalidArgument(f"num_rows must be in [1, {MAX_ROWS}], got {self.num_rows}")
        if not (0 < self.dim <= MAX_DIM):
            raise InvalidArgument(f"dim must be in [1, {MAX_DIM}], got {self.dim}")
        try:
            dtypes.check_dtype(self.dtype)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    @property
    def local_rows(self) -> int:
        """Rows stored by this shard."""
        return (self.num_rows - self.shard_index + self.shard_count - 1) // self.shard_count

    def to_global(self, local_ids: np.ndarray) -> np.ndarray:
        return local_ids * self.shard_count + self.shard_index

    def to_local(self, global_ids: np.ndarray) -> np.ndarray:
        return global_ids // self.shard_count

    @property
    def row_bytes(self) -> int:
        return self.dim * dtypes.itemsize(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableSpec:
        return cls(name=d["name"], num_rows=int(d["num_rows"]), dim=int(d["dim"]), dtype=d["dtype"],
                   init=InitSpec(**d["init"]), optimizer=OptimizerSpec(**d["optimizer"]),
                   shard_index=int(d.get("shard_index", 0)), shard_count=int(d.get("shard_count", 1)))


def table_spec(name: str, num_rows: int, dim: int, *, dtype: str = "float32", init: str = "normal",
               init_scale: float = 0.02, seed: int = 0, optimizer: str = "sgd", lr: float = 0.01,
               **optimizer_args: float) -> TableSpec:
    """The spec `create_table` asks for, from its keyword arguments (the defaults of every client
    and of `memstore create-table`)."""
    return TableSpec(name, num_rows, dim, dtype, InitSpec(init, init_scale, seed), OptimizerSpec(optimizer, lr, optimizer_args))


def spec_differences(existing: TableSpec, requested: TableSpec, *,
                     labels: tuple[str, str] = ("existing", "requested")) -> list[str]:
    """One "field: existing X, requested Y" per field in which two specs differ (optimizer
    arguments one by one, defaults filled in), in the spec's field order; `labels` name the two."""
    ours, theirs = _flat(existing.to_dict()), _flat(requested.to_dict())
    keys = [*ours, *(k for k in theirs if k not in ours)]
    first, second = labels
    return [f"{k}: {first} {ours.get(k)!r}, {second} {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 0.01}} → {"optimizer.lr": 0.01}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
