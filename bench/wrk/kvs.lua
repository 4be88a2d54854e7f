-- wrk script for kvs's /kv-store dialect: uniform keys k0..k9999, 256-byte values.
-- MODE=get or MODE=put (environment); no causal payload (each request its own client).
local mode = os.getenv("MODE") or "get"
local keys = tonumber(os.getenv("KEYS") or "10000")
local value = string.rep("v", 256)
local body = "val=" .. value
math.randomseed(os.time())
request = function()
  local path = "/kv-store/k" .. math.random(0, keys - 1)
  if mode == "put" then
    return wrk.format("PUT", path, {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
  end
  return wrk.format("GET", path)
end
