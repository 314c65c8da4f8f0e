"""Prometheus metric definitions, one place for every ``dispatchd_`` name.

The names, types and labels are the contract of docs/monitoring.md § Metrics;
every module imports its metrics from here so none is defined twice. They
live on a dedicated registry so tests and embedders never collide with the
process-wide default registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dispatchd import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

DISPATCH_STATES = ("scheduled", "running", "finished", "inactive", "invalid")

DISPATCHES = Gauge(
    "dispatchd_dispatches",
    "Known dispatches per microgrid, by schedule state.",
    ["microgrid_id", "state"],
    registry=REGISTRY,
)

MESSAGES_PUBLISHED = Counter(
    "dispatchd_messages_published_total",
    "Messages the broker confirmed, by kind (lifecycle/running) and event.",
    ["kind", "event"],
    registry=REGISTRY,
)

MESSAGES_UNROUTABLE = Counter(
    "dispatchd_messages_unroutable_total",
    "Messages the broker returned because no queue was bound to receive them.",
    ["kind"],
    registry=REGISTRY,
)

PUBLISH_NACKED = Counter(
    "dispatchd_publish_nacked_total",
    "Publishes the broker refused (nack, e.g. a full queue with overflow reject-publish); "
    "each is retried after its dispatch's own backoff.",
    ["kind"],
    registry=REGISTRY,
)

OUTBOX_MESSAGES = Gauge(
    "dispatchd_outbox_messages",
    "Messages written to the durable outbox and not yet confirmed by the broker.",
    registry=REGISTRY,
)

TRANSITION_LATENESS = Histogram(
    "dispatchd_transition_lateness_seconds",
    "How late a message was emitted after its transition was due (emitted_at - scheduled_for).",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)

API_STREAM_UP = Gauge(
    "dispatchd_api_stream_up",
    "1 while the dispatch API event stream of a microgrid is connected.",
    ["microgrid_id"],
    registry=REGISTRY,
)

API_SKIPPED_DISPATCHES = Counter(
    "dispatchd_api_skipped_dispatches_total",
    "Dispatches from the API the daemon could not take (undecodable or unconvertible); "
    "each is skipped and logged, the rest of the microgrid syncs.",
    ["microgrid_id"],
    registry=REGISTRY,
)

API_RECONNECTS = Counter(
    "dispatchd_api_reconnects_total",
    "Reconnections to the dispatch API stream.",
    ["microgrid_id"],
    registry=REGISTRY,
)

API_LAST_SYNC_TIMESTAMP = Gauge(
    "dispatchd_api_last_sync_timestamp_seconds",
    "Unix time of the last completed full sync with the dispatch API.",
    ["microgrid_id"],
    registry=REGISTRY,
)

BROKER_UP = Gauge(
    "dispatchd_broker_up",
    "1 while the publisher is connected to the broker with a usable channel.",
    registry=REGISTRY,
)

READY = Gauge(
    "dispatchd_ready",
    "1 while /readyz answers 200 (every microgrid synced, broker connected); set when read.",
    registry=REGISTRY,
)

RPC_REQUESTS = Counter(
    "dispatchd_rpc_requests_total",
    "Snapshot RPC requests, by method and outcome.",
    ["method", "outcome"],
    registry=REGISTRY,
)

STORE_COMMIT_SECONDS = Histogram(
    "dispatchd_store_commit_seconds",
    "Time of one commit of the state store (records, meta and outbox in one transaction).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    registry=REGISTRY,
)

LEASE_ACQUIRED = Counter(
    "dispatchd_lease_acquired_total",
    "Microgrid leases this replica acquired (PostgreSQL store).",
    registry=REGISTRY,
)

LEASE_RELEASED = Counter(
    "dispatchd_lease_released_total",
    "Microgrid leases this replica handed over gracefully (rebalance or shutdown).",
    registry=REGISTRY,
)

LEASE_LOST = Counter(
    "dispatchd_lease_lost_total",
    "Microgrid leases this replica lost: not renewed in time, or a fenced commit.",
    registry=REGISTRY,
)

MICROGRIDS_OWNED = Gauge(
    "dispatchd_microgrids_owned",
    "Microgrids this process owns now (every configured one with the SQLite store).",
    registry=REGISTRY,
)

MICROGRIDS_CONFIGURED = Gauge(
    "dispatchd_microgrids_configured",
    "Microgrids in this process's microgrid_ids setting; replicas of a cluster share them, "
    "so fewer owned than configured over a cluster means one runs nowhere.",
    registry=REGISTRY,
)

CLUSTER_REPLICAS = Gauge(
    "dispatchd_cluster_replicas",
    "Live replicas seen in the membership table at the last renewal (PostgreSQL store).",
    registry=REGISTRY,
)

BUILD_INFO = Gauge(
    "dispatchd_build_info",
    "Always 1; the version label tells which build runs.",
    ["version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(version=__version__).set(1)
