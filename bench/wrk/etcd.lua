-- wrk script for etcd's v3 JSON gateway: the same keys and values as kvs.lua.
-- Keys and values are base64 in etcd's JSON API; they are encoded once, up front.
local mode = os.getenv("MODE") or "get"
local keys = tonumber(os.getenv("KEYS") or "10000")
local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(data)
  return ((data:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end
local value = b64(string.rep("v", 256))
local encoded = {}
for i = 0, keys - 1 do encoded[i] = b64("k" .. i) end
math.randomseed(os.time())
request = function()
  local k = encoded[math.random(0, keys - 1)]
  local headers = {["Content-Type"] = "application/json"}
  if mode == "put" then
    return wrk.format("POST", "/v3/kv/put", headers, '{"key":"' .. k .. '","value":"' .. value .. '"}')
  end
  return wrk.format("POST", "/v3/kv/range", headers, '{"key":"' .. k .. '"}')
end
