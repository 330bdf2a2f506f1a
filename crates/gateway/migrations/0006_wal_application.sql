-- The wal source (0005) carries what 0004 gives notify mode, and a lost
-- slot is told to every client (SPEC sections 8 and 10).
--
-- 1. A reset of every room: outbox op 'RESET', rooms {'*'} (a pattern every
--    room matches, as a truncation's patterns do), the reason in `event`.
--    The wal leader writes one (`history_lost`) when its slot was lost,
--    after recreating it: every subscriber, live or resuming across it, is
--    told that what the lost slot held is gone, and nothing committed after
--    the new slot's start is lost.
-- 2. realtime.publish in wal mode emits a transactional logical message
--    (prefix `realtime`) instead of queueing an outbox entry for COMMIT: it
--    reaches the leader only if its transaction commits, in WAL order among
--    the transaction's rows, and costs the writer one WAL record.
-- 3. TRUNCATE in wal mode: pgoutput sends it; the leader writes the same
--    TRUNCATE entry as 0004's trigger (the patterns of the table's
--    templates).
-- 4. Projection (0004's `columns =>`/`exclude =>`) in the wal renderer.
-- 5. install_notify_trigger, install_trigger and untrack are defined here
--    once, for both sources: 0004 and 0005 each replaced some of them, and
--    on a database that applied 0005 before 0004 the later one overwrote
--    the other's.
-- 6. realtime.wal_write writes a batch with one set-based INSERT and one
--    statement of NOTIFYs, several changes to a NOTIFY payload.

-- The document an outbox entry travels as (NOTIFY payloads and catch-up
-- reads alike; see 0001 and 0004). A reset carries its reason.
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
        when 'RESET' then json_build_object(
            'p', c.position,
            't', (extract(epoch from c.committed_at) * 1000000)::bigint,
            'op', c.op,
            'reason', c.event,
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

-- Publishes an application event to a room, inside the caller's
-- transaction: delivered if and only if it commits, at its place in commit
-- order among the transaction's changes. Any payload size.
--   select realtime.publish('project:42', 'inspection_passed', '{"inspection_id": 7}');
-- The source is read under a key-share lock: a switch (`ws-gateway source`)
-- waits for publishing transactions, and they for it, so every event is
-- captured by exactly one source.
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

-- A stored row cut down to a table's projection, for a row rendered from
-- its text values (the wal renderer's fallback).
create or replace function realtime.project_row(entry realtime.tracked, r jsonb) returns jsonb
language sql stable as $$
    select case
        when entry.columns is not null then
            (select coalesce(jsonb_object_agg(e.key, e.value), '{}')
               from jsonb_each(r) e
              where e.key = any (entry.key_columns || entry.columns))
        when entry.exclude is not null then r - entry.exclude
        else r
    end
$$;

-- notify mode: the generated capture trigger and the TRUNCATE trigger of
-- one tracked table (0004's install_trigger, under the name 0005 gave it).
create or replace function realtime.install_notify_trigger(t regclass) returns void
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

-- wal mode: the render function of one tracked table, which computes from
-- the decoded rows what the capture trigger computes from NEW and OLD (row
-- with its projection, key, rooms), from the same generated pieces
-- (realtime.row_sql, key_sql, rooms_sql). Each decoded row arrives as a
-- JSON object of its values' text, which json_populate_record turns back
-- into the table's row type, so the row is rendered by the same SQL as in
-- notify mode. Arguments are a whole batch; the function renders the row
-- changes from `start` on that are its table's. With `safe`, a row that
-- cannot be read as the row type (its table changed since) is rendered from
-- its text values instead, with a warning, rather than stopping the slot.
create or replace function realtime.install_wal_render(t regclass) returns void
language plpgsql as $$
declare
    entry realtime.tracked;
    text_rooms text := '';
    render text;
    tpl text;
    qualified text;
begin
    select * into strict entry from realtime.tracked where tbl = t;
    -- Qualified, so that the function does not depend on a search_path.
    select format('%I.%I', n.nspname, c.relname) into strict qualified
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = t;
    foreach tpl in array entry.rooms loop
        text_rooms := text_rooms || format(
            E'\n                    foreach room in array array[realtime.render_room(%1$L, news[j]::jsonb), realtime.render_room(%1$L, olds[j]::jsonb)] loop'
            || E'\n                        if room is not null and not room = any (rooms) then rooms := rooms || room; end if;'
            || E'\n                    end loop;',
            tpl);
    end loop;

    -- The same rendering twice: plain, and inside an exception block (a
    -- subtransaction per row, so only when asked for).
    render := format($r$
            new_row := null;
            old_row := null;
            if news[j] is not null then
                new_row := json_populate_record(null::%1$s, news[j]);
            end if;
            if olds[j] is not null then
                old_row := json_populate_record(null::%1$s, olds[j]);
            end if;
            if ops[j] = 'DELETE' then
                r := %5$s;%3$s
            else
                r := %4$s;%2$s
                if ops[j] = 'UPDATE' and olds[j] is not null then%3$s
                end if;
            end if;$r$,
        qualified, realtime.rooms_sql(entry, 'new_row'), realtime.rooms_sql(entry, 'old_row'),
        realtime.row_sql(entry, 'new_row'), realtime.row_sql(entry, 'old_row'));

    execute format($f$
create or replace function %1$s(tables bigint[], ops text[], news json[], olds json[], start int, safe boolean)
returns table (idx int, k jsonb, r jsonb, rooms text[])
language plpgsql as $body$
declare
    new_row %2$s;
    old_row %2$s;
    room text;
    entry realtime.tracked;
begin
    for j in start .. coalesce(cardinality(tables), 0) loop
        continue when tables[j] <> %3$s or ops[j] not in ('INSERT', 'UPDATE', 'DELETE');
        idx := j;
        rooms := '{}';
        if not safe then%4$s
        else
            begin%4$s
            exception when others then
                raise warning 'ws-gateway: a %% of %% could not be read as the table''s row (%%); delivered with its values as text',
                    ops[j], %2$L, sqlerrm;
                select * into entry from realtime.tracked where tbl = %3$s::oid::regclass;
                r := realtime.project_row(entry, coalesce(news[j], olds[j])::jsonb);
                rooms := '{}';%5$s
            end;
        end if;
        k := %6$s;
        return next;
    end loop;
end
$body$
$f$,
        realtime.wal_render_function(t), qualified, t::oid,
        render, text_rooms, realtime.key_sql(entry, 'r'));
end
$$;

-- Installs capture for one tracked table, for the database's source: the
-- triggers in notify mode; in wal mode no trigger but publication
-- membership, REPLICA IDENTITY FULL (so an UPDATE carries its old row, for
-- the old row's rooms and for TOASTed columns it left unchanged, and a
-- DELETE carries the row as it was), and the render function.
create or replace function realtime.install_trigger(t regclass) returns void
language plpgsql as $$
declare
    cfg realtime.settings;
    ident "char";
begin
    select * into strict cfg from realtime.settings;
    if cfg.source = 'notify' then
        execute format('drop function if exists %s(bigint[], text[], json[], json[], int, boolean)',
                       realtime.wal_render_function(t));
        perform realtime.install_notify_trigger(t);
        return;
    end if;
    if not exists (select 1 from pg_publication where pubname = cfg.wal_publication) then
        raise exception 'realtime.track(%): the publication % of GATEWAY_SOURCE=wal is missing; run `ws-gateway source wal` again',
            t, cfg.wal_publication;
    end if;
    execute format('drop trigger if exists realtime_capture on %s', t);
    execute format('drop trigger if exists realtime_truncate on %s', t);
    execute format('drop function if exists %s()', realtime.capture_function(t));
    select relreplident into strict ident from pg_class where oid = t;
    if ident <> 'f' then
        update realtime.tracked set prior_identity = coalesce(prior_identity, ident) where tbl = t;
        execute format('alter table %s replica identity full', t);
        raise notice 'realtime.track(%): set REPLICA IDENTITY FULL: with GATEWAY_SOURCE=wal an UPDATE must carry its old row (for the old row''s rooms and for large columns it left unchanged), and a DELETE the row as it was', t;
    end if;
    if not exists (
        select 1 from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
         where p.pubname = cfg.wal_publication and pr.prrelid = t
    ) then
        execute format('alter publication %I add table %s', cfg.wal_publication, t);
    end if;
    perform realtime.install_wal_render(t);
end
$$;

-- Detaches change capture. Idempotent. In wal mode the table leaves the
-- publication and gets its REPLICA IDENTITY back; its render function
-- stays, for changes committed before that the leader has not written yet.
create or replace function realtime.untrack(tbl regclass) returns void
language plpgsql as $$
declare
    cfg realtime.settings;
    prior "char";
begin
    select * into strict cfg from realtime.settings;
    select t.prior_identity into prior from realtime.tracked t where t.tbl = untrack.tbl;
    if cfg.source = 'wal' then
        if exists (
            select 1 from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
             where p.pubname = cfg.wal_publication and pr.prrelid = untrack.tbl
        ) then
            execute format('alter publication %I drop table %s', cfg.wal_publication, untrack.tbl);
        end if;
        if prior is not null then
            perform realtime.restore_identity(untrack.tbl, prior);
        end if;
    end if;
    execute format('drop trigger if exists realtime_capture on %s', tbl);
    execute format('drop trigger if exists realtime_truncate on %s', tbl);
    execute format('drop function if exists %s()', realtime.capture_function(tbl));
    delete from realtime.tracked t where t.tbl = untrack.tbl;
end
$$;

-- One batch of decoded transactions into the outbox, in one call: what the
-- leader does instead of the writers' triggers. Every array has one element
-- per entry, in commit order: a row change (op INSERT/UPDATE/DELETE, its
-- table's oid, the rows as JSON objects of text), an event (op EVENT,
-- table 0, `p_news` its `{"room","event","payload"}`) or a truncation (op
-- TRUNCATE, the table's oid). `(p_upto_lsn, p_upto_seq)` is the progress
-- once written (the last entry or marker covered) and `p_end_lsn` how far
-- the slot may then be confirmed (null while a transaction is still being
-- written in chunks).
--
-- 1. The progress row is locked and the epoch checked: a leader that lost
--    its lock (another one bumped the epoch) fails here (SQLSTATE RT001).
-- 2. Entries at or before the recorded progress are skipped: a transaction
--    the slot replays after a crash is written once.
-- 3. Positions: a contiguous block drawn under the position lock, as the
--    trigger does, so the feed's catch-up barrier (take and release the
--    lock) stays valid, and positions stay in commit order.
-- 4. One INSERT of every entry: row changes rendered by their tables'
--    render functions, events and truncations here.
-- 5. One statement of NOTIFYs in position order, the trigger's documents
--    joined several to a payload (`{"docs":[...]}`) up to about 7000 bytes;
--    a document too large for a NOTIFY travels as a reference.
create or replace function realtime.wal_write(
    p_epoch bigint,
    p_lsns pg_lsn[],
    p_seqs int[],
    p_ats timestamptz[],
    p_tables bigint[],
    p_schemas text[],
    p_names text[],
    p_ops text[],
    p_news json[],
    p_olds json[],
    p_safe boolean,
    p_upto_lsn pg_lsn,
    p_upto_seq int,
    p_end_lsn pg_lsn,
    p_state text
) returns table (written int, skipped int, first_position bigint)
language plpgsql as $$
declare
    prog realtime.wal_progress;
    total int := coalesce(cardinality(p_lsns), 0);
    start int;
    n int;
    first bigint;
    parts text;
    chan text;
begin
    written := 0;
    skipped := 0;
    select * into strict prog from realtime.wal_progress for update;
    if prog.epoch <> p_epoch then
        raise exception 'ws-gateway: this wal leader (epoch %) was replaced (epoch %): another instance leads',
            p_epoch, prog.epoch using errcode = 'RT001';
    end if;
    start := total + 1;
    for j in 1 .. total loop
        if (p_lsns[j], p_seqs[j]) > (prog.commit_lsn, prog.seq) then
            start := j;
            exit;
        end if;
    end loop;
    skipped := start - 1;
    n := total - start + 1;
    if n > 0 then
        -- Commit order: see migrations/0001_realtime.sql.
        perform pg_advisory_xact_lock(7310582919341551616);
        first := nextval('realtime.position_seq');
        if n > 1 then
            perform setval('realtime.position_seq', first + n - 1);
        end if;
        first_position := first;
        select string_agg(format('select idx, k, r, rooms, null::text as ev from %s($1, $2, $3, $4, $5, $6)',
                                 realtime.wal_render_function(d.t::oid::regclass)),
                          ' union all ')
          into parts
          from (select distinct t from unnest(p_tables[start:total], p_ops[start:total]) u(t, op)
                 where op in ('INSERT', 'UPDATE', 'DELETE')) d
         where exists (select 1 from pg_proc
                        where proname = 'wal_render_' || d.t and pronamespace = 'realtime'::regnamespace);
        parts := concat_ws(' union all ', parts,
            $e$select j as idx, null::jsonb as k, (($3)[j])::jsonb -> 'payload' as r,
                      array[(($3)[j])::jsonb ->> 'room'] as rooms, (($3)[j])::jsonb ->> 'event' as ev
                 from generate_series($5, cardinality($2)) j where ($2)[j] = 'EVENT'$e$,
            $t$select j as idx, null::jsonb as k, null::jsonb as r, realtime.room_patterns(tr.rooms) as rooms, null::text as ev
                 from generate_series($5, cardinality($2)) j
                 join realtime.tracked tr on tr.tbl::oid = ($1)[j]
                where ($2)[j] = 'TRUNCATE'$t$);
        execute format($q$
            insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms, event)
            select $7 + x.idx - $5, ($8)[x.idx], ($9)[x.idx],
                   nullif(($10)[x.idx], ''), nullif(($11)[x.idx], ''), ($2)[x.idx], x.k, x.r, x.rooms, x.ev
              from (%s) x
        $q$, parts)
        using p_tables, p_ops, p_news, p_olds, start, p_safe, first, p_ats, p_lsns, p_schemas, p_names;
        get diagnostics written = row_count;
        skipped := skipped + (n - written);
        if written < n then
            raise warning 'ws-gateway: % decoded entries of tables without a wal render function were not written (tables published by hand, or untracked?)',
                n - written;
        end if;
        select channel into strict chan from realtime.settings;
        perform realtime.notify_range(chan, first, first + n - 1);
    end if;
    if (p_upto_lsn, p_upto_seq) > (prog.commit_lsn, prog.seq) then
        update realtime.wal_progress set commit_lsn = p_upto_lsn, seq = p_upto_seq;
    end if;
    update realtime.wal_progress
       set end_lsn = greatest(end_lsn, coalesce(p_end_lsn, end_lsn)),
           state = coalesce(p_state, state);
    return next;
end
$$;

-- NOTIFYs the outbox entries at positions `first` to `last`, in position
-- order: their documents joined into payloads of about 7000 bytes at most
-- (`{"docs":[doc,...]}`; one NOTIFY costs the sender and every listener far
-- more than its bytes), an entry whose document would not fit as a
-- reference (`{"p":..,"ref":true}`), which the gateway reads back.
create or replace function realtime.notify_range(chan text, first bigint, last bigint) returns void
language plpgsql as $$
declare
    doc text;
    payload text := '';
    pos bigint;
begin
    for pos, doc in
        -- A row stored larger than a NOTIFY can carry is not rendered.
        select c.position, case when coalesce(pg_column_size(c.row), 0) < 7000 then realtime.payload(c) end
          from realtime.changes c
         where c.position between first and last order by c.position
    loop
        if doc is null or octet_length(doc) >= 7000 then
            doc := '{"p":' || pos || ',"ref":true}';
        end if;
        if octet_length(payload) + octet_length(doc) > 7000 then
            perform pg_notify(chan, '{"docs":[' || payload || ']}');
            payload := '';
        end if;
        payload := case when payload = '' then doc else payload || ',' || doc end;
    end loop;
    if payload <> '' then
        perform pg_notify(chan, '{"docs":[' || payload || ']}');
    end if;
end
$$;

-- After a lost slot was recreated (its consistent point `p_start`): a reset
-- of every room (`p_reason`, `history_lost`) at the next position, and the
-- progress starting over at the new slot, in one transaction. Returns the
-- reset's position. Fails with RT001 for a replaced leader.
create or replace function realtime.wal_reset(p_epoch bigint, p_start pg_lsn, p_reason text) returns bigint
language plpgsql as $$
declare
    prog realtime.wal_progress;
    pos bigint;
begin
    select * into strict prog from realtime.wal_progress for update;
    if prog.epoch <> p_epoch then
        raise exception 'ws-gateway: this wal leader (epoch %) was replaced (epoch %): another instance leads',
            p_epoch, prog.epoch using errcode = 'RT001';
    end if;
    -- Commit order: see migrations/0001_realtime.sql.
    perform pg_advisory_xact_lock(7310582919341551616);
    pos := nextval('realtime.position_seq');
    insert into realtime.changes (position, committed_at, op, rooms, event)
    values (pos, clock_timestamp(), 'RESET', '{*}', p_reason);
    perform realtime.notify_range((select channel from realtime.settings), pos, pos);
    update realtime.wal_progress set commit_lsn = p_start, seq = 0, end_lsn = p_start, state = 'ok';
    return pos;
end
$$;

-- Recompile what is tracked, for the database's source.
do $$
declare
    t regclass;
begin
    for t in select tbl from realtime.tracked where to_regclass(tbl::text) is not null loop
        perform realtime.install_trigger(t);
    end loop;
end
$$;
