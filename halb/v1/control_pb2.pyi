from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeaveNodeRequest(_message.Message):
    __slots__ = ("wait_seconds",)
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: float
    def __init__(self, wait_seconds: _Optional[float] = ...) -> None: ...

class JoinNodeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeBgpReply(_message.Message):
    __slots__ = ("withdrawn", "announced", "waited_seconds")
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    withdrawn: _containers.RepeatedScalarFieldContainer[str]
    announced: _containers.RepeatedScalarFieldContainer[str]
    waited_seconds: float
    def __init__(self, withdrawn: _Optional[_Iterable[str]] = ..., announced: _Optional[_Iterable[str]] = ..., waited_seconds: _Optional[float] = ...) -> None: ...

class BgpVip(_message.Message):
    __slots__ = ("vip", "prefix", "announced", "reason", "pools")
    VIP_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    vip: str
    prefix: str
    announced: bool
    reason: str
    pools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vip: _Optional[str] = ..., prefix: _Optional[str] = ..., announced: _Optional[bool] = ..., reason: _Optional[str] = ..., pools: _Optional[_Iterable[str]] = ...) -> None: ...

class BgpSession(_message.Message):
    __slots__ = ("peer", "remote_as", "state", "uptime_seconds", "prefixes_sent", "bfd")
    PEER_FIELD_NUMBER: _ClassVar[int]
    REMOTE_AS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_SENT_FIELD_NUMBER: _ClassVar[int]
    BFD_FIELD_NUMBER: _ClassVar[int]
    peer: str
    remote_as: int
    state: str
    uptime_seconds: float
    prefixes_sent: int
    bfd: str
    def __init__(self, peer: _Optional[str] = ..., remote_as: _Optional[int] = ..., state: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., prefixes_sent: _Optional[int] = ..., bfd: _Optional[str] = ...) -> None: ...

class BgpStatus(_message.Message):
    __slots__ = ("speaker", "asn", "leaving", "speaker_error", "vips", "sessions", "announcements", "withdrawals")
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    ASN_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ERROR_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCEMENTS_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWALS_FIELD_NUMBER: _ClassVar[int]
    speaker: str
    asn: int
    leaving: bool
    speaker_error: str
    vips: _containers.RepeatedCompositeFieldContainer[BgpVip]
    sessions: _containers.RepeatedCompositeFieldContainer[BgpSession]
    announcements: int
    withdrawals: int
    def __init__(self, speaker: _Optional[str] = ..., asn: _Optional[int] = ..., leaving: _Optional[bool] = ..., speaker_error: _Optional[str] = ..., vips: _Optional[_Iterable[_Union[BgpVip, _Mapping]]] = ..., sessions: _Optional[_Iterable[_Union[BgpSession, _Mapping]]] = ..., announcements: _Optional[int] = ..., withdrawals: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "version", "uptime_seconds", "pid", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    uptime_seconds: float
    pid: int
    config: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., pid: _Optional[int] = ..., config: _Optional[str] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("name", "vrid", "interface", "state", "priority", "base_priority", "vips", "master", "advert_interval", "preempt", "state_seconds", "checksum", "invalid_adverts", "invalid_sources", "auth")
    class InvalidAdvertsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VRID_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    BASE_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    MASTER_FIELD_NUMBER: _ClassVar[int]
    ADVERT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    INVALID_ADVERTS_FIELD_NUMBER: _ClassVar[int]
    INVALID_SOURCES_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    vrid: int
    interface: str
    state: str
    priority: int
    base_priority: int
    vips: _containers.RepeatedScalarFieldContainer[str]
    master: str
    advert_interval: float
    preempt: bool
    state_seconds: float
    checksum: str
    invalid_adverts: _containers.ScalarMap[str, int]
    invalid_sources: _containers.RepeatedCompositeFieldContainer[InvalidSource]
    auth: str
    def __init__(self, name: _Optional[str] = ..., vrid: _Optional[int] = ..., interface: _Optional[str] = ..., state: _Optional[str] = ..., priority: _Optional[int] = ..., base_priority: _Optional[int] = ..., vips: _Optional[_Iterable[str]] = ..., master: _Optional[str] = ..., advert_interval: _Optional[float] = ..., preempt: _Optional[bool] = ..., state_seconds: _Optional[float] = ..., checksum: _Optional[str] = ..., invalid_adverts: _Optional[_Mapping[str, int]] = ..., invalid_sources: _Optional[_Iterable[_Union[InvalidSource, _Mapping]]] = ..., auth: _Optional[str] = ...) -> None: ...

class InvalidSource(_message.Message):
    __slots__ = ("source", "reason", "count", "detail")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    source: str
    reason: str
    count: int
    detail: str
    def __init__(self, source: _Optional[str] = ..., reason: _Optional[str] = ..., count: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("direction", "reason", "remote", "count", "detail", "last_seconds_ago")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LAST_SECONDS_AGO_FIELD_NUMBER: _ClassVar[int]
    direction: str
    reason: str
    remote: str
    count: int
    detail: str
    last_seconds_ago: float
    def __init__(self, direction: _Optional[str] = ..., reason: _Optional[str] = ..., remote: _Optional[str] = ..., count: _Optional[int] = ..., detail: _Optional[str] = ..., last_seconds_ago: _Optional[float] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("name", "address", "connected", "state", "lag_entries", "lag_seconds", "acked_seq", "epoch", "last_error", "refused", "sent_entries", "received_entries", "snapshots_sent", "resumes", "refused_in", "refused_out", "refusals")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    SENT_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_SENT_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_IN_FIELD_NUMBER: _ClassVar[int]
    REFUSED_OUT_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    connected: bool
    state: str
    lag_entries: int
    lag_seconds: float
    acked_seq: int
    epoch: int
    last_error: str
    refused: int
    sent_entries: int
    received_entries: int
    snapshots_sent: int
    resumes: int
    refused_in: int
    refused_out: int
    refusals: _containers.RepeatedCompositeFieldContainer[Refusal]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., connected: _Optional[bool] = ..., state: _Optional[str] = ..., lag_entries: _Optional[int] = ..., lag_seconds: _Optional[float] = ..., acked_seq: _Optional[int] = ..., epoch: _Optional[int] = ..., last_error: _Optional[str] = ..., refused: _Optional[int] = ..., sent_entries: _Optional[int] = ..., received_entries: _Optional[int] = ..., snapshots_sent: _Optional[int] = ..., resumes: _Optional[int] = ..., refused_in: _Optional[int] = ..., refused_out: _Optional[int] = ..., refusals: _Optional[_Iterable[_Union[Refusal, _Mapping]]] = ...) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("pool", "name", "address", "state", "healthy", "drain", "weight", "config_weight", "effective_weight", "active", "total", "failures", "backup", "max_conns", "ewma_rt_seconds", "agent", "agent_state", "load", "load_reported")
    POOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNS_FIELD_NUMBER: _ClassVar[int]
    EWMA_RT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_REPORTED_FIELD_NUMBER: _ClassVar[int]
    pool: str
    name: str
    address: str
    state: str
    healthy: bool
    drain: bool
    weight: int
    config_weight: int
    effective_weight: int
    active: int
    total: int
    failures: int
    backup: bool
    max_conns: int
    ewma_rt_seconds: float
    agent: str
    agent_state: str
    load: float
    load_reported: float
    def __init__(self, pool: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., healthy: _Optional[bool] = ..., drain: _Optional[bool] = ..., weight: _Optional[int] = ..., config_weight: _Optional[int] = ..., effective_weight: _Optional[int] = ..., active: _Optional[int] = ..., total: _Optional[int] = ..., failures: _Optional[int] = ..., backup: _Optional[bool] = ..., max_conns: _Optional[int] = ..., ewma_rt_seconds: _Optional[float] = ..., agent: _Optional[str] = ..., agent_state: _Optional[str] = ..., load: _Optional[float] = ..., load_reported: _Optional[float] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("name", "algorithm", "up", "backup_active", "backends")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    BACKUP_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    algorithm: str
    up: int
    backup_active: bool
    backends: _containers.RepeatedCompositeFieldContainer[BackendStatus]
    def __init__(self, name: _Optional[str] = ..., algorithm: _Optional[str] = ..., up: _Optional[int] = ..., backup_active: _Optional[bool] = ..., backends: _Optional[_Iterable[_Union[BackendStatus, _Mapping]]] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "size", "max_entries", "seq", "epoch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    max_entries: int
    seq: int
    epoch: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., max_entries: _Optional[int] = ..., seq: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node", "election_enabled", "instances", "sync_enabled", "peers", "pools", "tables", "sync_ready", "control_refusals", "nat", "bgp")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ELECTION_ENABLED_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    SYNC_ENABLED_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SYNC_READY_FIELD_NUMBER: _ClassVar[int]
    CONTROL_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    NAT_FIELD_NUMBER: _ClassVar[int]
    BGP_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    election_enabled: bool
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    sync_enabled: bool
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    sync_ready: bool
    control_refusals: _containers.RepeatedCompositeFieldContainer[Refusal]
    nat: NatStatus
    bgp: BgpStatus
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., election_enabled: _Optional[bool] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., sync_enabled: _Optional[bool] = ..., peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., sync_ready: _Optional[bool] = ..., control_refusals: _Optional[_Iterable[_Union[Refusal, _Mapping]]] = ..., nat: _Optional[_Union[NatStatus, _Mapping]] = ..., bgp: _Optional[_Union[BgpStatus, _Mapping]] = ...) -> None: ...

class NatListener(_message.Message):
    __slots__ = ("name", "protocol", "vip", "port", "pool", "held", "backends_in_map")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_IN_MAP_FIELD_NUMBER: _ClassVar[int]
    name: str
    protocol: str
    vip: str
    port: int
    pool: str
    held: bool
    backends_in_map: int
    def __init__(self, name: _Optional[str] = ..., protocol: _Optional[str] = ..., vip: _Optional[str] = ..., port: _Optional[int] = ..., pool: _Optional[str] = ..., held: _Optional[bool] = ..., backends_in_map: _Optional[int] = ...) -> None: ...

class NatStatus(_message.Message):
    __slots__ = ("table", "replicate", "listeners", "injected", "refreshed", "removed", "inject_errors", "events_lost", "reconciles", "recorded", "ended", "replicate_after_packets")
    class InjectErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TABLE_FIELD_NUMBER: _ClassVar[int]
    REPLICATE_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    INJECTED_FIELD_NUMBER: _ClassVar[int]
    REFRESHED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    INJECT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_LOST_FIELD_NUMBER: _ClassVar[int]
    RECONCILES_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    REPLICATE_AFTER_PACKETS_FIELD_NUMBER: _ClassVar[int]
    table: str
    replicate: bool
    listeners: _containers.RepeatedCompositeFieldContainer[NatListener]
    injected: int
    refreshed: int
    removed: int
    inject_errors: _containers.ScalarMap[str, int]
    events_lost: int
    reconciles: int
    recorded: int
    ended: int
    replicate_after_packets: int
    def __init__(self, table: _Optional[str] = ..., replicate: _Optional[bool] = ..., listeners: _Optional[_Iterable[_Union[NatListener, _Mapping]]] = ..., injected: _Optional[int] = ..., refreshed: _Optional[int] = ..., removed: _Optional[int] = ..., inject_errors: _Optional[_Mapping[str, int]] = ..., events_lost: _Optional[int] = ..., reconciles: _Optional[int] = ..., recorded: _Optional[int] = ..., ended: _Optional[int] = ..., replicate_after_packets: _Optional[int] = ...) -> None: ...

class BackendRef(_message.Message):
    __slots__ = ("pool", "backend")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    pool: str
    backend: str
    def __init__(self, pool: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class SetWeightRequest(_message.Message):
    __slots__ = ("pool", "backend", "weight")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    backend: str
    weight: int
    def __init__(self, pool: _Optional[str] = ..., backend: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class BackendReply(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: BackendStatus
    def __init__(self, backend: _Optional[_Union[BackendStatus, _Mapping]] = ...) -> None: ...

class FailoverRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: str
    def __init__(self, instance: _Optional[str] = ...) -> None: ...

class FailoverReply(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: Instance
    def __init__(self, instance: _Optional[_Union[Instance, _Mapping]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CachePurgeRequest(_message.Message):
    __slots__ = ("prefix", "host", "listener")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    host: str
    listener: str
    def __init__(self, prefix: _Optional[str] = ..., host: _Optional[str] = ..., listener: _Optional[str] = ...) -> None: ...

class CachePurgeReply(_message.Message):
    __slots__ = ("purged", "listeners", "entries", "bytes")
    PURGED_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    purged: int
    listeners: _containers.RepeatedScalarFieldContainer[str]
    entries: int
    bytes: int
    def __init__(self, purged: _Optional[int] = ..., listeners: _Optional[_Iterable[str]] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class AddBackendRequest(_message.Message):
    __slots__ = ("pool", "name", "address", "weight", "backup", "max_conns")
    POOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    name: str
    address: str
    weight: int
    backup: bool
    max_conns: int
    def __init__(self, pool: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[int] = ..., backup: _Optional[bool] = ..., max_conns: _Optional[int] = ...) -> None: ...

class UpgradeRequest(_message.Message):
    __slots__ = ("drain_seconds",)
    DRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    drain_seconds: float
    def __init__(self, drain_seconds: _Optional[float] = ...) -> None: ...

class UpgradeReply(_message.Message):
    __slots__ = ("ok", "pid", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    pid: int
    error: str
    def __init__(self, ok: _Optional[bool] = ..., pid: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SetMaintenanceRequest(_message.Message):
    __slots__ = ("pool", "backend", "maint")
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAINT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    backend: str
    maint: bool
    def __init__(self, pool: _Optional[str] = ..., backend: _Optional[str] = ..., maint: _Optional[bool] = ...) -> None: ...

class ReloadReply(_message.Message):
    __slots__ = ("ok", "changes", "errors", "config")
    OK_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    changes: _containers.RepeatedScalarFieldContainer[str]
    errors: _containers.RepeatedScalarFieldContainer[str]
    config: str
    def __init__(self, ok: _Optional[bool] = ..., changes: _Optional[_Iterable[str]] = ..., errors: _Optional[_Iterable[str]] = ..., config: _Optional[str] = ...) -> None: ...

class DumpTableRequest(_message.Message):
    __slots__ = ("table", "prefix", "page_size", "page_token")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    table: str
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, table: _Optional[str] = ..., prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class TableEntry(_message.Message):
    __slots__ = ("key", "pool", "backend", "created", "updated", "expires", "origin", "client", "listener", "proto")
    KEY_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    PROTO_FIELD_NUMBER: _ClassVar[int]
    key: str
    pool: str
    backend: str
    created: float
    updated: float
    expires: float
    origin: str
    client: str
    listener: str
    proto: str
    def __init__(self, key: _Optional[str] = ..., pool: _Optional[str] = ..., backend: _Optional[str] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., expires: _Optional[float] = ..., origin: _Optional[str] = ..., client: _Optional[str] = ..., listener: _Optional[str] = ..., proto: _Optional[str] = ...) -> None: ...

class DumpTableReply(_message.Message):
    __slots__ = ("table", "total", "offset", "entries", "next_page_token")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    table: str
    total: int
    offset: int
    entries: _containers.RepeatedCompositeFieldContainer[TableEntry]
    next_page_token: str
    def __init__(self, table: _Optional[str] = ..., total: _Optional[int] = ..., offset: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[TableEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
