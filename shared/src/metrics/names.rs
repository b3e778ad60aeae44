//! Metric names. Changing one breaks dashboards and autoscalers: treat them as API (the
//! README's metrics table lists them, and a test keeps the two equal).

/// Replies sent, by outcome.
pub const REQUESTS_TOTAL: &str = "broker_requests_total";
/// Read from the front socket to reply sent.
pub const REQUEST_DURATION_SECONDS: &str = "broker_request_duration_seconds";
/// Read to picked up by a worker.
pub const QUEUE_WAIT_SECONDS: &str = "broker_queue_wait_seconds";
/// Requests read and not yet answered.
pub const INFLIGHT_REQUESTS: &str = "broker_inflight_requests";
/// The time integral of requests held: `rate / broker_workers` is the mean concurrency
/// per worker, the autoscaling signal.
pub const INFLIGHT_SECONDS_TOTAL: &str = "broker_inflight_seconds_total";
/// Request bytes held (what `--max-inflight-bytes` bounds).
pub const INFLIGHT_BYTES: &str = "broker_inflight_bytes";
/// Pool size.
pub const WORKERS: &str = "broker_workers";
/// Workers running a request now.
pub const WORKERS_BUSY: &str = "broker_workers_busy";
/// Workers on their current request for longer than `--stuck-after`.
pub const WORKERS_STUCK: &str = "broker_workers_stuck";
/// Time workers spent running requests; `rate / broker_workers` is utilisation.
pub const WORKER_BUSY_SECONDS_TOTAL: &str = "broker_worker_busy_seconds_total";
/// Replies that could not be delivered, by reason.
pub const REPLIES_DROPPED_TOTAL: &str = "broker_replies_dropped_total";
/// Request bytes read, every frame after the routing id (the help text is the definition).
pub const RECEIVED_BYTES_TOTAL: &str = "broker_received_bytes_total";
/// Reply bytes sent, every frame after the routing id (the help text is the definition).
pub const SENT_BYTES_TOTAL: &str = "broker_sent_bytes_total";
/// Requests refused (not run), by reason: why work was turned away.
pub const REQUESTS_REFUSED_TOTAL: &str = "broker_requests_refused_total";
/// Seconds of work asked of the pool, refused demand included: `rate / broker_workers` is the
/// offered load per worker, the autoscaling signal.
pub const DEMAND_SECONDS_TOTAL: &str = "broker_demand_seconds_total";
/// The queue-wait target in force (`--queue-target`, raised to follow the service time).
pub const QUEUE_TARGET_SECONDS: &str = "broker_queue_target_seconds";
/// The mean handler time admission predicts with.
pub const SERVICE_SECONDS: &str = "broker_service_seconds";
/// The memory limit the guard keeps the process under (0: none).
pub const MEMORY_LIMIT_BYTES: &str = "broker_memory_limit_bytes";
/// Health requests answered by the coordinator (`broker probe`).
pub const HEALTH_CHECKS_TOTAL: &str = "broker_health_checks_total";
/// Front connections open.
pub const CONNECTIONS: &str = "broker_connections";
/// Front connections refused, by reason.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "broker_connections_refused_total";
/// Front connections the broker closed to stay within its bounds, by reason.
pub const CONNECTIONS_RESET_TOTAL: &str = "broker_connections_reset_total";
/// Bytes held for front connections in libzmq and the kernel, by direction.
pub const BUFFERED_BYTES: &str = "broker_buffered_bytes";
/// 1 while the broker refuses new work because it is near its memory limit.
pub const MEMORY_SHEDDING: &str = "broker_memory_shedding";
/// 1 from SIGTERM on.
pub const DRAINING: &str = "broker_draining";
/// Client keys in force from `--curve-allow-keys`.
pub const CURVE_ALLOWED_KEYS: &str = "broker_curve_allowed_keys";
/// Reads of a changed `--curve-allow-keys` file, by result.
pub const CURVE_KEY_RELOADS_TOTAL: &str = "broker_curve_key_reloads_total";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "broker_build_info";
