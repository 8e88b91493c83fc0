"""The control-plane store: users, teams, API keys, endpoints, revisions, replicas, grants, usage, leases, audit.

One module per concern (schema, keys, access, endpoints, routes, usage, leases, audit); the public names are
re-exported here so callers write `store.create_key(...)`. The gateway reads through `tasks.store.routes`.
"""

from tasks.store import audit
from tasks.store.access import grant, list_grants, revoke_grant
from tasks.store.endpoints import (
    ENDPOINT_STATUSES,
    REPLICA_STATES,
    REVISION_STATUSES,
    EndpointView,
    add_replica,
    add_revision,
    attach_server,
    get_endpoint,
    gpus_in_use,
    list_endpoints,
    list_replicas,
    list_revisions,
    replica_failures,
    set_live_revision,
    set_replica_state,
    set_revision_facts,
    set_revision_status,
    spec_hash,
    supervised_replica,
    upsert_endpoint,
)
from tasks.store.keys import (
    KEY_PREFIX,
    CreatedKey,
    KeyInfo,
    create_key,
    ensure_user,
    get_key,
    hash_secret,
    list_keys,
    revoke_key,
    split_key,
    verify_key,
)
from tasks.store.leases import DeployInProgress, deploy_lease
from tasks.store.routes import EndpointRoute, ReplicaRoute, load_routes, routes_epoch
from tasks.store.schema import (
    ROUTES_EPOCH,
    AccessGrant,
    ApiKey,
    AuditEntry,
    Base,
    DeployLease,
    Endpoint,
    EndpointRevision,
    Meta,
    ReplicaRow,
    Team,
    UsageRecord,
    User,
    UTCDateTime,
    bump_epoch,
    get_engine,
    parse_duration,
    session_scope,
    utcnow,
)
from tasks.store.usage import USAGE_FIELDS, UsageSummary, add_usage, list_usage, summarize_usage

__all__ = [
    "ENDPOINT_STATUSES", "KEY_PREFIX", "REPLICA_STATES", "REVISION_STATUSES", "ROUTES_EPOCH", "USAGE_FIELDS",
    "AccessGrant", "ApiKey", "AuditEntry", "Base", "CreatedKey", "DeployInProgress", "DeployLease", "Endpoint",
    "EndpointRevision", "EndpointRoute", "EndpointView", "KeyInfo", "Meta", "ReplicaRoute", "ReplicaRow", "Team",
    "UTCDateTime", "UsageRecord", "UsageSummary", "User",
    "add_replica", "add_revision", "add_usage", "attach_server", "audit", "bump_epoch", "create_key",
    "deploy_lease", "ensure_user", "get_endpoint", "get_engine", "gpus_in_use", "get_key", "grant", "hash_secret",
    "list_endpoints",
    "list_grants", "list_keys", "list_replicas", "list_revisions", "list_usage", "load_routes", "parse_duration",
    "replica_failures", "revoke_grant", "revoke_key", "routes_epoch", "session_scope", "set_live_revision",
    "set_replica_state",
    "set_revision_facts", "set_revision_status", "spec_hash", "split_key", "summarize_usage", "supervised_replica",
    "upsert_endpoint",
    "utcnow", "verify_key",
]
