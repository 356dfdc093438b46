-- wrk script for scenario g: every connection waits PAUSE ms (script argument, default 2)
-- after each answer before it sends the next request, so the request rate stays fixed
-- and moderate (about connections * 1000 / (PAUSE + latency) per second) instead of
-- saturating the proxy. wrk measures latency from the write of a request, so the
-- pause is not counted in it. Same report line as wrk-report.lua.
local pause = 2
init = function(args)
  if args[1] then pause = tonumber(args[1]) end
end
delay = function()
  return pause
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"lat_mean_us":%.1f,"lat_max_us":%d}\n',
    summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
