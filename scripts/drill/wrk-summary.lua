-- wrk script for the failover drill: plain GET / (wrk's default request), and
-- at the end one machine-readable line so the drill need not parse wrk's text.
-- errors.status counts responses that were not 2xx/3xx.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d,"p99_ms":%.3f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(99) / 1000))
end
