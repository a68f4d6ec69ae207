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
    __slots__ = ("node", "cursors", "tls_ticket_keys")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    TLS_TICKET_KEYS_FIELD_NUMBER: _ClassVar[int]
    node: str
    cursors: _containers.RepeatedCompositeFieldContainer[SyncCursor]
    tls_ticket_keys: bool
    def __init__(self, node: _Optional[str] = ..., cursors: _Optional[_Iterable[_Union[SyncCursor, _Mapping]]] = ..., tls_ticket_keys: _Optional[bool] = ...) -> None: ...

class TLSTicketKey(_message.Message):
    __slots__ = ("listener", "name", "aes", "hmac", "created", "expires")
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    AES_FIELD_NUMBER: _ClassVar[int]
    HMAC_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    listener: str
    name: bytes
    aes: bytes
    hmac: bytes
    created: float
    expires: float
    def __init__(self, listener: _Optional[str] = ..., name: _Optional[bytes] = ..., aes: _Optional[bytes] = ..., hmac: _Optional[bytes] = ..., created: _Optional[float] = ..., expires: _Optional[float] = ...) -> None: ...

class SyncAck(_message.Message):
    __slots__ = ("batch", "cursors")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    cursors: _containers.RepeatedCompositeFieldContainer[SyncCursor]
    def __init__(self, batch: _Optional[int] = ..., cursors: _Optional[_Iterable[_Union[SyncCursor, _Mapping]]] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("hello", "ack")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    hello: SyncHello
    ack: SyncAck
    def __init__(self, hello: _Optional[_Union[SyncHello, _Mapping]] = ..., ack: _Optional[_Union[SyncAck, _Mapping]] = ...) -> None: ...

class SyncEntries(_message.Message):
    __slots__ = ("ops", "keys", "backends", "pools", "created", "updated", "expires", "origins", "clients", "listeners", "protos", "strings")
    OPS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    PROTOS_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedScalarFieldContainer[SyncOp]
    keys: _containers.RepeatedScalarFieldContainer[str]
    backends: _containers.RepeatedScalarFieldContainer[int]
    pools: _containers.RepeatedScalarFieldContainer[int]
    created: _containers.RepeatedScalarFieldContainer[float]
    updated: _containers.RepeatedScalarFieldContainer[float]
    expires: _containers.RepeatedScalarFieldContainer[float]
    origins: _containers.RepeatedScalarFieldContainer[int]
    clients: _containers.RepeatedScalarFieldContainer[str]
    listeners: _containers.RepeatedScalarFieldContainer[int]
    protos: _containers.RepeatedScalarFieldContainer[int]
    strings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ops: _Optional[_Iterable[_Union[SyncOp, str]]] = ..., keys: _Optional[_Iterable[str]] = ..., backends: _Optional[_Iterable[int]] = ..., pools: _Optional[_Iterable[int]] = ..., created: _Optional[_Iterable[float]] = ..., updated: _Optional[_Iterable[float]] = ..., expires: _Optional[_Iterable[float]] = ..., origins: _Optional[_Iterable[int]] = ..., clients: _Optional[_Iterable[str]] = ..., listeners: _Optional[_Iterable[int]] = ..., protos: _Optional[_Iterable[int]] = ..., strings: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncBatch(_message.Message):
    __slots__ = ("kind", "batch", "table", "epoch", "seq", "entries", "node", "sent", "vrrp_sources", "ticket_keys")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SyncBatch.Kind]
        KIND_WELCOME: _ClassVar[SyncBatch.Kind]
        KIND_SNAPSHOT_BEGIN: _ClassVar[SyncBatch.Kind]
        KIND_SNAPSHOT: _ClassVar[SyncBatch.Kind]
        KIND_SNAPSHOT_END: _ClassVar[SyncBatch.Kind]
        KIND_CHANGES: _ClassVar[SyncBatch.Kind]
        KIND_GOODBYE: _ClassVar[SyncBatch.Kind]
        KIND_TLS_TICKET_KEYS: _ClassVar[SyncBatch.Kind]
    KIND_UNSPECIFIED: SyncBatch.Kind
    KIND_WELCOME: SyncBatch.Kind
    KIND_SNAPSHOT_BEGIN: SyncBatch.Kind
    KIND_SNAPSHOT: SyncBatch.Kind
    KIND_SNAPSHOT_END: SyncBatch.Kind
    KIND_CHANGES: SyncBatch.Kind
    KIND_GOODBYE: SyncBatch.Kind
    KIND_TLS_TICKET_KEYS: SyncBatch.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    VRRP_SOURCES_FIELD_NUMBER: _ClassVar[int]
    TICKET_KEYS_FIELD_NUMBER: _ClassVar[int]
    kind: SyncBatch.Kind
    batch: int
    table: str
    epoch: int
    seq: int
    entries: SyncEntries
    node: str
    sent: float
    vrrp_sources: _containers.RepeatedScalarFieldContainer[str]
    ticket_keys: _containers.RepeatedCompositeFieldContainer[TLSTicketKey]
    def __init__(self, kind: _Optional[_Union[SyncBatch.Kind, str]] = ..., batch: _Optional[int] = ..., table: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., entries: _Optional[_Union[SyncEntries, _Mapping]] = ..., node: _Optional[str] = ..., sent: _Optional[float] = ..., vrrp_sources: _Optional[_Iterable[str]] = ..., ticket_keys: _Optional[_Iterable[_Union[TLSTicketKey, _Mapping]]] = ...) -> None: ...
