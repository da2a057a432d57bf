-- GET /users/{id} with an id drawn at random from 1..N for every request, N given after `--`:
--   wrk -t1 -c32 -d4s -s bench/wrk/users.lua http://127.0.0.1:8080 -- 5000
-- Random ids keep PostgreSQL reading across the whole table rather than one cached row.
-- A `request` function makes every request dynamic, which costs wrk some CPU, so GET / uses
-- report.lua alone and keeps wrk's static, prebuilt request.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local max_id = 1

function init(args)
  max_id = tonumber(args[1]) or 1
  -- Each wrk thread has its own Lua state; seed each differently.
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16))
end

function request()
  return wrk.format("GET", "/users/" .. math.random(1, max_id))
end
