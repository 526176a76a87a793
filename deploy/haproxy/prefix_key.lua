-- lua.autoglm_prefix_key: a session key for chat completions whose client sends no X-Session-Id.
--
-- Open-AutoGLM's client sends, at every step of a task, [system prompt, user turn 1, assistant,
-- user turn 2, ...]: it strips the screenshot from each user turn once answered, so the first user
-- message keeps its text (the task and the first screen's app) for the whole task, and only its
-- image part disappears after step 1. This fetch returns the raw JSON text of that message's text
-- parts (or of its string content): hashing it sends every step of one task to one replica.
--
-- It reads the body HAProxy has buffered (`option http-buffer-request`): at most tune.bufsize
-- minus the request head. Anything it cannot see whole there gives no key (nil), and the request
-- goes to least connections: a body that is not a JSON object, no `messages` array, a first user
-- message not complete within the buffer (step 1 of an agent, its screenshot before the text; a
-- system prompt longer than the buffer), or no text in it. The text is taken as it is on the wire
-- (escapes not decoded), which is enough: one client encodes one task the same way every step.
-- It walks the JSON without building it and stops at the first user message.

local find, byte, sub = string.find, string.byte, string.sub

local function ws(s, i)
    return find(s, "[^ \t\r\n]", i)
end

-- s[i] is '"'; returns the index after the closing quote.
local function skip_string(s, i)
    local j = i + 1
    while true do
        local k = find(s, '["\\]', j)
        if not k then return nil end
        if byte(s, k) == 34 then return k + 1 end
        j = k + 2
    end
end

-- s[i] is '{' or '['; returns the index after the matching bracket.
local function skip_container(s, i)
    local depth, j = 0, i
    while true do
        local k = find(s, '[%[%]{}"]', j)
        if not k then return nil end
        local c = byte(s, k)
        if c == 34 then
            j = skip_string(s, k)
            if not j then return nil end
        elseif c == 123 or c == 91 then
            depth, j = depth + 1, k + 1
        else
            depth, j = depth - 1, k + 1
            if depth == 0 then return j end
        end
    end
end

-- Returns the index after the value starting at i (nil when it runs past the end).
local function skip_value(s, i)
    local c = byte(s, i)
    if c == 34 then return skip_string(s, i) end
    if c == 123 or c == 91 then return skip_container(s, i) end
    return find(s, "[,}%]%s]", i)
end

-- Calls f(key, value_start) for each member of the object at i, until f returns true; then
-- returns true. Returns nil on anything malformed or cut off before f was satisfied.
local function members(s, i, f)
    i = ws(s, i)
    if not i or byte(s, i) ~= 123 then return nil end
    i = i + 1
    while true do
        i = ws(s, i)
        if not i then return nil end
        local c = byte(s, i)
        if c == 125 then return false end
        if c == 44 then
            i = ws(s, i + 1)
            if not i then return nil end
        end
        if byte(s, i) ~= 34 then return nil end
        local e = skip_string(s, i)
        if not e then return nil end
        local key = sub(s, i + 1, e - 2)
        i = ws(s, e)
        if not i or byte(s, i) ~= 58 then return nil end
        local v = ws(s, i + 1)
        if not v then return nil end
        if f(key, v) then return true end
        i = skip_value(s, v)
        if not i then return nil end
    end
end

-- The same for the elements of the array at i: f(value_start).
local function elements(s, i, f)
    if byte(s, i) ~= 91 then return nil end
    i = i + 1
    while true do
        i = ws(s, i)
        if not i then return nil end
        local c = byte(s, i)
        if c == 93 then return false end
        if c == 44 then
            i = ws(s, i + 1)
            if not i then return nil end
        end
        if f(i) then return true end
        i = skip_value(s, i)
        if not i then return nil end
    end
end

-- The raw text of a string value at i (without its quotes), or nil.
local function raw_string(s, i)
    if byte(s, i) ~= 34 then return nil end
    local e = skip_string(s, i)
    return e and sub(s, i + 1, e - 2)
end

-- The key of the message object at i if it is the first user message; false if it is another
-- role; nil if it cannot be read whole.
local function user_text(s, i)
    local role, content
    local done = members(s, i, function(key, v)
        if key == "role" then
            role = raw_string(s, v)
            if role ~= "user" then return true end
        elseif key == "content" then
            content = v
        end
        return false
    end)
    if done == nil then return nil end
    if role ~= "user" then return false end
    if not content then return nil end
    if byte(s, content) == 34 then return raw_string(s, content) end
    local parts = {}
    local ok = elements(s, content, function(p)
        local typ, text
        if members(s, p, function(key, v)
            if key == "type" then typ = raw_string(s, v) elseif key == "text" then text = raw_string(s, v) end
            return false
        end) == nil then
            return nil
        end
        if typ == "text" and text then parts[#parts + 1] = text end
        return false
    end)
    if ok == nil or #parts == 0 then return nil end
    return table.concat(parts, "\n")
end

local function prefix_key(body)
    if not body or #body == 0 then return nil end
    local key
    members(body, 1, function(name, v)
        if name ~= "messages" then return false end
        elements(body, v, function(m)
            local t = user_text(body, m)
            if t == false then return false end
            key = t
            return true
        end)
        return true
    end)
    return key
end

if core then
    -- No key is an empty string (a nil would reach HAProxy as the integer 0, one key for all).
    core.register_fetches("autoglm_prefix_key", function(txn)
        return prefix_key(txn.sf:req_body()) or ""
    end)
end

return prefix_key
