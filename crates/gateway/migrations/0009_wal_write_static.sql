-- The wal leader's batch write without planning its INSERT on every call.
--
-- 0007's realtime.wal_write built one dynamic INSERT (a union of the
-- batch's tables' render functions, events and truncations) and EXECUTEd
-- it: PL/pgSQL plans an EXECUTE on every call, and that plan, with the
-- render function inlined, was most of a one-change batch's cost
-- (measured in one warm session: 2.6-3.9 ms per call, against 0.6-0.9 ms
-- for the same INSERT as a static statement). At baseline load every
-- batch is one change, so that was most of wal's P99 above notify's.
--
-- Each tracked table now also gets realtime.wal_insert_<oid>: its rows of a
-- batch rendered and inserted by a static statement, whose plan PL/pgSQL
-- keeps for the session (the leader's connection) and PostgreSQL replans
-- when a render function is replaced (`realtime.track` again). wal_write
-- calls it per table in the batch (a trivial dynamic SELECT), and inserts
-- events and truncations by static statements of its own (generic plans
-- for small batches only: see plan_cache_mode below). Same arguments,
-- same rows, same positions (each entry's position is first + its index
-- minus start, whichever statement inserts it), same semantics as 0007.

create or replace function realtime.wal_insert_function(t regclass) returns text
language sql stable as $$
    select format('realtime.%I', 'wal_insert_' || t::oid)
$$;

-- The insert function of one tracked table, over both of its render
-- functions (0007: set-based, and row by row for `safe` batches).
create or replace function realtime.install_wal_insert(t regclass) returns void
language plpgsql as $$
begin
    execute format($f$
create or replace function %1$s(tables bigint[], ops text[], news json[], olds json[], start int,
                                first bigint, ats timestamptz[], lsns pg_lsn[], schemas text[],
                                names text[], safe boolean)
returns int
language plpgsql as $body$
declare
    n int;
begin
    if safe then
        insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms)
        select first + x.idx - start, a.at, a.lsn, nullif(a.schema, ''), nullif(a.name, ''), a.op, x.k, x.r, x.rooms
          from %2$s(tables, ops, news, olds, start, true) x
          join unnest(ats, lsns, schemas, names, ops) with ordinality a(at, lsn, schema, name, op, idx) on a.idx = x.idx;
    else
        insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms)
        select first + x.idx - start, a.at, a.lsn, nullif(a.schema, ''), nullif(a.name, ''), a.op, x.k, x.r, x.rooms
          from %2$s(tables, ops, news, olds, start) x
          join unnest(ats, lsns, schemas, names, ops) with ordinality a(at, lsn, schema, name, op, idx) on a.idx = x.idx;
    end if;
    get diagnostics n = row_count;
    return n;
end
$body$
$f$, realtime.wal_insert_function(t), realtime.wal_render_function(t));
end
$$;

-- 0007's, with the insert function.
create or replace function realtime.install_wal_render(t regclass) returns void
language plpgsql as $$
begin
    perform realtime.install_wal_render_safe(t);
    perform realtime.install_wal_render_set(t);
    perform realtime.install_wal_insert(t);
end
$$;

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
    k int;
    first bigint;
    fn text;
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
        -- The static statements' plans: PostgreSQL's choice (a generic plan,
        -- kept once it is no worse) for small batches; planned for the
        -- batch's real sizes above 64 entries, where planning costs under
        -- 40 us per change. A guard: a generic plan takes every array for
        -- a guess of its size, and could join the per-entry columns by
        -- nested loop (n^2). Measured here it did not (4,096 entries: 160 ms
        -- generic, 165 ms planned, as 0007). Local to the transaction.
        perform set_config('plan_cache_mode', case when total > 64 then 'force_custom_plan' else 'auto' end, true);
        -- Row changes: each table's insert function (tables without one
        -- are counted below, not written).
        for fn in
            select realtime.wal_insert_function(d.t::oid::regclass)
              from (select distinct t from unnest(p_tables[start:total], p_ops[start:total]) u(t, op)
                     where op in ('INSERT', 'UPDATE', 'DELETE')) d
             where exists (select 1 from pg_proc
                            where proname = 'wal_insert_' || d.t and pronamespace = 'realtime'::regnamespace)
        loop
            execute format('select %s($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)', fn)
               into k
              using p_tables, p_ops, p_news, p_olds, start, first, p_ats, p_lsns, p_schemas, p_names, p_safe;
            written := written + k;
        end loop;
        if 'EVENT' = any(p_ops[start:total]) then
            insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms, event)
            select first + e.idx - start, a.at, a.lsn, nullif(a.schema, ''), nullif(a.name, ''), e.op, null,
                   e.doc::jsonb -> 'payload', array[e.doc::jsonb ->> 'room'], e.doc::jsonb ->> 'event'
              from unnest(p_ops, p_news) with ordinality e(op, doc, idx)
              join unnest(p_ats, p_lsns, p_schemas, p_names) with ordinality a(at, lsn, schema, name, idx) on a.idx = e.idx
             where e.idx >= start and e.op = 'EVENT';
            get diagnostics k = row_count;
            written := written + k;
        end if;
        if 'TRUNCATE' = any(p_ops[start:total]) then
            insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms)
            select first + t.idx - start, a.at, a.lsn, nullif(a.schema, ''), nullif(a.name, ''), t.op, null, null,
                   realtime.room_patterns(tr.rooms)
              from unnest(p_ops, p_tables) with ordinality t(op, tbl, idx)
              join realtime.tracked tr on tr.tbl::oid = t.tbl
              join unnest(p_ats, p_lsns, p_schemas, p_names) with ordinality a(at, lsn, schema, name, idx) on a.idx = t.idx
             where t.idx >= start and t.op = 'TRUNCATE';
            get diagnostics k = row_count;
            written := written + k;
        end if;
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

-- The insert function for every table tracked in wal mode.
do $$
declare
    t regclass;
begin
    if (select source from realtime.settings) = 'wal' then
        for t in select tbl from realtime.tracked where to_regclass(tbl::text) is not null loop
            perform realtime.install_wal_insert(t);
        end loop;
    end if;
end
$$;
