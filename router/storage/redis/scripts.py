"""The Lua scripts that change a Redis storage, and the key layout (``_Keys``) they share
with Python: the two change together. Each change that must be atomic is one script, which
Redis runs alone; ``RedisStorage`` registers them all at ``open``, by the names its ``_run``
takes (``storage._SCRIPTS``)."""

from __future__ import annotations

# -- Lua --------------------------------------------------------------------------------------
#
# Every script gets the key prefix as ARGV[1] and builds key names from it with the helpers
# below, which ``_Keys`` mirrors in Python. Numbers that must survive exactly (timestamps)
# arrive as strings from Python and are stored as given; scores given to ZADD as Lua numbers
# are formatted by Redis with 17 significant digits, so they round-trip as well.
#
# Job states, per destination d: ready (zset ready:d, score = job id, so the lowest id —
# the oldest job — comes first), waiting for a retry (zset waiting:d, score = due time) and
# leased (zset leased:d, score = lease expiry; the job hash's ``owner`` names the holder).
# Every job is also in jobs:d (score = created_at: pending count and oldest) and in
# user:<len(d)>:d:<user> (score = id: the user's head, for ordered leasing).
#
# Ordered leasing walks users, not jobs, through an index of the users who have ready jobs,
# kept per destination once its first ordered lease has had it built (ready-users-built:
# 'building', then 'built'; none for a destination never leased ordered, which pays nothing
# for it): ready-users:d (member = user, score = the id of the user's lowest ready job) and,
# per user, user-ready:<len(d)>:d:<user> (the user's jobs in ready:d, score = id). Every move
# into or out of ready:d goes through ``make_ready`` and ``unready``, which keep both. The user
# sets and ready:d stay what decides: the index only says whom to look at, and the lease
# checks what it finds there against them (an entry left by a router of an earlier version,
# which knows no index, is dropped when met; one it did not write is added by ``index_pass``).
#
# Dead letters, per destination d: letters:d (score = letter id, the order they failed in),
# LETTERS_ALL (the same, every destination) and letters-placed:d (score = the letter's place,
# its ``accepted_id`` or, in a letter written before letters kept it, its own id): the order
# a replay walks, a page at a time. DEAD_LETTER adds a letter to all three and
# ``forget_letter`` takes it out of all three. Letters written by a version without
# letters-placed are added to it by ``place_pass``, which the first replay of d runs from the
# start (letters-placed-built: 'building', then 'built') and every replay from the
# letters-placed-cursor on: letter ids only grow, so every letter past the cursor is one the
# pass has not looked at yet, and every one before it is in the index.

_HELPERS = """
local P = ARGV[1]
local IDS = P .. ':ids'
local DESTINATIONS = P .. ':destinations'
local SEEN_COUNT = P .. ':seen-count'
local SEEN_PRUNED = P .. ':seen-pruned'
local LETTERS_ALL = P .. ':letters-all'
local INDEXED = P .. ':ready-users-built'
local INDEX_CURSOR = P .. ':ready-users-cursor'
local PLACED = P .. ':letters-placed-built'
local PLACED_CURSOR = P .. ':letters-placed-cursor'
local function job_key(id) return P .. ':job:' .. id end
local function ready_key(d) return P .. ':ready:' .. d end
local function waiting_key(d) return P .. ':waiting:' .. d end
local function leased_key(d) return P .. ':leased:' .. d end
local function jobs_key(d) return P .. ':jobs:' .. d end
-- length-prefixed: destination 'a:b' with user 'c' must not share a key with 'a' and 'b:c'
local function user_key(d, u) return P .. ':user:' .. #d .. ':' .. d .. ':' .. u end
local function letter_key(id) return P .. ':letter:' .. id end
local function letters_key(d) return P .. ':letters:' .. d end
local function placed_key(d) return P .. ':letters-placed:' .. d end
local function ready_users_key(d) return P .. ':ready-users:' .. d end
local function user_ready_key(d, u) return P .. ':user-ready:' .. #d .. ':' .. d .. ':' .. u end

-- Whether d's users with ready jobs are indexed (being built or built), read once a run.
local indexing = {}
local function indexed(d)
  if indexing[d] == nil then indexing[d] = redis.call('HEXISTS', INDEXED, d) == 1 end
  return indexing[d]
end

-- The user's entry in ready-users: the lowest of its ready jobs, or none when it has none.
local function rescore(d, user)
  local first = redis.call('ZRANGE', user_ready_key(d, user), 0, 0)
  if first[1] then
    redis.call('ZADD', ready_users_key(d), first[1], user)
  else
    redis.call('ZREM', ready_users_key(d), user)
  end
end

-- A ready job in the index: in its user's ready jobs, and the user's score at most its id.
local function index_ready(d, id, user)
  redis.call('ZADD', user_ready_key(d, user), id, id)
  local score = redis.call('ZSCORE', ready_users_key(d), user)
  if not score or tonumber(id) < tonumber(score) then
    redis.call('ZADD', ready_users_key(d), id, user)
  end
end

-- A job comes into d's ready queue (new, taken back, due again, released). ``user`` is read
-- from the job when not given, and only when d is indexed.
local function make_ready(d, id, user)
  redis.call('ZADD', ready_key(d), id, id)
  if indexed(d) then
    user = user or redis.call('HGET', job_key(id), 'user_key')
    if user then index_ready(d, id, user) end
  end
end

-- A job leaves d's ready queue (leased, or gone for good).
local function unready(d, id, user)
  redis.call('ZREM', ready_key(d), id)
  if user and indexed(d) and redis.call('ZREM', user_ready_key(d, user), id) == 1 then
    rescore(d, user)
  end
end

-- Up to ``count`` ready jobs of d past the index's cursor put in the index when missing, the
-- cursor moved past them, back to the start at the end of the queue; true at the end. Builds
-- the index (from the start, before the first ordered lease) and afterwards, a step at each
-- ordered lease that comes back short, finds the jobs a router of an earlier version queued
-- or put back without it. Through on a full Redis: its first write (HDEL) is one Redis never
-- refuses, and ordered delivery, which frees memory, waits for the index.
local function index_pass(d, count)
  local cursor = redis.call('HGET', INDEX_CURSOR, d) or '0'
  redis.call('HDEL', INDEX_CURSOR, d)
  local ids = redis.call('ZRANGEBYSCORE', ready_key(d), '(' .. cursor, '+inf', 'LIMIT', 0, count)
  for _, id in ipairs(ids) do
    local user = redis.call('HGET', job_key(id), 'user_key')
    if user and not redis.call('ZSCORE', user_ready_key(d, user), id) then
      index_ready(d, id, user)
    end
  end
  if #ids < count then return true end  -- the cursor, deleted, is back at the start
  redis.call('HSET', INDEX_CURSOR, d, ids[#ids])
  return false
end

-- A new job, due at once: in every index it belongs to.
local function enqueue(id, d, message_id, user, group, body, created)
  redis.call('HSET', job_key(id), 'destination', d, 'message_id', message_id,
             'user_key', user, 'group', group, 'body', body, 'created_at', created,
             'attempts', 0)
  redis.call('ZADD', jobs_key(d), created, id)
  redis.call('ZADD', user_key(d, user), id, id)
  make_ready(d, id, user)
  redis.call('SADD', DESTINATIONS, d)
end

-- A job gone for good (delivered or dead-lettered): out of every index, whatever its state.
local function forget(id, d, user)
  unready(d, id, user)
  redis.call('ZREM', waiting_key(d), id)
  redis.call('ZREM', leased_key(d), id)
  redis.call('ZREM', jobs_key(d), id)
  redis.call('ZREM', user_key(d, user), id)
  redis.call('DEL', job_key(id))
end

-- A dead letter gone (replayed or purged): out of its destination's indexes and the whole's.
local function forget_letter(lid, d)
  redis.call('DEL', letter_key(lid))
  redis.call('ZREM', letters_key(d), lid)
  redis.call('ZREM', LETTERS_ALL, lid)
  redis.call('ZREM', placed_key(d), lid)
end

-- Up to ``count`` letters of d past the letters-placed cursor, up to id ``upto``, put in
-- letters-placed when missing (written by a version without it), the cursor moved past them;
-- true once none is left up to ``upto``. Its first write (HDEL) is one Redis never refuses.
local function place_pass(d, upto, count)
  local cursor = redis.call('HGET', PLACED_CURSOR, d) or '0'
  redis.call('HDEL', PLACED_CURSOR, d)
  local ids = redis.call('ZRANGEBYSCORE', letters_key(d), '(' .. cursor, upto, 'LIMIT', 0, count)
  for _, lid in ipairs(ids) do
    if not redis.call('ZSCORE', placed_key(d), lid) then
      local place = redis.call('HGET', letter_key(lid), 'accepted_id') or lid
      redis.call('ZADD', placed_key(d), place, lid)
    end
  end
  redis.call('HSET', PLACED_CURSOR, d, ids[#ids] or cursor)
  return #ids < count
end

-- The job's destination when ``token`` holds its lease, else nil: a process whose lease
-- lapsed (and was taken over) must not record a fate for a job it no longer holds.
local function held_by(id, token)
  local fields = redis.call('HMGET', job_key(id), 'destination', 'owner')
  local d, owner = fields[1], fields[2]
  if not d or owner ~= token then return nil end
  if not redis.call('ZSCORE', leased_key(d), id) then return nil end
  return d
end

-- Takeover: leases that lapsed at or before ``now`` go back to the ready queue, whoever held
-- them (their holder is presumed dead). At most ``cap`` per call.
local function take_back_lapsed(d, now, cap)
  local lapsed = redis.call('ZRANGEBYSCORE', leased_key(d), '-inf', now, 'LIMIT', 0, cap)
  for _, id in ipairs(lapsed) do
    redis.call('ZREM', leased_key(d), id)
    redis.call('HDEL', job_key(id), 'owner')
    make_ready(d, id)
  end
  return #lapsed
end
"""

ACCEPT = _HELPERS + """
-- accept: remember each event's (source, messageId) and queue its jobs, all or nothing per
-- call (Redis runs the script alone). A key present with a logical expiry after ``now`` is a
-- duplicate; an expired one (still present because PX counts real time, or because ``now``
-- is a test's clock) is overwritten, starting a new window.
-- ARGV: prefix, now, expires_at, px, expiry_bucket, current_bucket, n_events; then per event:
--   dedup_key, n_jobs, and per job: destination, message_id, user_key, group, body.
-- Returns one 1 (accepted) or 0 (duplicate) per event.
local now = tonumber(ARGV[2])
local created, expires_at, px = ARGV[2], ARGV[3], ARGV[4]
local i = 8
local results = {}
local admitted = 0
for e = 1, tonumber(ARGV[7]) do
  local seen_key, n_jobs = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local prior = redis.call('GET', seen_key)
  if prior and (tonumber(prior) or 0) > now then
    results[e] = 0
  else
    redis.call('SET', seen_key, expires_at, 'PX', px)
    for j = 0, n_jobs - 1 do
      local at = i + 5 * j
      enqueue(redis.call('INCR', IDS), ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3],
              ARGV[at + 4], created)
    end
    admitted = admitted + 1
    results[e] = 1
  end
  i = i + 5 * n_jobs
end
-- dedup entries counted per minute of expiry (stats); buckets wholly in the past are dropped
-- once a minute, so the hash stays at about window / 60 fields.
if admitted > 0 then redis.call('HINCRBY', SEEN_COUNT, ARGV[5], admitted) end
local current = ARGV[6]
if redis.call('GET', SEEN_PRUNED) ~= current then
  for _, bucket in ipairs(redis.call('HKEYS', SEEN_COUNT)) do
    if tonumber(bucket) < tonumber(current) then redis.call('HDEL', SEEN_COUNT, bucket) end
  end
  redis.call('SET', SEEN_PRUNED, current)
end
return results
"""

LEASE = _HELPERS + """
-- lease: take back lapsed leases, promote retries come due, then take up to ``limit`` ready
-- jobs, lowest id (oldest) first, leasing them to ``token`` until ``lease_until``.
-- With ``ordered``, a job is taken only when no lower id of its (destination, user) holds
-- the user's line, in any state (ready, leased, waiting): every earlier job holds it, or
-- with ``hold`` (0: none) those that have failed fewer than ``hold`` attempts. An ordered
-- lease needs the destination's users indexed: when they are not (yet), it changes nothing
-- and returns -1, and the caller builds the index (INDEX) and asks again.
-- ARGV: prefix, destination, now, lease_until, limit, ordered (0/1), token, cap, scan_max,
-- page, hold, sweep
-- Returns per job: id, message_id, user_key, group, body, created_at, attempts, first_attempt_at
local d, now, lease_until = ARGV[2], ARGV[3], ARGV[4]
local limit, ordered, token = tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7]
local cap, scan_max, page = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local hold, sweep = tonumber(ARGV[11]), tonumber(ARGV[12])
if ordered and redis.call('HGET', INDEXED, d) ~= 'built' then return -1 end

-- The id of the user's first job that holds the line, or false: the user's head, or with
-- ``hold`` the first that has failed fewer attempts than that.
local function first_holding(user)
  if hold == 0 then return redis.call('ZRANGE', user_key(d, user), 0, 0)[1] or false end
  local start = 0
  while true do
    local ids = redis.call('ZRANGE', user_key(d, user), start, start + 9)
    if #ids == 0 then return false end
    for _, id in ipairs(ids) do
      if tonumber(redis.call('HGET', job_key(id), 'attempts') or '0') < hold then
        return id
      end
    end
    start = start + 10
  end
end

-- The user's jobs that may go, added to ``found`` (ids as numbers): its ready jobs up to
-- and including its first that holds the line (all of them when none holds), its lowest
-- ``limit`` at most. The one that holds the line is looked up in ready:d itself, so that a
-- head queued by a router of an earlier version, missing from the index, does not hold its
-- user back; an index entry no longer ready (a job such a router leased) is dropped.
local function takeable(user, found)
  local key = user_ready_key(d, user)
  local holding = first_holding(user)
  local ids
  if holding then
    ids = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. holding, 'LIMIT', 0, limit)
    ids[#ids + 1] = holding
  else
    ids = redis.call('ZRANGE', key, 0, limit - 1)
  end
  local stale = false
  for _, id in ipairs(ids) do
    if redis.call('ZSCORE', ready_key(d), id) then
      found[#found + 1] = tonumber(id)
    elseif redis.call('ZREM', key, id) == 1 then
      stale = true
    end
  end
  if stale then rescore(d, user) end
end

-- The ``limit`` lowest ids among what the users may send, the users met in the order of
-- their lowest ready job (ready-users), at most ``scan_max`` of them: a user's backlog is
-- one of them, however long. A user's jobs that may go are all at or after its score, so
-- once ``limit`` are found, a user whose score is past the highest of them has nothing to
-- add, nor has any after it: the walk stops there, with what a walk of every user finds.
local function pick_ordered()
  local found, seen = {}, {}
  local bound = nil  -- the limit-th lowest found, once that many are
  local looked, lowest, done = 0, '-inf', false
  local function keep_lowest()
    table.sort(found)
    for k = #found, limit + 1, -1 do found[k] = nil end
    bound = found[limit]
  end
  while not done and looked < scan_max do
    local users = redis.call('ZRANGEBYSCORE', ready_users_key(d), lowest, '+inf',
                             'WITHSCORES', 'LIMIT', 0, page)
    if #users == 0 then break end
    for k = 1, #users, 2 do
      local user, score = users[k], users[k + 1]
      if bound and tonumber(score) > bound then
        done = true
        break
      end
      lowest = '(' .. score
      -- an entry dropped by ``takeable`` only raises its user's score: met again, skipped
      if not seen[user] then
        seen[user] = true
        takeable(user, found)
        looked = looked + 1
        if #found >= limit and (not bound or #found >= 2 * limit) then keep_lowest() end
        if looked >= scan_max then break end
      end
    end
  end
  keep_lowest()
  return found
end

take_back_lapsed(d, now, cap)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', waiting_key(d), '-inf', now, 'LIMIT', 0, cap)) do
  redis.call('ZREM', waiting_key(d), id)
  make_ready(d, id)
end
if limit < 1 then return {} end

local chosen
if ordered then
  chosen = pick_ordered()
else
  chosen = redis.call('ZRANGE', ready_key(d), 0, limit - 1)
end

local leased = {}
for _, id in ipairs(chosen) do
  local f = redis.call('HMGET', job_key(id), 'message_id', 'user_key', 'group', 'body',
                       'created_at', 'attempts', 'first_attempt_at')
  unready(d, id, f[2])
  if f[1] then  -- a queue entry without its job cannot happen; if it did, drop the entry
    redis.call('ZADD', leased_key(d), lease_until, id)
    redis.call('HSET', job_key(id), 'owner', token)
    leased[#leased + 1] = {id, f[1], f[2], f[3], f[4], f[5], f[6], f[7]}
  end
end
-- Short of ``limit``: maybe jobs the index lacks (written by a router of an earlier version).
if ordered and #leased < limit then index_pass(d, sweep) end
return leased
"""

INDEX = _HELPERS + """
-- index: one step of building the index of d's users with ready jobs (see index_pass), which
-- an ordered lease needs; from the first step on, every script keeps it for the jobs it moves.
-- ARGV: prefix, destination, count. Returns 0 while there is more to index, 1 once this
-- step has finished it, 2 when it was built already.
local d, count = ARGV[2], tonumber(ARGV[3])
local state = redis.call('HGET', INDEXED, d)
if state == 'built' then return 2 end
if not state then
  redis.call('HDEL', INDEX_CURSOR, d)  -- from the start (and a write Redis never refuses)
  redis.call('HSET', INDEXED, d, 'building')
end
if not index_pass(d, count) then return 0 end
redis.call('HSET', INDEXED, d, 'built')
return 1
"""

RECLAIM = _HELPERS + """
-- open(recover=True): take back lapsed leases of the given destinations (never live ones:
-- their holders may be other routers at work). ARGV: prefix, now, cap, destinations...
-- Returns how many jobs went back to their ready queues.
local moved = 0
for a = 4, #ARGV do moved = moved + take_back_lapsed(ARGV[a], ARGV[2], tonumber(ARGV[3])) end
return moved
"""

COMPLETE = _HELPERS + """
-- complete: the jobs were delivered; forget them in whatever state they are. Deliberately
-- not restricted to the caller's lease: a success is final, so a late completion by a
-- process whose lease lapsed only saves a duplicate. But only a job that still carries the
-- delivered event's messageId: after Redis loses writes, its id counter may hand an id out
-- again, and the new job must not go with the old one.
-- ARGV: prefix, then id and messageId pairs. Returns how many were found.
local done = 0
for a = 2, #ARGV, 2 do
  local f = redis.call('HMGET', job_key(ARGV[a]), 'destination', 'user_key', 'message_id')
  if f[1] and f[3] == ARGV[a + 1] then
    forget(ARGV[a], f[1], f[2])
    done = done + 1
  end
end
return done
"""

# RETRY and DEAD_LETTER begin with a ZREM of the lease: over `maxmemory`, Redis refuses a
# script's first write when it may grow memory (HSET, INCR), and lets the rest of a script
# through once it has written. Begun with ZREM, which frees memory and is never refused,
# delivery records its retries and dead letters on a full Redis, as it records deliveries.
# Refused, every failed job went back to the queue and was sent again at once, without
# backoff or an attempt counted, for as long as Redis stayed full.
RETRY = _HELPERS + """
-- retry: leased jobs wait until their due time, with their new attempt counts; only jobs
-- still leased by ``token``. ARGV: prefix, token, then per job: id, due, attempts,
-- first_attempt_at ('' for none), reason. Returns how many were put back.
local token, done = ARGV[2], 0
for a = 3, #ARGV, 5 do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)  -- first: see the note above RETRY
    redis.call('HSET', job_key(id), 'attempts', ARGV[a + 2], 'last_error', ARGV[a + 4])
    if ARGV[a + 3] == '' then
      redis.call('HDEL', job_key(id), 'first_attempt_at', 'owner')
    else
      redis.call('HSET', job_key(id), 'first_attempt_at', ARGV[a + 3])
      redis.call('HDEL', job_key(id), 'owner')
    end
    redis.call('ZADD', waiting_key(d), ARGV[a + 1], id)
    done = done + 1
  end
end
return done
"""

DEAD_LETTER = _HELPERS + """
-- dead_letter: move jobs still leased by ``token`` to the dead-letter store (a hash per
-- letter, indexed per destination and overall, by letter id, and per destination by place).
-- The letter keeps the id its event was accepted as (``accepted_id``: the job's own, or the
-- one a replayed job carries), its place: the order a replay queues letters in.
-- ARGV: prefix, token, failed_at, n, then n/2 (field, value) pairs of the failure (reason,
-- and status / request / response when known), then per job: id, attempts, first_attempt_at
-- ('' when it was never sent).
-- Returns how many letters were written.
local token, failed_at, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local failure = {}
for a = 5, 4 + n do failure[#failure + 1] = ARGV[a] end
local done = 0
for a = 5 + n, #ARGV, 3 do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)  -- first: see the note above RETRY
    local f = redis.call('HMGET', job_key(id), 'message_id', 'user_key', 'group', 'body',
                         'created_at', 'accepted_id')
    local letter = redis.call('INCR', IDS)
    redis.call('HSET', letter_key(letter), 'destination', d, 'message_id', f[1],
               'user_key', f[2], 'group', f[3], 'body', f[4], 'created_at', f[5],
               'attempts', ARGV[a + 1], 'failed_at', failed_at, 'accepted_id', f[6] or id,
               unpack(failure))
    if ARGV[a + 2] ~= '' then
      redis.call('HSET', letter_key(letter), 'first_attempt_at', ARGV[a + 2])
    end
    redis.call('ZADD', letters_key(d), letter, letter)
    redis.call('ZADD', LETTERS_ALL, letter, letter)
    redis.call('ZADD', placed_key(d), f[6] or id, letter)
    forget(id, d, f[2])
    done = done + 1
  end
end
return done
"""

RELEASE = _HELPERS + """
-- release: jobs still leased by ``token`` go back to the ready queue untouched (shutdown).
-- ARGV: prefix, token, ids... Returns how many went back.
local token, done = ARGV[2], 0
for a = 3, #ARGV do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)
    redis.call('HDEL', job_key(id), 'owner')
    make_ready(d, id)
    done = done + 1
  end
end
return done
"""

REPLAY = _HELPERS + """
-- replay: each dead letter that still exists becomes a new job of its own destination, due
-- at once, attempts reset, and the letter is deleted — atomically, so two concurrent replays
-- queue a letter once. The job keeps the letter's ``accepted_id`` (a letter written before
-- letters kept it: its own id), should it be dead-lettered again; new ids are taken in the
-- order of the letters given, the order of their places.
-- ARGV: prefix, now, then per letter: its id and the destination whose letters-placed listed
-- it ('' for none): an entry whose letter is gone (replayed or purged by a router of an
-- earlier version, which knows no letters-placed) is dropped. Returns how many were queued.
local created, done = ARGV[2], 0
for a = 3, #ARGV, 2 do
  local lid = ARGV[a]
  local f = redis.call('HMGET', letter_key(lid), 'destination', 'message_id', 'user_key',
                       'group', 'body', 'accepted_id')
  if f[1] then
    local id = redis.call('INCR', IDS)
    enqueue(id, f[1], f[2], f[3], f[4], f[5], created)
    redis.call('HSET', job_key(id), 'accepted_id', f[6] or lid)
    forget_letter(lid, f[1])
    done = done + 1
  elseif ARGV[a + 1] ~= '' then
    redis.call('ZREM', placed_key(ARGV[a + 1]), lid)
  end
end
return done
"""

PLACE = _HELPERS + """
-- place: one step of bringing d's letters-placed up to the letter id ``upto`` (see
-- place_pass), which a replay walks: from the start the first time (letters written by a
-- version without it), from its cursor afterwards (letters a router of such a version wrote
-- since). ARGV: prefix, destination, upto, count. Returns 0 while there is more, 1 once this
-- step has built the index, 2 once it has brought a built one up to date.
local d, upto, count = ARGV[2], ARGV[3], tonumber(ARGV[4])
local state = redis.call('HGET', PLACED, d)
if not state then redis.call('HDEL', PLACED_CURSOR, d) end  -- from the start
if not place_pass(d, upto, count) then
  if not state then redis.call('HSET', PLACED, d, 'building') end
  return 0
end
if state == 'built' then return 2 end
redis.call('HSET', PLACED, d, 'built')
return 1
"""

PURGE = _HELPERS + """
-- purge: delete dead letters that still exist. ARGV: prefix, letter ids...
-- Returns how many were deleted.
local done = 0
for a = 2, #ARGV do
  local lid = ARGV[a]
  local d = redis.call('HGET', letter_key(lid), 'destination')
  if d then
    forget_letter(lid, d)
    done = done + 1
  end
end
return done
"""

# RENEW takes each lease out and puts it back, rather than moving its score with ZADD XX:
# a ZREM first is never refused, so a renewal goes through on a full Redis too. A Redis
# filled by a destination that stays down refused every renewal, and the leases of a live
# worker lapsed and were taken over: its jobs were sent twice.
RENEW = _HELPERS + """
-- renew: extend the leases of jobs still leased by ``token`` to ``lease_until`` (a worker
-- kept waiting by its destination). ARGV: prefix, token, lease_until, ids...
-- Returns how many were extended.
local token, lease_until, done = ARGV[2], ARGV[3], 0
for a = 4, #ARGV do
  local id = ARGV[a]
  local d = held_by(id, token)
  if d then
    redis.call('ZREM', leased_key(d), id)
    redis.call('ZADD', leased_key(d), lease_until, id)
    done = done + 1
  end
end
return done
"""


class _Keys:
    """Key names, built exactly as the Lua helpers build them (``_HELPERS``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ids = f"{prefix}:ids"
        self.destinations = f"{prefix}:destinations"
        self.seen_count = f"{prefix}:seen-count"
        self.letters_all = f"{prefix}:letters-all"
        self.health = f"{prefix}:health"
        self.ready_users_built = f"{prefix}:ready-users-built"
        self.ready_users_cursor = f"{prefix}:ready-users-cursor"
        self.letters_placed_built = f"{prefix}:letters-placed-built"
        self.letters_placed_cursor = f"{prefix}:letters-placed-cursor"

    def seen(self, source: str, message_id: str) -> str:
        # length-prefixed source: ("a:b", "c") and ("a", "b:c") are different events
        return f"{self.prefix}:seen:{len(source.encode())}:{source}:{message_id}"

    def job(self, job_id: int | str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def ready(self, destination: str) -> str:
        return f"{self.prefix}:ready:{destination}"

    def waiting(self, destination: str) -> str:
        return f"{self.prefix}:waiting:{destination}"

    def leased(self, destination: str) -> str:
        return f"{self.prefix}:leased:{destination}"

    def jobs(self, destination: str) -> str:
        return f"{self.prefix}:jobs:{destination}"

    def letter(self, letter_id: int | str) -> str:
        return f"{self.prefix}:letter:{letter_id}"

    def letters(self, destination: str) -> str:
        return f"{self.prefix}:letters:{destination}"

    def letters_placed(self, destination: str) -> str:
        return f"{self.prefix}:letters-placed:{destination}"

    def user(self, destination: str, user: str) -> str:
        return f"{self.prefix}:user:{len(destination.encode())}:{destination}:{user}"

    def ready_users(self, destination: str) -> str:
        return f"{self.prefix}:ready-users:{destination}"

    def user_ready(self, destination: str, user: str) -> str:
        return f"{self.prefix}:user-ready:{len(destination.encode())}:{destination}:{user}"
