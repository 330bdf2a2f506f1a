-- What applications ask of the change feed (SPEC section 10): events
-- published from SQL, column projection, and TRUNCATE.
--
-- All three keep the outbox's one rule: a position is drawn at COMMIT under
-- the position lock (0001), so events and truncations take their place in
-- commit order among the row changes, and are retained and resumable like
-- them. The outbox gains two kinds of entry besides INSERT/UPDATE/DELETE:
--
--   op 'EVENT'     rooms = {the room}, event = its name, row = its payload;
--                  schema_name, table_name and key are null.
--   op 'TRUNCATE'  rooms = the room patterns the table's templates can
--                  produce ('project:*'), schema_name and table_name the
--                  table; key and row are null. The gateway sends `reset`
--                  (reason `truncated`) to every room matching a pattern.
--
-- Both reach the outbox through realtime.pending: a row inserted when
-- realtime.publish() is called or a TRUNCATE runs, whose deferred
-- constraint trigger fires at COMMIT, in the order the transaction queued
-- it among its row changes' capture triggers (PostgreSQL fires deferred
-- triggers in the order their events were queued). So one transaction's
-- INSERT, publish, INSERT arrive in that order, and a rolled-back
-- transaction publishes nothing.

alter table realtime.changes
    alter column schema_name drop not null,
    alter column table_name drop not null,
    alter column key drop not null,
    alter column row drop not null,
    add column if not exists event text;

-- The projection of a tracked table (realtime.track's `columns =>` and
-- `exclude =>`), as given; null: not given. The capture trigger and the
-- WAL source's renderer are both generated from it (realtime.row_sql).
alter table realtime.tracked
    add column if not exists columns text[],
    add column if not exists exclude text[];

-- Events and truncations waiting for their transaction's COMMIT. Unlogged:
-- a row lives only inside its own transaction (the commit trigger deletes
-- it), so it needs no WAL and nothing of it survives a crash.
create unlogged table if not exists realtime.pending (
    id bigint generated always as identity primary key,
    op text not null check (op in ('EVENT', 'TRUNCATE')),
    schema_name text,
    table_name text,
    event text,
    payload jsonb,
    rooms text[] not null
);

-- The document an outbox entry travels as (NOTIFY payloads and catch-up
-- reads alike; see 0001). Row changes keep their shape; events carry `ev`
-- and their payload as `r`; truncations carry the table and the patterns.
create or replace function realtime.payload(c realtime.changes) returns text
language sql stable parallel safe as $$
    select case c.op
        when 'EVENT' then json_build_object(
            'p', c.position,
            't', (extract(epoch from c.committed_at) * 1000000)::bigint,
            'op', c.op,
            'ev', c.event,
            'r', c.row,
            'rooms', c.rooms)
        when 'TRUNCATE' then json_build_object(
            'p', c.position,
            't', (extract(epoch from c.committed_at) * 1000000)::bigint,
            's', c.schema_name,
            'tb', c.table_name,
            'op', c.op,
            'rooms', c.rooms)
        else json_build_object(
            'p', c.position,
            't', (extract(epoch from c.committed_at) * 1000000)::bigint,
            's', c.schema_name,
            'tb', c.table_name,
            'op', c.op,
            'k', c.key,
            'r', c.row,
            'rooms', c.rooms)
    end::text
$$;

-- At COMMIT: one pending event or truncation becomes an outbox entry at the
-- next position, and is notified (over 8000 bytes, as a reference).
create or replace function realtime.commit_pending() returns trigger
language plpgsql as $$
declare
    chan text;
    tail text;
    pos bigint;
    at timestamptz;
    payload text;
begin
    delete from realtime.pending where id = NEW.id;
    select channel into strict chan from realtime.settings;
    -- Built before the lock, which serializes committers.
    if NEW.op = 'EVENT' then
        tail := ',"op":"EVENT","ev":' || to_json(NEW.event)::text
            || ',"r":' || coalesce(NEW.payload::text, 'null')
            || ',"rooms":' || to_json(NEW.rooms)::text || '}';
    else
        tail := ',"s":' || to_json(NEW.schema_name)::text || ',"tb":' || to_json(NEW.table_name)::text
            || ',"op":"TRUNCATE","rooms":' || to_json(NEW.rooms)::text || '}';
    end if;
    -- Commit order: see migrations/0001_realtime.sql.
    perform pg_advisory_xact_lock(7310582919341551616);
    pos := nextval('realtime.position_seq');
    at := clock_timestamp();
    insert into realtime.changes (position, committed_at, schema_name, table_name, op, key, row, rooms, event)
    values (pos, at, NEW.schema_name, NEW.table_name, NEW.op, null, NEW.payload, NEW.rooms, NEW.event);
    payload := '{"p":' || pos || ',"t":' || (extract(epoch from at) * 1000000)::bigint || tail;
    if octet_length(payload) >= 7900 then
        payload := '{"p":' || pos || ',"ref":true}';
    end if;
    perform pg_notify(chan, payload);
    return null;
end
$$;

drop trigger if exists realtime_pending on realtime.pending;
create constraint trigger realtime_pending after insert on realtime.pending
    deferrable initially deferred for each row execute function realtime.commit_pending();

-- Publishes an application event to a room, inside the caller's
-- transaction: delivered if and only if it commits, at its place in commit
-- order among the transaction's changes. Any payload size.
--   select realtime.publish('project:42', 'inspection_passed', '{"inspection_id": 7}');
create or replace function realtime.publish(room text, event text, payload jsonb default '{}') returns void
language plpgsql as $$
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
    insert into realtime.pending (op, event, payload, rooms) values ('EVENT', event, payload, array[room]);
end
$$;

-- The room pattern a template can produce: each {column} becomes *.
-- 'project:{project_id}' -> 'project:*'.
create or replace function realtime.room_pattern(template text) returns text
language sql immutable parallel safe as $$
    select regexp_replace(template, '\{[^{}]+\}', '*', 'g')
$$;

create or replace function realtime.room_patterns(templates text[]) returns text[]
language sql immutable parallel safe as $$
    select array_agg(distinct realtime.room_pattern(t) order by realtime.room_pattern(t)) from unnest(templates) t
$$;

-- Whether `room` is one `pattern` can produce (`*` stands for any text).
create or replace function realtime.room_matches(pattern text, room text) returns boolean
language sql immutable parallel safe as $$
    select room like replace(replace(replace(replace(pattern, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%')
$$;

-- At TRUNCATE of a tracked table: a pending truncation of every room its
-- templates can produce (positioned at COMMIT, like everything else).
create or replace function realtime.capture_truncate() returns trigger
language plpgsql as $$
declare
    patterns text[];
begin
    select realtime.room_patterns(t.rooms) into patterns from realtime.tracked t where t.tbl = TG_RELID::regclass;
    if patterns is not null then
        insert into realtime.pending (op, schema_name, table_name, rooms)
        values ('TRUNCATE', TG_TABLE_SCHEMA, TG_TABLE_NAME, patterns);
    end if;
    return null;
end
$$;

-- The pieces a tracked table's generated code is made of, shared by the
-- capture trigger (below) and the WAL source's renderer (0005), so both
-- store the same row and rooms for the same change. `rec` names a record
-- variable of the table's row type (NEW, OLD, or a decoded row).

-- The stored row, as an SQL expression over `rec`, its projection applied:
-- `columns` lists what is kept (the key columns always are; columns added
-- to the table later are not), `exclude` what is dropped (columns added
-- later are kept).
create or replace function realtime.row_sql(entry realtime.tracked, rec text) returns text
language plpgsql stable as $$
declare
    cols text[];
    parts text[] := '{}';
    pairs text;
    i int;
begin
    if entry.columns is not null then
        select array_agg(c order by ord) into cols
          from (select c, min(o) as ord
                  from unnest(entry.key_columns || entry.columns) with ordinality as u(c, o)
                 group by c) named;
        -- jsonb_build_object takes at most 100 arguments: 50 columns a call.
        for i in 0 .. (cardinality(cols) - 1) / 50 loop
            select string_agg(format('%L, %s.%I', c, rec, c), ', ' order by o) into pairs
              from unnest(cols[i * 50 + 1 : i * 50 + 50]) with ordinality as u(c, o);
            parts := parts || ('jsonb_build_object(' || pairs || ')');
        end loop;
        return '(' || array_to_string(parts, ' || ') || ')';
    elsif entry.exclude is not null and cardinality(entry.exclude) > 0 then
        return format('(to_jsonb(%s) - %L::text[])', rec, entry.exclude);
    end if;
    return format('to_jsonb(%s)', rec);
end
$$;

-- The key, as an SQL expression over the stored row variable `r` (which
-- always holds the key columns).
create or replace function realtime.key_sql(entry realtime.tracked, r text) returns text
language sql stable as $$
    select 'jsonb_build_object(' || string_agg(format('%L, %s -> %L', k, r, k), ', ' order by o) || ')'
      from unnest(entry.key_columns) with ordinality as u(k, o)
$$;

-- PL/pgSQL statements adding the rooms of `rec` to the text[] variable
-- `rooms` (distinct; a template naming a null column renders no room),
-- using the text variable `room`.
create or replace function realtime.rooms_sql(entry realtime.tracked, rec text) returns text
language plpgsql stable as $$
declare
    out text := '';
    tpl text;
begin
    foreach tpl in array entry.rooms loop
        out := out || format(
            E'\n        room := %s;\n        if room is not null and not room = any (rooms) then rooms := rooms || room; end if;',
            realtime.template_sql(tpl, rec));
    end loop;
    return out;
end
$$;

create or replace function realtime.install_trigger(t regclass) returns void
language plpgsql as $$
declare
    entry realtime.tracked;
    chan text;
    schema_name text;
    table_name text;
    fn text := realtime.capture_function(t);
begin
    select * into strict entry from realtime.tracked where tbl = t;
    select channel into strict chan from realtime.settings;
    select n.nspname, c.relname into strict schema_name, table_name
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = t;

    execute format($f$
create or replace function %1$s() returns trigger language plpgsql as $body$
declare
    r jsonb;
    k jsonb;
    rooms text[] := '{}';
    room text;
    pos bigint;
    at timestamptz;
    row_text text;
    payload text;
begin
    if TG_OP = 'DELETE' then
        r := %11$s;%3$s
    else
        r := %10$s;%2$s
        if TG_OP = 'UPDATE' then%3$s
        end if;
    end if;
    k := %4$s;
    -- Everything that does not need the position is done before the lock:
    -- the lock serializes committers, so its section is kept short.
    row_text := r::text;
    if octet_length(row_text) < 7000 then
        payload := ',"s":' || %7$L || ',"tb":' || %8$L
            || ',"op":"' || TG_OP || '","k":' || k::text
            || ',"r":' || row_text
            || ',"rooms":' || to_json(rooms)::text || '}';
    end if;
    -- Commit order: see migrations/0001_realtime.sql.
    perform pg_advisory_xact_lock(7310582919341551616);
    pos := nextval('realtime.position_seq');
    at := clock_timestamp();
    insert into realtime.changes (position, committed_at, schema_name, table_name, op, key, row, rooms)
    values (pos, at, %5$L, %6$L, TG_OP, k, r, rooms);
    payload := '{"p":' || pos || ',"t":' || (extract(epoch from at) * 1000000)::bigint || payload;
    -- NOTIFY payloads must stay under 8000 bytes: larger changes travel as a
    -- reference that the gateway reads back from the outbox.
    if payload is null or octet_length(payload) >= 7900 then
        payload := '{"p":' || pos || ',"ref":true}';
    end if;
    perform pg_notify(%9$L, payload);
    return null;
end
$body$
$f$,
        fn, realtime.rooms_sql(entry, 'NEW'), realtime.rooms_sql(entry, 'OLD'), realtime.key_sql(entry, 'r'),
        schema_name, table_name,
        to_json(schema_name)::text, to_json(table_name)::text,
        chan,
        realtime.row_sql(entry, 'NEW'), realtime.row_sql(entry, 'OLD'));

    execute format('drop trigger if exists realtime_capture on %s', t);
    execute format(
        'create constraint trigger realtime_capture after insert or update or delete on %s '
        'deferrable initially deferred for each row execute function %s()',
        t, fn);
    execute format('drop trigger if exists realtime_truncate on %s', t);
    execute format(
        'create trigger realtime_truncate after truncate on %s '
        'for each statement execute function realtime.capture_truncate()',
        t);
end
$$;

-- realtime.track gains the projection: a new signature (with defaults, the
-- old two-argument one would be ambiguous).
drop function if exists realtime.track(regclass, text[]);

-- Attaches change capture to a table. Idempotent: tracking again replaces
-- the room templates and the projection (for changes committed from then
-- on).
--   select realtime.track('public.users', array['org:{org_id}'], exclude => array['password_hash']);
--   select realtime.track('public.drawings', array['project:{project_id}'], columns => array['title', 'revision']);
create or replace function realtime.track(
    tbl regclass,
    rooms text[],
    columns text[] default null,
    exclude text[] default null
) returns void
language plpgsql as $$
declare
    keys text[];
    tpl text;
    col text;
    previous realtime.tracked;
begin
    if rooms is null or cardinality(rooms) = 0 then
        raise exception 'realtime.track(%): give at least one room template, e.g. array[''project:{project_id}'']', tbl;
    end if;
    select array_agg(a.attname::text order by k.ord)
      into keys
      from pg_index i
      cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
      join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
     where i.indrelid = tbl and i.indisprimary;
    if keys is null then
        raise exception 'realtime.track(%): the table has no primary key; changes need one to be identified', tbl;
    end if;
    foreach tpl in array rooms loop
        if tpl is null or tpl = '' then
            raise exception 'realtime.track(%): empty room template', tbl;
        end if;
        if strpos(tpl, '*') > 0 then
            raise exception 'realtime.track(%): room template "%" contains *, which room names may not', tbl, tpl;
        end if;
        for col in select m[1] from regexp_matches(tpl, '\{([^{}]+)\}', 'g') as m loop
            if not exists (
                select 1 from pg_attribute
                 where attrelid = tbl and attname = col and attnum > 0 and not attisdropped
            ) then
                raise exception 'realtime.track(%): room template "%" names column "%", which the table does not have', tbl, tpl, col;
            end if;
        end loop;
    end loop;
    if track.columns is not null and track.exclude is not null then
        raise exception 'realtime.track(%): give columns => or exclude =>, not both', tbl;
    end if;
    foreach col in array coalesce(track.columns, track.exclude, '{}') loop
        if col is null or not exists (
            select 1 from pg_attribute
             where attrelid = tbl and attname = col and attnum > 0 and not attisdropped
        ) then
            raise exception 'realtime.track(%): projection names column "%", which the table does not have', tbl, col;
        end if;
    end loop;
    foreach col in array coalesce(track.exclude, '{}') loop
        if col = any (keys) then
            raise exception 'realtime.track(%): cannot exclude key column "%": every change carries its key', tbl, col;
        end if;
    end loop;
    select * into previous from realtime.tracked t where t.tbl = track.tbl;
    if (previous.columns is not null or previous.exclude is not null)
       and track.columns is null and track.exclude is null then
        raise notice 'realtime.track(%): the projection was removed; changes carry every column again', tbl;
    end if;
    insert into realtime.tracked (tbl, rooms, key_columns, columns, exclude)
    values (tbl, rooms, keys, track.columns, track.exclude)
    on conflict on constraint tracked_pkey do update
        set rooms = excluded.rooms, key_columns = excluded.key_columns,
            columns = excluded.columns, exclude = excluded.exclude;
    perform realtime.install_trigger(tbl);
end
$$;

create or replace function realtime.untrack(tbl regclass) returns void
language plpgsql as $$
begin
    execute format('drop trigger if exists realtime_capture on %s', tbl);
    execute format('drop trigger if exists realtime_truncate on %s', tbl);
    execute format('drop function if exists %s()', realtime.capture_function(tbl));
    delete from realtime.tracked t where t.tbl = untrack.tbl;
end
$$;

-- Recompile what is tracked already (and give it its TRUNCATE trigger).
do $$
declare
    t regclass;
begin
    for t in select tbl from realtime.tracked where to_regclass(tbl::text) is not null loop
        perform realtime.install_trigger(t);
    end loop;
end
$$;
