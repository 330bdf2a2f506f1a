-- GATEWAY_SOURCE=wal (SPEC section 8): capture from logical replication.
--
-- The source is a property of the database, `realtime.settings.source`,
-- switched by `ws-gateway source notify|wal`. In `wal` mode a tracked table
-- has no trigger of ours: it is a member of one publication, and the leading
-- gateway instance streams that publication from a logical replication slot
-- and writes each decoded transaction, in commit-LSN order, into the same
-- outbox with the same positions, documents and NOTIFYs as the trigger does
-- (`realtime.wal_write`, one call per batch of transactions).
--
-- How this builds on 0003/0004 without copying them: `realtime.track` and
-- `realtime.set_channel` install capture through `realtime.install_trigger`,
-- which is renamed here (`install_notify_trigger`) and replaced by one that
-- calls it in notify mode and does the publication's part in wal mode.
-- Whatever `track` does before that (templates, keys, projection) stays its
-- own. `realtime.untrack` is replaced, with the wal part added.

alter table realtime.settings
    add column if not exists source text not null default 'notify',
    -- The logical replication slot (cluster-wide, so named per database by
    -- `ws-gateway source wal`) and the publication of the tracked tables.
    add column if not exists wal_slot text,
    add column if not exists wal_publication text not null default 'ws_gateway';
alter table realtime.settings drop constraint if exists settings_source_known;
alter table realtime.settings
    add constraint settings_source_known check (source in ('notify', 'wal'));

-- The commit LSN of the transaction a change came from (wal mode; null for
-- changes the trigger captured).
alter table realtime.changes add column if not exists commit_lsn pg_lsn;

-- The table's REPLICA IDENTITY before wal mode set it to FULL, restored by
-- untrack and by `ws-gateway source notify`.
alter table realtime.tracked add column if not exists prior_identity "char";

-- The leader's durable progress: one row. `(commit_lsn, seq)` names the last
-- change written to the outbox (its transaction's commit LSN and its index
-- in it), so a transaction the slot replays after a crash is recognized and
-- skipped; `end_lsn` is how far the slot may be confirmed. `epoch` is bumped
-- by each new leader, and every write checks it: a leader that lost its
-- lock cannot write.
create table if not exists realtime.wal_progress (
    singleton boolean primary key default true check (singleton),
    epoch bigint not null default 0,
    commit_lsn pg_lsn not null default '0/0',
    seq int not null default 0,
    end_lsn pg_lsn not null default '0/0',
    -- idle: notify mode. switching: a fresh slot, whose transactions up to
    -- the `realtime.switch` marker the triggers captured already. ok:
    -- streaming. resetting: the slot was lost and is being recreated.
    state text not null default 'idle'
        check (state in ('idle', 'switching', 'ok', 'resetting'))
);
insert into realtime.wal_progress (singleton) values (true) on conflict do nothing;

-- The name of a table's generated wal render function.
create or replace function realtime.wal_render_function(t regclass) returns text
language sql stable as $$
    select format('realtime.%I', 'wal_render_' || t::oid)
$$;

-- Generates the wal render function of one tracked table: what the capture
-- trigger computes from NEW and OLD (row, key, rooms), computed from the
-- decoded rows instead. Each decoded row arrives as a JSON object of its
-- values' text, which json_populate_record turns back into the table's row
-- type, so the row is rendered by the same to_jsonb as in notify mode and
-- the rooms by the same template SQL (realtime.template_sql). Arguments are
-- a whole batch; the function renders the elements from `start` on that are
-- its table's. With `safe`, a row that cannot be turned into the row type
-- (its table changed since) is rendered from its text values instead, with
-- a warning, rather than stopping the slot.
create or replace function realtime.install_wal_render(t regclass) returns void
language plpgsql as $$
declare
    entry realtime.tracked;
    key_sql text;
    new_rooms text := '';
    old_rooms text := '';
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
    select string_agg(format('%L, r -> %L', k, k), ', ') into key_sql from unnest(entry.key_columns) as k;
    foreach tpl in array entry.rooms loop
        new_rooms := new_rooms || format(
            E'\n            room := %s;\n            if room is not null and not room = any (rooms) then rooms := rooms || room; end if;',
            realtime.template_sql(tpl, 'new_row'));
        old_rooms := old_rooms || format(
            E'\n                room := %s;\n                if room is not null and not room = any (rooms) then rooms := rooms || room; end if;',
            realtime.template_sql(tpl, 'old_row'));
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
                r := to_jsonb(old_row);%3$s
            else
                r := to_jsonb(new_row);%2$s
                if ops[j] = 'UPDATE' and olds[j] is not null then%3$s
                end if;
            end if;$r$, qualified, new_rooms, old_rooms);

    execute format($f$
create or replace function %1$s(tables bigint[], ops text[], news json[], olds json[], start int, safe boolean)
returns table (idx int, k jsonb, r jsonb, rooms text[])
language plpgsql as $body$
declare
    new_row %2$s;
    old_row %2$s;
    room text;
begin
    for j in start .. coalesce(cardinality(tables), 0) loop
        continue when tables[j] <> %3$s;
        idx := j;
        rooms := '{}';
        if not safe then%4$s
        else
            begin%4$s
            exception when others then
                raise warning 'ws-gateway: a %% of %% could not be read as the table''s row (%%); delivered with its values as text',
                    ops[j], %2$L, sqlerrm;
                r := coalesce(news[j], olds[j])::jsonb;
                rooms := '{}';%5$s
            end;
        end if;
        k := jsonb_build_object(%6$s);
        return next;
    end loop;
end
$body$
$f$,
        realtime.wal_render_function(t), qualified, t::oid,
        render, text_rooms, key_sql);
end
$$;

-- 0003's install_trigger (or its successor in 0004) keeps doing notify mode.
alter function realtime.install_trigger(regclass) rename to install_notify_trigger;

-- Installs capture for one tracked table, for the database's source: the
-- trigger in notify mode; in wal mode no trigger but publication
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
    -- 0004's TRUNCATE trigger, where it exists: wal mode has no trigger.
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
-- publication and gets its REPLICA IDENTITY back; its render function stays,
-- for changes it committed before that the leader has not written yet. The
-- rest is 0003's untrack.
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

-- Puts a table's REPLICA IDENTITY back to what it was before wal mode.
create or replace function realtime.restore_identity(t regclass, prior "char") returns void
language plpgsql as $$
begin
    execute format('alter table %s replica identity %s', t,
                   case prior when 'd' then 'default' when 'n' then 'nothing' else 'default' end);
    update realtime.tracked set prior_identity = null where tbl = t;
end
$$;

-- One batch of decoded transactions into the outbox, in one call: what the
-- leader does instead of the writers' trigger. Every array has one element
-- per change, in commit order; `(p_upto_lsn, p_upto_seq)` is the progress
-- once written (the last change or marker covered) and `p_end_lsn` how far
-- the slot may then be confirmed (null while a transaction is still being
-- written in chunks).
--
-- 1. The progress row is locked and the epoch checked: a leader that lost
--    its lock (another one bumped the epoch) fails here (SQLSTATE RT001).
-- 2. Changes at or before the recorded progress are skipped: a transaction
--    the slot replays after a crash is written once.
-- 3. Positions: a contiguous block drawn under the position lock, as the
--    trigger does, so the feed's catch-up barrier (take and release the
--    lock) stays valid, and positions stay in commit order.
-- 4. Each table's render function renders its rows; the outbox rows are
--    inserted, then NOTIFYed in position order, with the trigger's document
--    (a reference when it would not fit in a NOTIFY).
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
    pos bigint;
    doc text;
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
        select string_agg(format('select * from %s($1, $2, $3, $4, $5, $6)', realtime.wal_render_function(d.t::oid::regclass)),
                          ' union all ')
          into parts
          from (select distinct t from unnest(p_tables[start:total]) t) d
         where exists (select 1 from pg_proc
                        where proname = 'wal_render_' || d.t and pronamespace = 'realtime'::regnamespace);
        if parts is not null then
            execute format($q$
                insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms)
                select $7 + x.idx - $5, ($8)[x.idx], ($9)[x.idx], ($10)[x.idx], ($11)[x.idx], ($2)[x.idx], x.k, x.r, x.rooms
                  from (%s) x
            $q$, parts)
            using p_tables, p_ops, p_news, p_olds, start, p_safe, first, p_ats, p_lsns, p_schemas, p_names;
            get diagnostics written = row_count;
        end if;
        skipped := skipped + (n - written);
        if written < n then
            raise warning 'ws-gateway: % decoded changes of tables without a wal render function were not written (tables published by hand, not tracked?)',
                n - written;
        end if;
        select channel into strict chan from realtime.settings;
        for pos, doc in
            -- A row stored larger than a NOTIFY can carry is not rendered.
            select c.position, case when coalesce(pg_column_size(c.row), 0) < 7900 then realtime.payload(c) end
              from realtime.changes c
             where c.position between first and first + n - 1 order by c.position
        loop
            -- NOTIFY payloads must stay under 8000 bytes: larger changes
            -- travel as a reference that the gateway reads back.
            if doc is null or octet_length(doc) >= 7900 then
                doc := '{"p":' || pos || ',"ref":true}';
            end if;
            perform pg_notify(chan, doc);
        end loop;
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

-- The tracked tables that still exist, in oid order (locks are taken in one
-- order, so two switches cannot deadlock each other).
create or replace function realtime.tracked_tables() returns setof regclass
language sql stable as $$
    select t.tbl from realtime.tracked t
     where exists (select 1 from pg_class c where c.oid = t.tbl)
     order by t.tbl::oid
$$;

-- The switch of `ws-gateway source wal`, once the publication and the slot
-- exist (the slot's consistent point is `start`). One transaction: the
-- triggers go, the tables join the publication, and a `realtime.switch`
-- message marks the commit. Dropping a trigger locks its table, so every
-- writer's transaction commits either before the marker (with the trigger:
-- in the outbox already; the leader skips up to the marker) or after it
-- (without: the leader captures it). Returns the tables switched.
create or replace function realtime.switch_to_wal(slot text, start pg_lsn) returns int
language plpgsql as $$
declare
    cfg realtime.settings;
    t regclass;
    n int := 0;
begin
    select * into strict cfg from realtime.settings for update;
    if cfg.source = 'wal' then
        raise exception 'the source is wal already' using errcode = 'RT003';
    end if;
    update realtime.settings set source = 'wal', wal_slot = slot;
    update realtime.wal_progress set state = 'switching', commit_lsn = '0/0', seq = 0, end_lsn = start;
    for t in select realtime.tracked_tables() loop
        perform realtime.install_trigger(t);
        n := n + 1;
    end loop;
    perform pg_logical_emit_message(true, 'realtime.switch', 'wal');
    return n;
end
$$;

-- Locks every tracked table against writers (those in flight finish
-- first): step 1 of `ws-gateway source notify`, in the transaction that
-- then calls realtime.switch_to_notify.
create or replace function realtime.lock_tracked_tables() returns void
language plpgsql as $$
declare
    tables text;
begin
    select string_agg(x::text, ', ') into tables from realtime.tracked_tables() x;
    if tables is not null then
        execute 'lock table ' || tables || ' in share row exclusive mode';
    end if;
end
$$;

-- The switch of `ws-gateway source notify`, in the transaction that locked
-- the tracked tables (realtime.lock_tracked_tables), after another session
-- committed a `realtime.drain` message that ends at `drain`: waits until the
-- wal leader has the outbox past it, so that everything committed before
-- the lock is in the outbox with its position. Only then do the triggers
-- come back (their positions come after all of those), the tables leave
-- the publication and get their REPLICA IDENTITY back, and a
-- `realtime.switch` message tells the leader to stop. Writers wait for the
-- lock meanwhile, so nothing is lost even under load. Fails with RT002 when
-- no leader drains within `drain_timeout`. Returns the tables switched.
create or replace function realtime.switch_to_notify(drain pg_lsn, drain_timeout interval) returns int
language plpgsql as $$
declare
    cfg realtime.settings;
    t regclass;
    n int := 0;
    deadline timestamptz := clock_timestamp() + drain_timeout;
    prior "char";
begin
    select * into strict cfg from realtime.settings for update;
    if cfg.source <> 'wal' then
        raise exception 'the source is notify already' using errcode = 'RT003';
    end if;
    perform realtime.lock_tracked_tables();
    while (select end_lsn from realtime.wal_progress) < drain loop
        if clock_timestamp() > deadline then
            raise exception 'no wal leader wrote the outbox up to % within %: is a gateway with GATEWAY_SOURCE=wal running?',
                drain, drain_timeout using errcode = 'RT002';
        end if;
        perform pg_sleep(0.01);
    end loop;
    update realtime.settings set source = 'notify';
    update realtime.wal_progress set state = 'idle';
    for t in select realtime.tracked_tables() loop
        if exists (
            select 1 from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
             where p.pubname = cfg.wal_publication and pr.prrelid = t
        ) then
            execute format('alter publication %I drop table %s', cfg.wal_publication, t);
        end if;
        select prior_identity into prior from realtime.tracked where tbl = t;
        if prior is not null then
            perform realtime.restore_identity(t, prior);
        end if;
        perform realtime.install_trigger(t);
        n := n + 1;
    end loop;
    perform pg_logical_emit_message(true, 'realtime.switch', 'notify');
    return n;
end
$$;
