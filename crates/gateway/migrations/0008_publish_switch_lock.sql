-- realtime.publish waits for a switch (`ws-gateway source`) in a fair queue.
--
-- 0006's publish read the source under a KEY SHARE lock on the settings
-- row, and the switch took that row FOR UPDATE. A row lock request that is
-- compatible with the current holders does not wait behind a conflicting
-- waiter, so publishers whose transactions overlap (a steady rate of
-- realtime.publish or POST /publish) kept a waiting switch out until it
-- gave up. Publishers now first take a shared advisory lock, which the
-- switch takes exclusively before the settings row: advisory locks queue
-- in arrival order, so a waiting switch holds later publishers back and
-- gets its turn once those in flight commit.
--
-- The switch takes every lock it waits for explicitly and never waits long
-- while it holds another (crates/gateway/src/source/wal/switch.rs): a
-- transaction that publishes and writes a tracked table takes this lock
-- and the table's in its own order, so a switch that waited could make a
-- cycle, which PostgreSQL breaks by aborting one side.

create or replace function realtime.publish(room text, event text, payload jsonb default '{}') returns void
language plpgsql as $$
declare
    source text;
begin
    if room is null or room = '' then
        raise exception 'realtime.publish: give a room name, e.g. ''project:42''';
    end if;
    if octet_length(room) > 200 then
        raise exception 'realtime.publish: room name is % bytes; at most 200 allowed', octet_length(room);
    end if;
    if room ~ '[[:space:][:cntrl:]*]' then
        raise exception 'realtime.publish(%): a room name has no spaces, control characters or *', room;
    end if;
    if starts_with(room, '__') then
        raise exception 'realtime.publish(%): rooms starting with __ are the gateway''s own', room;
    end if;
    if event is null or event = '' then
        raise exception 'realtime.publish(%): give an event name, e.g. ''inspection_passed''', room;
    end if;
    if octet_length(event) > 200 then
        raise exception 'realtime.publish(%): event name is % bytes; at most 200 allowed', room, octet_length(event);
    end if;
    -- The switch's lock first, shared: heavyweight locks queue in order, so a
    -- switch waiting for it holds back later publishers instead of waiting
    -- forever for a stream of overlapping ones (row locks let a KEY SHARE
    -- pass a waiting FOR UPDATE). The row lock stays: under REPEATABLE READ
    -- a source switched since the snapshot fails here (could not serialize)
    -- instead of being read stale.
    perform pg_advisory_xact_lock_shared(7310582919341551619);
    select s.source into strict source from realtime.settings s for key share;
    if source = 'wal' then
        -- The leader turns it into the EVENT entry (prefix `realtime`).
        perform pg_logical_emit_message(true, 'realtime',
            json_build_object('room', room, 'event', event, 'payload', payload)::text);
    else
        insert into realtime.pending (op, event, payload, rooms) values ('EVENT', event, payload, array[room]);
    end if;
end
$$;
