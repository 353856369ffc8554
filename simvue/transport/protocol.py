"""The wire format between senders (ranks, workers) and the aggregator.

Transport: ZeroMQ, one DEALER socket per sending process (its ``ROUTING_ID`` is the sender's
16-byte id) connected to the aggregator's ROUTER socket over TCP.

Every message is two frames::

    frame 0: mac      32 bytes, HMAC-SHA256(run key, payload)
    frame 1: payload  msgpack array [version, kind, seq, body]

``version`` is ``PROTOCOL_VERSION`` (2; version 1 had no METRIC_COLUMNS record).  An
authentic message of another version is dropped and counted as ``protocol_version``, and the
aggregator names it once on stderr and in the run's events (``VersionMismatch``); spill files
of version 1 are still read (``READABLE_VERSIONS``).  ``seq`` counts the messages one sender has sent (HELLO
is 1, each DATA and BYE takes the next number; HEARTBEAT repeats the last number).  The
aggregator processes each seq once: a repeated seq is a duplicate and is dropped, a skipped
one is a gap and is counted.  The MAC is checked before anything is unpacked; messages that
fail it or do not decode are dropped and counted, never raised.  A message that decodes but
whose body has the wrong shape is dropped and counted by the aggregator too.

Kinds, sender -> aggregator:

=========  =============================================================================
HELLO      body: map {rank, size, local_rank, pid, host, role: "rank"|"worker"|"process",
           started: epoch s, python, cuda: CUDA_VISIBLE_DEVICES|nil, created: the
           process's start time (epoch s, as psutil reads it)|nil, pid_namespace:
           boot id/pid namespace|nil}.  First message of every sender.  ``created`` and
           ``pid_namespace`` let the aggregator see at once that a process whose pid it
           can see has ended (see ``simvue.aggregator.liveness``).
DATA       body: array of records (below), in the order the process produced them, each
           stretch of METRICS records packed into METRIC_COLUMNS records (see Order).
HEARTBEAT  body: nil.  Sent when a sender has had nothing else to send for one heartbeat
           interval; the aggregator answers with ACK.
BYE        body: map {status: null|"completed"|"failed"|"terminated", dropped: {call: n},
           losses: {reason: n}}.  The last message; the aggregator answers with ACK once
           it has processed it, and adds ``losses`` (records the sender itself spilled or
           could not send) to the run's.
NODE_HEARTBEAT  body: map {senders: [sender id, ...], gone: [sender id, ...]}.  Sent by a
           node's relay (``simvue.transport.relay``), once per heartbeat interval, from its
           own socket: every sender it heard from recently is alive (their own HEARTBEATs
           are answered by the relay and do not travel), every ``gone`` one's process has
           ended on that node.  Not answered.
=========  =============================================================================

Relayed frames.  A relay's DEALER forwards each of its node's messages as
``[sender id, mac, payload]``, so the aggregator's ROUTER reads four frames
``[relay id, sender id, mac, payload]``; its replies go back the same way.

Kinds, aggregator -> sender:

=========  =============================================================================
ACK        body: map {seq: highest seq whose records are in the store, closed: bool,
           run: map|absent}.  Senders keep every message until it is acknowledged, so
           what they have not had acknowledged when the aggregator is gone is spilled,
           and what they have is durable.  Sent in answer to HEARTBEAT and BYE, and after
           each commit that holds a sender's new messages.  The answer to HELLO carries
           ``run``: {name, id, started, label}.
DRAIN      body: nil.  Sent to workers when the run is ending: send everything buffered,
           then a HEARTBEAT, without waiting for the process to exit.
ABORT      body: nil.  The server asked the run to stop; every process acts on it as its
           ``abort_on_alert`` setting says.  Sent to every live sender, and to later joiners.
SAMPLE     body: map {interval_s, processes: [[label, pid, cuda|nil], ...]}.  Makes the
           sender its node's resource sampler (see ``simvue.resources``), or updates the
           processes it samples; an empty map stops it.  Sent only to one sender per node
           other than the aggregator's own, whose sampler runs in the aggregator's process.
=========  =============================================================================

Records (arrays; the first element is the record kind, ``RecordKind``; each shape is a
``NamedTuple`` below, which packs as the same array):

==============  ==================================================================
METRICS    0    [0, step: int, time: float s, timestamp: float epoch s, {name: number}]
EVENT      1    [1, timestamp: float epoch s, message: str, level: str]
METADATA   2    [2, {key: value}]            merged into the run's metadata
TAGS       3    [3, [tag, ...]]              added to the run's tags
STATUS     4    [4, status: str]             the run's status, as set by the user
FOLDER     5    [5, path, metadata|nil, tags|nil, description|nil]
ALERT      6    [6, {name, source, rule, metric, threshold, ...}]   an alert definition
ALERT_STATE 7   [7, alert name, "ok"|"critical"]                    a user alert's state
ARTIFACT    8   [8, {name, category, mime_type, original_path, metadata, created,
                     size, checksum, transfer: int|nil, error?: str}]  a saved file/object
ARTIFACT_CHUNK 9 [9, transfer: int, offset: int, data: bytes]       part of its content
RESOURCES  10   [10, host: str, time: float s, timestamp: float epoch s, {name: number}]
                one resource sample of a node; the names are complete
                (``resources/...``) and the aggregator numbers the steps per host
TENSOR     11   [11, step, time, timestamp, name: str, shape: [int, ...], data: bytes]
                one array value of a metric (``log_metrics`` with an array):
                little-endian float64, C order, ``data`` is 8 * prod(shape) bytes
GRID       12   [12, metric: str, grid: str, axes: [[tick, ...], ...], labels: [str]]
                the sender's metric ``metric`` is on grid ``grid``, defined by its
                axes' ticks and labels; sent by each process before the first TENSOR
                of that metric, and again when the process assigns it to another grid
TAGS_SET   13   [13, [tag, ...]]             replaces the run's tags (``Run.set_tags``)
ALERT_ATTACH 14 [14, [alert name, ...]]      attaches alerts defined with
                                             ``attach_to_run=False`` (``Run.add_alerts``)
SAMPLE_PID 15   [15, pid: int]               the sender's resource figures follow this pid
                                             on its node from now on (``Run.set_pid``)
METRIC_COLUMNS 16 [16, rows: int, names: [str, ...], steps: bytes, times: bytes,
                   timestamps: bytes, values: [bytes, ...]]
                ``rows`` METRICS records that log the same ``names``, as columns:
                ``steps`` int64, ``times``, ``timestamps`` and each of ``values`` (one
                per name, in the order of ``names``) float64, little-endian, 8 * rows
                bytes each; 1 <= rows <= ``MAX_COLUMN_ROWS``, names distinct, steps >= 0,
                every float finite.  A record that breaks any of this is dropped whole
                and counted (``bad_record``); nothing of it is stored
==============  ==================================================================

Order.  A process's records reach the aggregator's merge in the order it produced them:
messages are processed in ``seq`` order, each once, and a DATA body in its array order, all
of one message before the next commit is taken.  A sender (``simvue.transport.columns``)
cuts each batch at every record that is not METRICS; each stretch of METRICS records between
two such records becomes METRIC_COLUMNS records in that same place, one per set of names,
the sets of one stretch sharing no name.  So every point logged before an EVENT, STATUS,
ALERT_STATE, METADATA, ... record is merged before it, every point logged after it is merged
after it, and each metric's points are merged in the order logged; only the interleaving of
*different* metrics within one stretch is not kept, which no series can show.  A reduced
metric's points from METRIC_COLUMNS go to the reducer one by one, as from METRICS records.
The aggregating process's own records never travel; they stay METRICS records.

Artifacts.  The aggregator's own process copies content straight into the store's blobs and
sends ARTIFACT with ``transfer`` nil.  Every other process streams it: one ARTIFACT_CHUNK
record per DATA message (``ARTIFACT_CHUNK_BYTES``, 1 MiB, at most), numbered by a transfer id
unique within the sender and its byte ``offset``, then the ARTIFACT record with that
``transfer``, the total ``size`` and the sha256 ``checksum``.  The aggregator appends the
chunks to a scratch file, and stores the artifact only if the offsets were contiguous and the
size and checksum match; ``error`` (the sender could not read the file) drops the transfer.
A sender keeps at most ``MAX_ARTIFACT_BYTES_IN_FLIGHT`` of chunks queued or unacknowledged,
and asks for an ACK (a HEARTBEAT) after each batch of chunks, so metrics keep flowing beside
a large file and the sender's memory stays bounded.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from typing import Any, NamedTuple

import msgpack

PROTOCOL_VERSION = 2
# Versions whose payloads ``spill.read`` still reads: version 1 is version 2 without
# METRIC_COLUMNS, so every record of a version-1 spill file is a version-2 record.
READABLE_VERSIONS = (1, 2)


class MessageKind(enum.IntEnum):
    """What a message is (``kind`` in the payload)."""

    HELLO = 1
    DATA = 2
    HEARTBEAT = 3
    BYE = 4
    ACK = 5
    DRAIN = 6
    ABORT = 7
    SAMPLE = 8
    NODE_HEARTBEAT = 9


class RecordKind(enum.IntEnum):
    """What a record is (its first element)."""

    METRICS = 0
    EVENT = 1
    METADATA = 2
    TAGS = 3
    STATUS = 4
    FOLDER = 5
    ALERT = 6
    ALERT_STATE = 7
    ARTIFACT = 8
    ARTIFACT_CHUNK = 9
    RESOURCES = 10
    TENSOR = 11
    GRID = 12
    TAGS_SET = 13
    ALERT_ATTACH = 14
    SAMPLE_PID = 15
    METRIC_COLUMNS = 16


class MetricsRecord(NamedTuple):
    """Values logged by one ``log_metrics`` call.  ``Run.log_metrics`` builds it as a plain
    tuple of this layout (a ``NamedTuple`` costs 0.27 µs more per call).  A sender packs
    these into ``MetricColumnsRecord`` before sending (``simvue.transport.columns``)."""

    kind: RecordKind
    step: int
    time: float  # seconds since the run started
    timestamp: float  # epoch seconds
    values: dict[str, float]


class EventRecord(NamedTuple):
    kind: RecordKind
    timestamp: float
    message: str
    level: str


class MetadataRecord(NamedTuple):
    kind: RecordKind
    metadata: dict[str, Any]  # merged into the run's metadata


class TagsRecord(NamedTuple):
    kind: RecordKind
    tags: list[str]  # added to the run's tags


class StatusRecord(NamedTuple):
    kind: RecordKind
    status: str  # as set by the user; a final one is applied at the run's end


class FolderRecord(NamedTuple):
    kind: RecordKind
    path: str
    metadata: dict[str, Any] | None
    tags: list[str] | None
    description: str | None


class AlertRecord(NamedTuple):
    kind: RecordKind
    definition: dict[str, Any]  # ``AlertSpec.to_dict()``


class AlertStateRecord(NamedTuple):
    kind: RecordKind
    name: str
    status: str  # "ok" | "critical"


class ArtifactRecord(NamedTuple):
    kind: RecordKind
    info: dict[str, Any]  # name, category, mime_type, ..., size, checksum, transfer


class ArtifactChunkRecord(NamedTuple):
    kind: RecordKind
    transfer: int
    offset: int
    data: bytes


class ResourcesRecord(NamedTuple):
    kind: RecordKind
    host: str
    time: float
    timestamp: float
    values: dict[str, float]  # complete names, ``resources/...``


class TensorRecord(NamedTuple):
    kind: RecordKind
    step: int
    time: float
    timestamp: float
    name: str
    shape: list[int]  # one length per axis of the metric's grid
    data: bytes  # little-endian float64 values, C order


class GridRecord(NamedTuple):
    kind: RecordKind
    metric: str
    grid: str  # the grid's name
    axes: list[list[float]]  # each axis's ticks
    labels: list[str]  # one per axis


class TagsSetRecord(NamedTuple):
    kind: RecordKind
    tags: list[str]  # the run's tags from now on


class AlertAttachRecord(NamedTuple):
    kind: RecordKind
    names: list[str]  # alerts of the run to evaluate and attach from now on


class SamplePidRecord(NamedTuple):
    kind: RecordKind
    pid: int  # the process (on the sender's node) its resource figures follow


class MetricColumnsRecord(NamedTuple):
    """``rows`` consecutive METRICS records that log the same ``names``, as columns of
    ``rows`` little-endian numbers each (``simvue.transport.columns``)."""

    kind: RecordKind
    rows: int
    names: list[str]
    steps: bytes  # int64
    times: bytes  # float64, seconds since the run started
    timestamps: bytes  # float64, epoch seconds
    values: list[bytes]  # float64, one column per name


RECORD_TYPES: dict[RecordKind, Any] = {  # each a NamedTuple class, with ``_make``
    RecordKind.METRICS: MetricsRecord,
    RecordKind.EVENT: EventRecord,
    RecordKind.METADATA: MetadataRecord,
    RecordKind.TAGS: TagsRecord,
    RecordKind.STATUS: StatusRecord,
    RecordKind.FOLDER: FolderRecord,
    RecordKind.ALERT: AlertRecord,
    RecordKind.ALERT_STATE: AlertStateRecord,
    RecordKind.ARTIFACT: ArtifactRecord,
    RecordKind.ARTIFACT_CHUNK: ArtifactChunkRecord,
    RecordKind.RESOURCES: ResourcesRecord,
    RecordKind.TENSOR: TensorRecord,
    RecordKind.GRID: GridRecord,
    RecordKind.TAGS_SET: TagsSetRecord,
    RecordKind.ALERT_ATTACH: AlertAttachRecord,
    RecordKind.SAMPLE_PID: SamplePidRecord,
    RecordKind.METRIC_COLUMNS: MetricColumnsRecord,
}

ARTIFACT_CHUNK_BYTES = 1 << 20
MAX_ARTIFACT_BYTES_IN_FLIGHT = 8 << 20
# A sender's DATA payload is at most MAX_PAYLOAD_BYTES (a batch that would be larger is split);
# the aggregator's socket refuses any frame larger than MAX_FRAME_BYTES (libzmq drops it
# unread), so no sender, honest or not, can make it hold more than that at once.
MAX_PAYLOAD_BYTES = 32 << 20
MAX_FRAME_BYTES = 64 << 20

MAC_BYTES = 32
# The most rows one METRIC_COLUMNS record may hold (a sender's batch has at most 20,000).
MAX_COLUMN_ROWS = 1 << 20


class Message(NamedTuple):
    kind: MessageKind
    seq: int
    body: Any


class BadFrame(Exception):
    """A message that failed authentication or decoding."""


class VersionMismatch(BadFrame):
    """An authentic message in another protocol version (``version``): a process of the run
    runs another version of simvue."""

    def __init__(self, version: int) -> None:
        super().__init__(f"protocol version {version}, not {PROTOCOL_VERSION}")
        self.version = version


def encode(key: bytes, kind: MessageKind, seq: int, body: Any) -> list[bytes]:
    """The frames of one message."""
    return encode_packed(key, kind, seq, msgpack.packb(body))


def encode_packed(key: bytes, kind: MessageKind, seq: int, packed_body: bytes) -> list[bytes]:
    """The frames of one message whose body is already packed: the payload array is its
    header and first three elements followed by the body's bytes, as ``packb`` would make it."""
    payload = b"\x94" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb(kind) + msgpack.packb(seq) + packed_body
    return [hmac.new(key, payload, hashlib.sha256).digest(), payload]


def sign(key: bytes, payload: bytes) -> list[bytes]:
    """The frames of an already encoded payload (a message sent again)."""
    return [hmac.new(key, payload, hashlib.sha256).digest(), payload]


def decode(key: bytes, frames: list[bytes]) -> Message:
    """One message; raises ``BadFrame`` if it is not authentic or not a message."""
    if len(frames) != 2 or len(frames[0]) != MAC_BYTES:
        raise BadFrame(f"expected 2 frames with a {MAC_BYTES}-byte mac")
    mac, payload = frames
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise BadFrame("mac mismatch")
    try:
        version, kind, seq, body = msgpack.unpackb(payload, use_list=True, strict_map_key=False)
        kind = MessageKind(kind)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad frame
        raise BadFrame(f"undecodable payload: {exc}") from None
    if version != PROTOCOL_VERSION and version.__class__ is int:
        raise VersionMismatch(version)
    if version != PROTOCOL_VERSION or seq.__class__ is not int:
        raise BadFrame(f"unsupported message version={version!r} seq={seq!r}")
    return Message(kind, seq, body)
