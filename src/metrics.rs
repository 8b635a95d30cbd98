//! Prometheus metrics: what the proxy carried and how far behind the mirror is.
//!
//! Counters and histograms are updated where things happen; queue gauges (jobs by state, oldest
//! pending age) are read from the database when Prometheus scrapes, so they can never drift
//! from the truth.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::queue::{ErrorClass, TargetCounts};

// The request path's labels are static strings and numbers: recording a request allocates
// nothing once its label set exists.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// A method as a label: the registry protocol's methods by name, anything else as `other`
/// (so a client cannot grow the label set).
fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetStateLabels {
    target: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    target: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CreationLabels {
    target: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    target: String,
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheReadLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrimaryLabels {
    primary: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn lag_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

/// Every metric regtee exports.
pub(crate) struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    upstream_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    jobs: Family<TargetStateLabels, Gauge>,
    oldest_pending: Family<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    mirror_lag: Family<TargetLabels, Histogram, fn() -> Histogram>,
    lag_waiting: Family<TargetLabels, Histogram, fn() -> Histogram>,
    lag_copying: Family<TargetLabels, Histogram, fn() -> Histogram>,
    failures: Family<FailureLabels, Counter>,
    creations: Family<CreationLabels, Counter>,
    mirrored_bytes: Family<TargetLabels, Counter>,
    outcomes: Family<OutcomeLabels, Counter>,
    cache_reads: Family<CacheReadLabels, Counter>,
    cache_bytes: Family<SourceLabels, Counter>,
    cache_evictions: Counter,
    cache_verification_failures: Counter,
    cache_fallback_reads: Family<SourceLabels, Counter>,
    cache_size: Gauge,
    cache_entries: Gauge,
    primary: Family<PrimaryLabels, Gauge>,
    ready: Gauge,
}

/// How a read the pull-through cache handles was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheRead {
    /// From a verified copy on disk.
    Hit,
    /// From Harbor, filling the cache.
    Miss,
    /// From another client's fill in progress: no read of Harbor of its own.
    Coalesced,
    /// While Harbor could not answer: from the cache or a target.
    Fallback,
}

impl CacheRead {
    fn label(self) -> &'static str {
        match self {
            CacheRead::Hit => "hit",
            CacheRead::Miss => "miss",
            CacheRead::Coalesced => "coalesced",
            CacheRead::Fallback => "fallback",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under the `regtee_` prefix.
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("regtee");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Requests proxied to the upstream, by method, route kind and status",
            requests.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "proxy_body_bytes",
            "Body bytes carried by the proxy; direction=in is client to upstream",
            bytes.clone(),
        );
        let upstream_latency: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_response_seconds",
            "Time from receiving a request to the upstream's response head",
            upstream_latency.clone(),
        );
        let jobs = Family::<TargetStateLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Mirror jobs by target and state (done and skipped within retention)",
            jobs.clone(),
        );
        let oldest_pending = Family::default();
        registry.register(
            "oldest_pending_job_age_seconds",
            "Age of the oldest unfinished job per target (0 when none)",
            oldest_pending.clone(),
        );
        let mirror_lag: Family<TargetLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(lag_histogram);
        registry.register(
            "mirror_lag_seconds",
            "From the push being acknowledged by Harbor to the manifest being on the target",
            mirror_lag.clone(),
        );
        let lag_waiting: Family<TargetLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(lag_histogram);
        registry.register(
            "mirror_lag_waiting_seconds",
            "The part of the mirror lag a manifest's job spent waiting for a worker (queued, or backing off after a failed attempt): too few workers, or a target that refuses",
            lag_waiting.clone(),
        );
        let lag_copying: Family<TargetLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(lag_histogram);
        registry.register(
            "mirror_lag_copying_seconds",
            "The part of the mirror lag spent in the attempt that copied the manifest: a slow target or a slow read from Harbor",
            lag_copying.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "mirror_failures",
            "Failed mirror attempts by target and reason class (retried or final)",
            failures.clone(),
        );
        let creations = Family::<CreationLabels, Counter>::default();
        registry.register(
            "target_creations",
            "Namespaces and repositories regtee created on targets through their cloud's API (create_missing)",
            creations.clone(),
        );
        let mirrored_bytes = Family::<TargetLabels, Counter>::default();
        registry.register(
            "mirrored_bytes",
            "Blob bytes uploaded to each target",
            mirrored_bytes.clone(),
        );
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state, by target, kind and outcome",
            outcomes.clone(),
        );
        let cache_reads = Family::<CacheReadLabels, Counter>::default();
        registry.register(
            "cache_reads",
            "Reads the pull-through cache handled, by kind (blob, manifest) and result (hit, miss, coalesced, fallback)",
            cache_reads.clone(),
        );
        let cache_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "cache_served_bytes",
            "Bytes of cached reads' bodies, by where they came from (cache, harbor, or a target's name)",
            cache_bytes.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register(
            "cache_evictions",
            "Entries evicted to keep the cache under max_size",
            cache_evictions.clone(),
        );
        let cache_verification_failures = Counter::default();
        registry.register(
            "cache_verification_failures",
            "Contents whose bytes did not match their digest (from Harbor, a target, or a damaged file); never served whole, never kept",
            cache_verification_failures.clone(),
        );
        let cache_fallback_reads = Family::<SourceLabels, Counter>::default();
        registry.register(
            "cache_fallback_reads",
            "Reads served while Harbor could not answer, by source (cache, or a target's name)",
            cache_fallback_reads.clone(),
        );
        let cache_size = Gauge::default();
        registry.register(
            "cache_size_bytes",
            "Bytes the cache's entries take",
            cache_size.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Entries in the cache",
            cache_entries.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while this process is ready (/readyz answers 200), 0 while it is not",
            ready.clone(),
        );
        let primary = Family::<PrimaryLabels, Gauge>::default();
        registry.register(
            "primary_since_seconds",
            "The registry clients are served from (upstream: Harbor, or a target), and since when (Unix time; 0 from the start)",
            primary.clone(),
        );
        let direction = |d| {
            bytes
                .get_or_create(&DirectionLabels { direction: d })
                .clone()
        };
        Metrics {
            registry: Mutex::new(registry),
            requests,
            bytes_in: direction("in"),
            bytes_out: direction("out"),
            upstream_latency,
            jobs,
            oldest_pending,
            mirror_lag,
            lag_waiting,
            lag_copying,
            failures,
            creations,
            mirrored_bytes,
            outcomes,
            cache_reads,
            cache_bytes,
            cache_evictions,
            cache_verification_failures,
            cache_fallback_reads,
            cache_size,
            cache_entries,
            primary,
            ready,
        }
    }

    /// Blob bytes copied to `target` since this process started.
    pub(crate) fn mirrored_bytes(&self, target: &str) -> u64 {
        self.mirrored_bytes
            .get_or_create(&TargetLabels {
                target: target.to_string(),
            })
            .get()
    }

    /// Whether this process is ready (`/readyz`), for alerting on a replica that is not.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The primary: one series, the current one.
    pub(crate) fn set_primary(&self, name: &str, since_ms: i64) {
        self.primary.clear();
        self.primary
            .get_or_create(&PrimaryLabels {
                primary: name.to_string(),
            })
            .set(since_ms / 1000);
    }

    /// A read the cache handled.
    pub(crate) fn observe_cache_read(&self, manifest: bool, how: CacheRead) {
        let kind = if manifest { "manifest" } else { "blob" };
        self.cache_reads
            .get_or_create(&CacheReadLabels {
                kind,
                result: how.label(),
            })
            .inc();
    }

    /// Body bytes of a cached read, from `source` (`cache`, `harbor`, or a target's name).
    pub(crate) fn observe_cache_bytes(&self, source: &str, bytes: u64) {
        self.cache_bytes
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc_by(bytes);
    }

    /// Entries evicted.
    pub(crate) fn observe_evictions(&self, n: u64) {
        self.cache_evictions.inc_by(n);
    }

    /// Bytes that did not match their digest.
    pub(crate) fn observe_verification_failure(&self) {
        self.cache_verification_failures.inc();
    }

    /// A read served while Harbor could not answer, from `source`.
    pub(crate) fn observe_fallback(&self, source: &str) {
        self.cache_fallback_reads
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    /// The cache's size, for the gauges.
    pub(crate) fn set_cache_size(&self, bytes: u64, entries: u64) {
        self.cache_size.set(bytes as i64);
        self.cache_entries.set(entries as i64);
    }

    /// Called once per proxied request when its response is done.
    pub(crate) fn observe_request(
        &self,
        method: &http::Method,
        route: &'static str,
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
        upstream_latency: Option<Duration>,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method_label(method),
                route,
                status,
            })
            .inc();
        self.bytes_in.inc_by(bytes_in);
        self.bytes_out.inc_by(bytes_out);
        if let Some(latency) = upstream_latency {
            self.upstream_latency
                .get_or_create(&RouteLabels { route })
                .observe(latency.as_secs_f64());
        }
    }

    /// A manifest reached a target; `lag` runs from Harbor's acknowledgement.
    /// A manifest pushed live reached `target`: `waiting` of its lag before the attempt that
    /// copied it began, `copying` in that attempt.
    pub(crate) fn observe_mirror_lag(&self, target: &str, waiting: Duration, copying: Duration) {
        let labels = TargetLabels {
            target: target.to_string(),
        };
        self.mirror_lag
            .get_or_create(&labels)
            .observe((waiting + copying).as_secs_f64());
        self.lag_waiting
            .get_or_create(&labels)
            .observe(waiting.as_secs_f64());
        self.lag_copying
            .get_or_create(&labels)
            .observe(copying.as_secs_f64());
    }

    /// An attempt failed with an error of class `reason`.
    pub(crate) fn observe_failure(&self, target: &str, reason: ErrorClass) {
        self.failures
            .get_or_create(&FailureLabels {
                target: target.to_string(),
                reason: reason.as_str().to_string(),
            })
            .inc();
    }

    /// A namespace or repository created on a target.
    pub(crate) fn count_creation(&self, target: &str, creation: &crate::provision::Creation) {
        let kind = match creation {
            crate::provision::Creation::Namespace(_) => "namespace",
            crate::provision::Creation::Repository(_) => "repository",
        };
        self.creations
            .get_or_create(&CreationLabels {
                target: target.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Blob bytes uploaded to a target.
    pub(crate) fn observe_mirrored_bytes(&self, target: &str, bytes: u64) {
        self.mirrored_bytes
            .get_or_create(&TargetLabels {
                target: target.to_string(),
            })
            .inc_by(bytes);
    }

    /// A job reached done, skipped or failed.
    pub(crate) fn observe_outcome(&self, target: &str, kind: &str, outcome: &str) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                target: target.to_string(),
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Renders the text exposition format, with queue gauges from `counts`.
    pub(crate) fn render(&self, counts: &[TargetCounts], now_ms: i64) -> String {
        self.jobs.clear();
        self.oldest_pending.clear();
        for c in counts {
            for (state, n) in [
                ("pending", c.pending),
                ("running", c.running),
                ("done", c.done),
                ("skipped", c.skipped),
                ("failed", c.failed),
            ] {
                self.jobs
                    .get_or_create(&TargetStateLabels {
                        target: c.target.clone(),
                        state: state.to_string(),
                    })
                    .set(n as i64);
            }
            let age = c
                .oldest_pending_at
                .map(|t| ((now_ms - t).max(0) as f64) / 1000.0)
                .unwrap_or(0.0);
            self.oldest_pending
                .get_or_create(&TargetLabels {
                    target: c.target.clone(),
                })
                .set(age);
        }
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_requests_and_queue_gauges() {
        let m = Metrics::new();
        m.observe_request(
            &http::Method::PUT,
            "manifest",
            201,
            10,
            0,
            Some(Duration::from_millis(3)),
        );
        m.observe_mirror_lag(
            "tcr",
            Duration::from_millis(600),
            Duration::from_millis(200),
        );
        let text = m.render(
            &[TargetCounts {
                target: "tcr".into(),
                pending: 2,
                oldest_pending_at: Some(1_000),
                ..Default::default()
            }],
            11_000,
        );
        assert!(text.contains(
            r#"regtee_proxy_requests_total{method="PUT",route="manifest",status="201"} 1"#
        ));
        assert!(text.contains(r#"regtee_proxy_body_bytes_total{direction="in"} 10"#));
        assert!(text.contains(r#"regtee_jobs{target="tcr",state="pending"} 2"#));
        assert!(text.contains(r#"regtee_oldest_pending_job_age_seconds{target="tcr"} 10.0"#));
        assert!(text.contains("regtee_mirror_lag_seconds_count{target=\"tcr\"} 1"));
        assert!(text.contains("regtee_mirror_lag_seconds_sum{target=\"tcr\"} 0.8"));
        assert!(text.contains("regtee_mirror_lag_waiting_seconds_sum{target=\"tcr\"} 0.6"));
        assert!(text.contains("regtee_mirror_lag_copying_seconds_sum{target=\"tcr\"} 0.2"));
        assert!(text.ends_with("# EOF\n"));
    }
}
