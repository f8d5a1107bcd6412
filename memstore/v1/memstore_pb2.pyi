from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType

class InitSpec(_message.Message):
    __slots__ = ("kind", "scale", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    scale: float
    seed: int
    def __init__(self, kind: _Optional[str] = ..., scale: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("kind", "lr", "args")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lr: float
    args: _containers.ScalarMap[str, float]
    def __init__(self, kind: _Optional[str] = ..., lr: _Optional[float] = ..., args: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "num_rows", "dim", "dtype", "init", "optimizer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    dim: int
    dtype: DType
    init: InitSpec
    optimizer: OptimizerSpec
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., init: _Optional[_Union[InitSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("spec", "rows_materialized", "bytes_used", "lookups", "updates", "shard_index", "shard_count", "bytes_reserved", "bytes_resident", "checkpoints")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ROWS_MATERIALIZED_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RESERVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    rows_materialized: int
    bytes_used: int
    lookups: int
    updates: int
    shard_index: int
    shard_count: int
    bytes_reserved: int
    bytes_resident: int
    checkpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., rows_materialized: _Optional[int] = ..., bytes_used: _Optional[int] = ..., lookups: _Optional[int] = ..., updates: _Optional[int] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., bytes_reserved: _Optional[int] = ..., bytes_resident: _Optional[int] = ..., checkpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("spec", "if_not_exists")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IF_NOT_EXISTS_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    if_not_exists: bool
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., if_not_exists: _Optional[bool] = ...) -> None: ...

class DropTableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropTableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class DescribeTableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ...) -> None: ...

class LookupChunk(_message.Message):
    __slots__ = ("rows", "row_offset", "dtype", "dim")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    rows: bytes
    row_offset: int
    dtype: DType
    dim: int
    def __init__(self, rows: _Optional[bytes] = ..., row_offset: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., dim: _Optional[int] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("table", "client_id", "seq", "total_rows", "ids", "grads", "rank", "world_size", "step_timeout_ms", "lr", "staging")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    STAGING_FIELD_NUMBER: _ClassVar[int]
    table: str
    client_id: str
    seq: int
    total_rows: int
    ids: bytes
    grads: bytes
    rank: int
    world_size: int
    step_timeout_ms: int
    lr: float
    staging: str
    def __init__(self, table: _Optional[str] = ..., client_id: _Optional[str] = ..., seq: _Optional[int] = ..., total_rows: _Optional[int] = ..., ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., step_timeout_ms: _Optional[int] = ..., lr: _Optional[float] = ..., staging: _Optional[str] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("applied", "rows", "previous_seq")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SEQ_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    rows: int
    previous_seq: int
    def __init__(self, applied: _Optional[bool] = ..., rows: _Optional[int] = ..., previous_seq: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("table", "tag")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    table: str
    tag: str
    def __init__(self, table: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("paths",)
    PATHS_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, paths: _Optional[_Iterable[str]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("table", "tag", "job", "rank")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    table: str
    tag: str
    job: str
    rank: int
    def __init__(self, table: _Optional[str] = ..., tag: _Optional[str] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tables", "counters", "version", "backend", "read_only", "shard_index", "shard_count", "process_resident_bytes", "process_virtual_bytes", "ram_max_bytes")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TABLES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_VIRTUAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAM_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    counters: _containers.ScalarMap[str, float]
    version: str
    backend: str
    read_only: bool
    shard_index: int
    shard_count: int
    process_resident_bytes: int
    process_virtual_bytes: int
    ram_max_bytes: int
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., counters: _Optional[_Mapping[str, float]] = ..., version: _Optional[str] = ..., backend: _Optional[str] = ..., read_only: _Optional[bool] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., process_resident_bytes: _Optional[int] = ..., process_virtual_bytes: _Optional[int] = ..., ram_max_bytes: _Optional[int] = ...) -> None: ...

class MapTableRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class MapTableResponse(_message.Message):
    __slots__ = ("spec", "shard_index", "shard_count", "path", "generation", "boot_id", "staging_dir", "kind", "pid")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGING_DIR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    shard_index: int
    shard_count: int
    path: str
    generation: int
    boot_id: str
    staging_dir: str
    kind: str
    pid: int
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., path: _Optional[str] = ..., generation: _Optional[int] = ..., boot_id: _Optional[str] = ..., staging_dir: _Optional[str] = ..., kind: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...
