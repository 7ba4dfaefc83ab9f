-- wrk script: POST one JPEG per request as multipart/form-data field `images` (as `curl -F` does),
-- cycling through the files listed one per line in the file given as the script's first argument.
--   wrk -t1 -c32 -d15s -s bench/wrk_multipart.lua URL -- FILELIST [FIELD]
-- A line may instead name a prepared body, tab-separated: PATH<TAB>CONTENT-TYPE[<TAB>HEADER: VALUE],
-- sent as it is (e.g. an Open Inference Protocol binary request with its
-- Inference-Header-Content-Length; bench/request_cost.py --routes oip-pixels).
-- Requests are built once per thread in init(), so a request costs wrk a table lookup, not a file read.
-- done() prints one JSON line (prefix "WRK_JSON ") that bench/serve_wrk.py reads.

local boundary = "cnnloopwrkboundary7d1f"
local bodies = {}
local counter = 0

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. path)
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  local list = args[1] or error("give the file list: wrk ... -- FILELIST [FIELD]")
  local field = args[2] or "images"
  for line in io.lines(list) do
    if line ~= "" then
      local path, ctype, extra = line:match("^([^\t]+)\t([^\t]+)\t?(.*)$")
      if path then  -- a prepared body
        local headers = {["Content-Type"] = ctype}
        if extra ~= "" then
          local name, value = extra:match("^([^:]+):%s*(.*)$")
          headers[name] = value
        end
        bodies[#bodies + 1] = wrk.format("POST", nil, headers, read_file(path))
      else  -- a JPEG, as a multipart upload
        local name = line:match("([^/]+)$")
        bodies[#bodies + 1] = wrk.format("POST", nil, {["Content-Type"] = "multipart/form-data; boundary=" .. boundary},
          "--" .. boundary .. "\r\n"
          .. 'Content-Disposition: form-data; name="' .. field .. '"; filename="' .. name .. '"\r\n'
          .. "Content-Type: image/jpeg\r\n\r\n" .. read_file(line) .. "\r\n--" .. boundary .. "--\r\n")
      end
    end
  end
  assert(#bodies > 0, "the file list " .. list .. " names no files")
  -- Threads start at different files, so they do not all send the same image at once.
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
