"""``GET /metrics`` of ``distillsr serve``: counters and a latency histogram in the Prometheus
text exposition format (version 0.0.4), kept in memory behind one lock."""
from __future__ import annotations

import threading
from typing import Dict, Sequence

__all__ = ["Metrics", "LATENCY_BUCKETS", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds; upper bounds of the latency histogram's buckets (+Inf is added)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class Metrics:
    """Requests to ``/v1/upscale`` by status, their latency, input pixels upscaled; the queue
    depth, jobs running and jobs dropped are read from the service when scraped."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.lock = threading.Lock()
        self.buckets = tuple(buckets)
        self.by_status: Dict[int, int] = {}
        self.bucket_counts = [0] * len(self.buckets)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.pixels_in = 0
        self.pixels_out = 0

    def observe(self, status: int, seconds: float) -> None:
        with self.lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1
            for i, b in enumerate(self.buckets):
                if seconds <= b:
                    self.bucket_counts[i] += 1
            self.latency_sum += seconds
            self.latency_count += 1

    def add_pixels(self, pixels_in: int, pixels_out: int) -> None:
        with self.lock:
            self.pixels_in += pixels_in
            self.pixels_out += pixels_out

    def render(self, gauges: Dict[str, tuple]) -> str:
        """The exposition text; ``gauges`` maps a metric name to ``(help, value or callable)``."""
        lines = []

        def head(name, kind, text):
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
        with self.lock:
            head("distillsr_requests_total", "counter", "Upscale requests answered, by HTTP status.")
            for status in sorted(self.by_status):
                lines.append(f'distillsr_requests_total{{status="{status}"}} {self.by_status[status]}')
            head("distillsr_request_seconds", "histogram", "Upscale request latency (arrival to answer).")
            for b, n in zip(self.buckets, self.bucket_counts):
                lines.append(f'distillsr_request_seconds_bucket{{le="{b:g}"}} {n}')
            lines.append(f'distillsr_request_seconds_bucket{{le="+Inf"}} {self.latency_count}')
            lines.append(f"distillsr_request_seconds_sum {self.latency_sum!r}")
            lines.append(f"distillsr_request_seconds_count {self.latency_count}")
            head("distillsr_pixels_processed_total", "counter", "Input pixels upscaled (successful requests).")
            lines.append(f"distillsr_pixels_processed_total {self.pixels_in}")
            head("distillsr_pixels_output_total", "counter", "Output pixels produced (successful requests).")
            lines.append(f"distillsr_pixels_output_total {self.pixels_out}")
        for name, (text, value) in gauges.items():
            v = value() if callable(value) else value
            kind = "counter" if name.endswith("_total") else "gauge"
            head(name, kind, text)
            lines.append(f"{name} {_num(v)}")
        return "\n".join(lines) + "\n"
