-- POSTs a JSON body, rotating `Authorization: Bearer <key>` over the keys in a file (one a line).
--
--   wrk -t2 -c32 -d10s -s bench/wrk_post.lua URL -- KEYS_FILE BODY_FILE
--
-- KEYS_FILE may be empty (no Authorization header). Every response is checked: a status outside 2xx counts
-- as non2xx, a 2xx body holding an "error" object (a stream that broke after its headers) as error_bodies.
-- done() prints one line: `BENCH_JSON {...}` with requests, RPS, latency percentiles (µs) and all errors.

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

local requests = {}
local next_request = 0
non2xx = 0
error_bodies = 0
statuses = {}

local function read_file(path)
   local file = assert(io.open(path, "rb"))
   local text = file:read("*a")
   file:close()
   return text
end

function init(args)
   local body = read_file(args[2])
   for line in io.lines(args[1]) do
      if line ~= "" then
         local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. line }
         table.insert(requests, wrk.format("POST", nil, headers, body))
      end
   end
   if #requests == 0 then
      table.insert(requests, wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body))
   end
   -- threads start at different keys, so they do not walk the key list in step
   next_request = (thread_index * 7919) % #requests
end

function request()
   next_request = next_request % #requests + 1
   return requests[next_request]
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      statuses[status] = (statuses[status] or 0) + 1
   elseif body ~= nil and string.find(body, '"error":', 1, true) then
      error_bodies = error_bodies + 1
   end
end

function done(summary, latency, requests_done)
   local bad_status, bad_bodies, by_status = 0, 0, {}
   for _, thread in ipairs(threads) do
      bad_status = bad_status + thread:get("non2xx")
      bad_bodies = bad_bodies + thread:get("error_bodies")
      for status, count in pairs(thread:get("statuses")) do
         by_status[status] = (by_status[status] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(by_status) do
      table.insert(parts, string.format('"%d":%d', status, count))
   end
   local errors = summary.errors
   local seconds = summary.duration / 1e6
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_s":%.3f,"bytes":%d,"rps":%.2f,'
         .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d},'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"non2xx":%d,"statuses":{%s},"error_bodies":%d}\n',
      summary.requests, seconds, summary.bytes, summary.requests / seconds,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      bad_status, table.concat(parts, ","), bad_bodies))
end
