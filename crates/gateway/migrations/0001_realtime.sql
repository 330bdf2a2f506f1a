-- ws-gateway's capture side: the `realtime` schema, and nothing outside it.
--
-- A tracked table gets a deferred constraint trigger. It fires at COMMIT,
-- takes one transaction-level advisory lock, and only then draws the change's
-- position from a sequence and its `committed_at` from clock_timestamp(). The
-- lock is held until the transaction has committed and become visible, so the
-- next committer draws a larger position strictly after this one is visible:
-- positions are commit order, and every reader sees a prefix of them.

create schema if not exists realtime;

-- The channel the capture trigger notifies. `realtime.set_channel()` changes
-- it (and re-creates every capture trigger, which carries it as an argument).
create table if not exists realtime.settings (
    singleton boolean primary key default true check (singleton),
    channel text not null default 'realtime_changes',
    -- Every change at or below this position may have been pruned: a resume
    -- from before it cannot be served from history.
    pruned_through bigint not null default 0
);
insert into realtime.settings (singleton) values (true) on conflict do nothing;

-- Which tables are tracked, with their room templates; the trigger carries a
-- copy of these as arguments so that capturing a row reads no table.
create table if not exists realtime.tracked (
    tbl regclass primary key,
    rooms text[] not null,
    key_columns text[] not null,
    tracked_at timestamptz not null default now()
);

create sequence if not exists realtime.position_seq as bigint;

-- The outbox: every captured change, kept for the history retention window.
create table if not exists realtime.changes (
    position bigint primary key,
    committed_at timestamptz not null,
    schema_name text not null,
    table_name text not null,
    op text not null,
    key jsonb not null,
    row jsonb not null,
    rooms text[] not null
);
-- Pruning by age walks committed_at, which grows with position.
create index if not exists changes_committed_at on realtime.changes using brin (committed_at);

-- The JSON document a change travels as: in a NOTIFY payload and in catch-up
-- reads alike, so the gateway has a single parser. `t` is committed_at in
-- microseconds since the Unix epoch.
create or replace function realtime.payload(c realtime.changes) returns text
language sql stable parallel safe as $$
    select json_build_object(
        'p', c.position,
        't', (extract(epoch from c.committed_at) * 1000000)::bigint,
        's', c.schema_name,
        'tb', c.table_name,
        'op', c.op,
        'k', c.key,
        'r', c.row,
        'rooms', c.rooms
    )::text
$$;

-- Renders one room template (`project:{project_id}`) over a row. Returns null
-- when a referenced column is null: that row belongs to no such room.
create or replace function realtime.render_room(template text, r jsonb) returns text
language plpgsql immutable parallel safe as $$
declare
    col text;
    val text;
    room text := template;
begin
    for col in select m[1] from regexp_matches(template, '\{([^{}]+)\}', 'g') as m loop
        val := r ->> col;
        if val is null then
            return null;
        end if;
        room := replace(room, '{' || col || '}', val);
    end loop;
    return room;
end
$$;

-- The capture trigger. Arguments: channel, number of key columns, the key
-- columns, then the room templates.
create or replace function realtime.capture() returns trigger
language plpgsql as $$
declare
    nkeys int := TG_ARGV[1]::int;
    new_row jsonb;
    old_row jsonb;
    the_row jsonb;
    the_key jsonb := '{}';
    the_rooms text[] := '{}';
    room text;
    pos bigint;
    at timestamptz;
    payload text;
    i int;
begin
    if TG_OP <> 'INSERT' then
        old_row := to_jsonb(OLD);
    end if;
    if TG_OP <> 'DELETE' then
        new_row := to_jsonb(NEW);
    end if;
    the_row := coalesce(new_row, old_row);
    for i in 2 .. nkeys + 1 loop
        the_key := the_key || jsonb_build_object(TG_ARGV[i], the_row -> TG_ARGV[i]);
    end loop;
    -- An UPDATE belongs to the rooms of the row before and after it.
    for i in nkeys + 2 .. TG_NARGS - 1 loop
        room := realtime.render_room(TG_ARGV[i], new_row);
        if room is not null and not room = any (the_rooms) then
            the_rooms := the_rooms || room;
        end if;
        room := realtime.render_room(TG_ARGV[i], old_row);
        if room is not null and not room = any (the_rooms) then
            the_rooms := the_rooms || room;
        end if;
    end loop;

    -- Commit order: see the top of this file. Held until the end of the
    -- transaction; re-taking it for the transaction's next row is free.
    perform pg_advisory_xact_lock(7310582919341551616);
    pos := nextval('realtime.position_seq');
    at := clock_timestamp();

    insert into realtime.changes (position, committed_at, schema_name, table_name, op, key, row, rooms)
    values (pos, at, TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, the_key, the_row, the_rooms);

    payload := json_build_object(
        'p', pos,
        't', (extract(epoch from at) * 1000000)::bigint,
        's', TG_TABLE_SCHEMA,
        'tb', TG_TABLE_NAME,
        'op', TG_OP,
        'k', the_key,
        'r', the_row,
        'rooms', the_rooms
    )::text;
    -- NOTIFY payloads must stay under 8000 bytes: larger changes travel as a
    -- reference that the gateway reads back from the outbox.
    if octet_length(payload) >= 7900 then
        payload := json_build_object('p', pos, 'ref', true)::text;
    end if;
    perform pg_notify(TG_ARGV[0], payload);
    return null;
end
$$;

-- (Re)creates the capture trigger of one tracked table from realtime.tracked.
create or replace function realtime.install_trigger(t regclass) returns void
language plpgsql as $$
declare
    entry realtime.tracked;
    chan text;
    args text;
begin
    select * into strict entry from realtime.tracked where tbl = t;
    select channel into strict chan from realtime.settings;
    select string_agg(quote_literal(a), ', ')
      into args
      from unnest(array[chan, cardinality(entry.key_columns)::text] || entry.key_columns || entry.rooms) as a;
    execute format('drop trigger if exists realtime_capture on %s', t);
    execute format(
        'create constraint trigger realtime_capture after insert or update or delete on %s '
        'deferrable initially deferred for each row execute function realtime.capture(%s)',
        t, args);
end
$$;

-- Attaches change capture to a table. Idempotent: tracking again replaces the
-- room templates.
create or replace function realtime.track(tbl regclass, rooms text[]) returns void
language plpgsql as $$
declare
    keys text[];
    tpl text;
    col text;
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
        for col in select m[1] from regexp_matches(tpl, '\{([^{}]+)\}', 'g') as m loop
            if not exists (
                select 1 from pg_attribute
                 where attrelid = tbl and attname = col and attnum > 0 and not attisdropped
            ) then
                raise exception 'realtime.track(%): room template "%" names column "%", which the table does not have', tbl, tpl, col;
            end if;
        end loop;
    end loop;
    insert into realtime.tracked (tbl, rooms, key_columns)
    values (tbl, rooms, keys)
    on conflict on constraint tracked_pkey do update set rooms = excluded.rooms, key_columns = excluded.key_columns;
    perform realtime.install_trigger(tbl);
end
$$;

-- Detaches change capture. Idempotent.
create or replace function realtime.untrack(tbl regclass) returns void
language plpgsql as $$
begin
    execute format('drop trigger if exists realtime_capture on %s', tbl);
    delete from realtime.tracked t where t.tbl = untrack.tbl;
end
$$;

-- Changes the notification channel and re-creates every capture trigger.
create or replace function realtime.set_channel(name text) returns void
language plpgsql as $$
declare
    t regclass;
begin
    update realtime.settings set channel = name where channel is distinct from name;
    if found then
        for t in select tbl from realtime.tracked loop
            perform realtime.install_trigger(t);
        end loop;
    end if;
end
$$;
