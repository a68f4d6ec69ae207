from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SyncOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC_OP_UNSPECIFIED: _ClassVar[SyncOp]
    SYNC_OP_CREATE: _ClassVar[SyncOp]
    SYNC_OP_REFRESH: _ClassVar[SyncOp]
    SYNC_OP_DELETE: _ClassVar[SyncOp]
    SYNC_OP_EXPIRE: _ClassVar[SyncOp]
SYNC_OP_UNSPECIFIED: SyncOp
SYNC_OP_CREATE: SyncOp
SYNC_OP_REFRESH: SyncOp
SYNC_OP_DELETE: SyncOp
SYNC_OP_EXPIRE: SyncOp

class SyncCursor(_message.Message):
    __slots__ = ("table", "epoch", "seq")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    table: str
    epoch: int
    seq: int
    def __init__(self, table: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class SyncHello(_message.Message):
    __slots__ = ("node", "cursors")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    node: str
    cursors: _containers.RepeatedCompositeFieldContainer[SyncCursor]
    def __init__(self, node: _Optional[str] = ..., cursors: _Optional[_Iterable[_Union[SyncCursor, _Mapping]]] = ...) -> None: ...

class SyncAck(_message.Message):
    __slots__ = ("batch", "cursor")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    batch: int
    cursor: SyncCursor
    def __init__(self, batch: _Optional[int] = ..., cursor: _Optional[_Union[SyncCursor, _Mapping]] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("hello", "ack")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    hello: SyncHello
    ack: SyncAck
    def __init__(self, hello: _Optional[_Union[SyncHello, _Mapping]] = ..., ack: _Optional[_Union[SyncAck, _Mapping]] = ...) -> None: ...

class SyncEntry(_message.Message):
    __slots__ = ("op", "key", "backend", "pool", "created", "updated", "expires", "origin", "client", "listener", "proto")
    OP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    PROTO_FIELD_NUMBER: _ClassVar[int]
    op: SyncOp
    key: str
    backend: str
    pool: str
    created: float
    updated: float
    expires: float
    origin: str
    client: str
    listener: str
    proto: str
    def __init__(self, op: _Optional[_Union[SyncOp, str]] = ..., key: _Optional[str] = ..., backend: _Optional[str] = ..., pool: _Optional[str] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., expires: _Optional[float] = ..., origin: _Optional[str] = ..., client: _Optional[str] = ..., listener: _Optional[str] = ..., proto: _Optional[str] = ...) -> None: ...

class SyncBatch(_message.Message):
    __slots__ = ("kind", "batch", "table", "epoch", "seq", "entries", "node", "sent")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SyncBatch.Kind]
        KIND_WELCOME: _ClassVar[SyncBatch.Kind]
        KIND_SNAPSHOT_BEGIN: _ClassVar[SyncBatch.Kind]
        KIND_SNAPSHOT: _ClassVar[SyncBatch.Kind]
        KIND_SNAPSHOT_END: _ClassVar[SyncBatch.Kind]
        KIND_CHANGES: _ClassVar[SyncBatch.Kind]
    KIND_UNSPECIFIED: SyncBatch.Kind
    KIND_WELCOME: SyncBatch.Kind
    KIND_SNAPSHOT_BEGIN: SyncBatch.Kind
    KIND_SNAPSHOT: SyncBatch.Kind
    KIND_SNAPSHOT_END: SyncBatch.Kind
    KIND_CHANGES: SyncBatch.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    kind: SyncBatch.Kind
    batch: int
    table: str
    epoch: int
    seq: int
    entries: _containers.RepeatedCompositeFieldContainer[SyncEntry]
    node: str
    sent: float
    def __init__(self, kind: _Optional[_Union[SyncBatch.Kind, str]] = ..., batch: _Optional[int] = ..., table: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[SyncEntry, _Mapping]]] = ..., node: _Optional[str] = ..., sent: _Optional[float] = ...) -> None: ...
