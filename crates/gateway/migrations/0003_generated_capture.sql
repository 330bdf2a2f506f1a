-- A capture function generated per tracked table.
--
-- The generic realtime.capture() rendered room templates with regular
-- expressions over the row's JSON, four times per row, and built the NOTIFY
-- payload with json_build_object: writers paid about half their throughput
-- for it. Tracking a table now compiles its templates into a function of its
-- own that reads the columns directly and concatenates the payload. Same
-- semantics: positions and committed_at are still taken at COMMIT under the
-- one advisory lock, an UPDATE still belongs to the rooms of the row before
-- and after it, and a template naming a null column renders no room.

-- The SQL expression of one template over the row variable `rec` (NEW or
-- OLD): 'project:{project_id}' becomes 'project:' || rec."project_id".
create or replace function realtime.template_sql(template text, rec text) returns text
language plpgsql immutable as $$
declare
    parts text[] := '{}';
    rest text := template;
    open_at int;
    close_at int;
begin
    loop
        open_at := strpos(rest, '{');
        close_at := strpos(rest, '}');
        exit when open_at = 0 or close_at < open_at;
        if open_at > 1 then
            parts := parts || quote_literal(substr(rest, 1, open_at - 1));
        end if;
        parts := parts || format('%s.%I::text', rec, substr(rest, open_at + 1, close_at - open_at - 1));
        rest := substr(rest, close_at + 1);
    end loop;
    if rest <> '' or cardinality(parts) = 0 then
        parts := parts || quote_literal(rest);
    end if;
    return '(' || array_to_string(parts, ' || ') || ')';
end
$$;

-- The name of a table's generated capture function.
create or replace function realtime.capture_function(t regclass) returns text
language sql stable as $$
    select format('realtime.%I', 'capture_' || t::oid)
$$;

create or replace function realtime.install_trigger(t regclass) returns void
language plpgsql as $$
declare
    entry realtime.tracked;
    chan text;
    schema_name text;
    table_name text;
    fn text := realtime.capture_function(t);
    key_sql text;
    new_rooms text := '';
    old_rooms text := '';
    tpl text;
begin
    select * into strict entry from realtime.tracked where tbl = t;
    select channel into strict chan from realtime.settings;
    select n.nspname, c.relname into strict schema_name, table_name
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = t;
    select string_agg(format('%L, r -> %L', k, k), ', ') into key_sql from unnest(entry.key_columns) as k;
    foreach tpl in array entry.rooms loop
        new_rooms := new_rooms || format(
            E'\n        room := %s;\n        if room is not null and not room = any (rooms) then rooms := rooms || room; end if;',
            realtime.template_sql(tpl, 'NEW'));
        old_rooms := old_rooms || format(
            E'\n        room := %s;\n        if room is not null and not room = any (rooms) then rooms := rooms || room; end if;',
            realtime.template_sql(tpl, 'OLD'));
    end loop;

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
        r := to_jsonb(OLD);%3$s
    else
        r := to_jsonb(NEW);%2$s
        if TG_OP = 'UPDATE' then%3$s
        end if;
    end if;
    k := jsonb_build_object(%4$s);
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
        fn, new_rooms, old_rooms, key_sql,
        schema_name, table_name,
        to_json(schema_name)::text, to_json(table_name)::text,
        chan);

    execute format('drop trigger if exists realtime_capture on %s', t);
    execute format(
        'create constraint trigger realtime_capture after insert or update or delete on %s '
        'deferrable initially deferred for each row execute function %s()',
        t, fn);
end
$$;

create or replace function realtime.untrack(tbl regclass) returns void
language plpgsql as $$
begin
    execute format('drop trigger if exists realtime_capture on %s', tbl);
    execute format('drop function if exists %s()', realtime.capture_function(tbl));
    delete from realtime.tracked t where t.tbl = untrack.tbl;
end
$$;

-- Recompile what is tracked already.
do $$
declare
    t regclass;
begin
    for t in select tbl from realtime.tracked where to_regclass(tbl::text) is not null loop
        perform realtime.install_trigger(t);
    end loop;
end
$$;
