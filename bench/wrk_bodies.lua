-- wrk script: POST prepared request bodies, cycling through them: any route, any encoding.
-- The list file (the script's first argument) has one body per line, tab-separated:
--   PATH<TAB>CONTENT-TYPE[<TAB>HEADER-NAME: VALUE]
-- e.g. an Open Inference Protocol binary request and its Inference-Header-Content-Length.
--   wrk -t1 -c32 -d15s -s bench/wrk_bodies.lua URL -- LIST
-- done() prints the same WRK_JSON line as bench/wrk_multipart.lua.

local bodies = {}
local counter = 0

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. path)
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local list = args[1] or error("give the body list: wrk ... -- LIST")
  for line in io.lines(list) do
    if line ~= "" then
      local path, ctype, extra = line:match("^([^\t]+)\t([^\t]+)\t?(.*)$")
      assert(path, "bad line in " .. list .. ": " .. line)
      local headers = {["Content-Type"] = ctype}
      if extra ~= "" then
        local name, value = extra:match("^([^:]+):%s*(.*)$")
        headers[name] = value
      end
      bodies[#bodies + 1] = wrk.format("POST", nil, headers, read_file(path))
    end
  end
  assert(#bodies > 0, "the body list " .. list .. " names no bodies")
  counter = math.random(#bodies) - 1
end

function request()
  counter = counter + 1
  return bodies[(counter % #bodies) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, '
    .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, '
    .. '"p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean))
end
