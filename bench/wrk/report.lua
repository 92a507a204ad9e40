-- wrk script for the Stepgate benchmark.
--
-- Usage: wrk ... -s report.lua URL -- METHOD [BODY]
--   METHOD  GET, POST, ... (default GET)
--   BODY    request body sent with every request (optional)
-- Headers (Content-Type, Prefer, ...) are given to wrk with -H.
--
-- At the end it prints one line the harness parses:
--   BENCH_RESULT {"requests": ..., "p50_us": ..., "p99_us": ..., ...}
-- Latencies are wrk's per-request figures in microseconds.

function init(args)
  -- Runs in every thread before wrk formats the (static) request.
  local method = args[1]
  if method ~= nil and method ~= "" then
    wrk.method = method
  end
  local body = args[2]
  if body ~= nil and body ~= "" then
    wrk.body = body
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"mean_us": %.1f, "stdev_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, latency.stdev))
end
