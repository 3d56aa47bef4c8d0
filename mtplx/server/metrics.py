"""Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported)
from prometheus_client import disable_created_metrics

disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

from mtplx.server.engine import GenStats


class PrefixCacheCollector:
    """The prefix cache's counters and size, read at scrape time (mtplx.prefix.PrefixCache)."""

    COUNTERS = (
        ("hit_tokens", "Prompt tokens restored from the prefix cache"),
        ("miss_tokens", "Prompt tokens prefilled after a prefix cache lookup"),
        ("disk_hit_tokens", "Of the restored tokens, those read back from the disk tier"),
        ("stored_tokens", "Prompt tokens stored in the prefix cache"),
        ("stored_bytes", "Bytes stored in the prefix cache"),
        ("evicted_tokens", "Tokens evicted from the prefix cache for memory"),
        ("evicted_bytes", "Bytes evicted from the prefix cache for memory"),
        ("expired_tokens", "Tokens dropped from the prefix cache by the TTL"),
    )

    def __init__(self, cache):
        self.cache = cache

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.cache.counters
        for name, doc in self.COUNTERS:
            yield CounterMetricFamily(f"mtplx_prefix_cache_{name}", doc, value=getattr(c, name))
        yield CounterMetricFamily("mtplx_prefix_cache_lookups", "Prefix cache lookups (one per request)",
                                  value=c.lookups)
        yield GaugeMetricFamily("mtplx_prefix_cache_bytes", "Bytes held by the prefix cache in memory",
                                value=self.cache.bytes)
        yield GaugeMetricFamily("mtplx_prefix_cache_capacity_bytes", "The prefix cache's memory budget",
                                value=self.cache.max_bytes)
        yield GaugeMetricFamily("mtplx_prefix_cache_tokens", "Tokens held by the prefix cache in memory",
                                value=self.cache.tokens)
        if self.cache.disk is not None:
            yield GaugeMetricFamily("mtplx_prefix_cache_disk_bytes", "Bytes of the prefix cache's disk tier",
                                    value=self.cache.disk.bytes)


class Metrics:
    def __init__(self, engine_ref=None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mtplx_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("mtplx_errors", "Error responses and failed generations by kind", ["kind"], registry=r)
        self.prompt_tokens = Counter("mtplx_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("mtplx_generation_tokens", "Tokens generated", registry=r)
        self.generations = Counter("mtplx_generations", "Finished generations by outcome", ["outcome"], registry=r)
        self.drafted = Counter("mtplx_draft_tokens", "MTP tokens drafted, by draft depth (1 = first draft)",
                               ["depth"], registry=r)
        self.accepted = Counter("mtplx_draft_accepted_tokens", "MTP drafts accepted, by draft depth",
                                ["depth"], registry=r)
        self.acceptance = Gauge("mtplx_acceptance_rate",
                                "Cumulative acceptance rate of drafts at each depth", ["depth"], registry=r)
        self.gen_tps = Gauge("mtplx_generation_tokens_per_second", "Decode speed of the last finished request",
                             registry=r)
        self.prompt_tps = Gauge("mtplx_prompt_tokens_per_second", "Prefill speed of the last finished request",
                                registry=r)
        self.gen_tps_hist = Histogram("mtplx_request_generation_tokens_per_second",
                                      "Per-request decode speed", registry=r,
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
        self.queue_depth = Gauge("mtplx_queue_depth", "Requests waiting for the engine", registry=r)
        self.active = Gauge("mtplx_active_generations", "Generations in progress", registry=r)
        self.latency = Histogram("mtplx_request_duration_seconds", "End-to-end generation time", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.tool_calls = Counter("mtplx_tool_calls", "Tool calls parsed from generated text", registry=r)
        self.tool_parse_failures = Counter("mtplx_tool_call_parse_failures",
                                           "Generated tool calls that could not be parsed (returned as text or "
                                           "closed incomplete), by reason", ["reason"], registry=r)
        self.batch_size = Histogram("mtplx_batch_size", "Requests sharing one verify forward, per engine step",
                                    registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.draft_depth = Histogram("mtplx_draft_depth_used", "Drafts per request in an engine step (the depth "
                                     "used, after the load's cap)", registry=r, buckets=(0, 0.5, 1, 1.5, 2, 2.5, 3, 4, 6))
        self.depth_capped = Counter("mtplx_depth_capped_steps", "Engine steps whose greedy requests drafted less "
                                    "than asked because the measured costs said so", registry=r)
        self.prefill_blocks = Histogram("mtplx_prefill_step_tokens", "Prompt tokens prefilled in one engine step "
                                        "(one block; running streams wait for it)", registry=r,
                                        buckets=(16, 64, 128, 256, 512, 1024, 2048))
        self._drafted_tot: dict[int, int] = {}
        self._accepted_tot: dict[int, int] = {}
        self._engine = engine_ref
        cache = getattr(getattr(engine_ref, "model", None), "prefix_cache", None)
        if cache is not None:
            r.register(PrefixCacheCollector(cache))
        self.cached_tokens = Counter("mtplx_prompt_cached_tokens", "Prompt tokens of finished requests served "
                                     "from the prefix cache", registry=r)
        if engine_ref is not None:
            self.queue_depth.set_function(lambda: engine_ref.queue_depth)
            self.active.set_function(lambda: engine_ref.active_count)

    def record_generation(self, stats: GenStats, outcome: str, wall_s: float) -> None:
        """Called from the engine thread when a generation ends."""
        self.generations.labels(outcome=outcome).inc()
        if outcome == "error":
            self.errors.labels(kind="generation").inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        self.latency.observe(wall_s)
        if stats.decode_s > 0 and stats.generated_tokens > 1:
            tps = (stats.generated_tokens - 1) / stats.decode_s
            self.gen_tps.set(tps)
            self.gen_tps_hist.observe(tps)
        if stats.prompt_s > 0 and stats.prompt_tokens > stats.cached_tokens:
            self.prompt_tps.set((stats.prompt_tokens - stats.cached_tokens) / stats.prompt_s)
        for k, (d, a) in enumerate(zip(stats.drafted_by_depth, stats.accepted_by_depth), start=1):
            if d <= 0:
                continue
            self.drafted.labels(depth=str(k)).inc(d)
            self.accepted.labels(depth=str(k)).inc(a)
            self._drafted_tot[k] = self._drafted_tot.get(k, 0) + d
            self._accepted_tot[k] = self._accepted_tot.get(k, 0) + a
            self.acceptance.labels(depth=str(k)).set(self._accepted_tot[k] / self._drafted_tot[k])

    def record_step(self, report) -> None:
        """A batched engine step (mtplx.decoding.batch.StepReport), from the engine thread."""
        if report.batch:
            self.batch_size.observe(report.batch)
            self.draft_depth.observe((report.rows - report.batch) / report.batch)
            if report.depth_cap is not None:
                self.depth_capped.inc()
        if report.prefill_tokens:
            self.prefill_blocks.observe(report.prefill_tokens)

    def record_tool_calls(self, n_calls: int, failures: list[str]) -> None:
        self.tool_calls.inc(n_calls)
        for reason in failures:
            self.tool_parse_failures.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
