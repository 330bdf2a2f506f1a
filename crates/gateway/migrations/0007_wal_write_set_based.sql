-- The wal leader's batch write: linear, and rendered set-based.
--
-- 0006's realtime.wal_write handed its arrays to one dynamic INSERT that
-- read each entry's commit time, LSN, schema, table and op by subscript.
-- EXECUTE ... USING passes arrays flat, and a subscript of a flat array of
-- variable-length elements (text) walks it from the start: a batch of n
-- entries cost O(n^2) (measured: 4,096 entries 500 ms, 8,192 entries
-- 1.3 s, most of it in the array walk). The per-entry columns are now
-- joined by index from one unnest (linear), and so are the events and
-- truncations (4,096 entries: 160 ms on a loaded machine; 8,192: 340 ms).
--
-- Rendering: 0006's per-table render function is PL/pgSQL, a loop of
-- statements per row (4,096 rows: 33-39 ms). Each tracked table now also
-- gets a set-based SQL render function (the same generated expressions
-- over one unnest: 4-15 ms), which wal_write uses; the PL/pgSQL one stays
-- for `safe` batches, whose rows are rendered one by one in exception
-- blocks. Same arguments, same semantics (see 0005 and 0006).

-- 0006's generator of the PL/pgSQL render function.
alter function realtime.install_wal_render(regclass) rename to install_wal_render_safe;

-- The set-based render function of one tracked table: its row changes in
-- a batch from `start` on, rendered as the trigger would (row with its
-- projection, key, rooms of the new and the old row).
create or replace function realtime.install_wal_render_set(t regclass) returns void
language plpgsql as $$
declare
    entry realtime.tracked;
    qualified text;
    new_rooms text;
    old_rooms text;
begin
    select * into strict entry from realtime.tracked where tbl = t;
    -- Qualified, so that the function does not depend on a search_path.
    select format('%I.%I', n.nspname, c.relname) into strict qualified
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = t;
    select string_agg(realtime.template_sql(tpl, '(p.n)'), ', ' order by o),
           string_agg(realtime.template_sql(tpl, '(p.o)'), ', ' order by o)
      into new_rooms, old_rooms
      from unnest(entry.rooms) with ordinality u(tpl, o);
    execute format($f$
create or replace function %1$s(tables bigint[], ops text[], news json[], olds json[], start int)
returns table (idx int, k jsonb, r jsonb, rooms text[])
language sql stable as $body$
    select x.idx::int, %6$s, x.r, x.rooms
      from (select u.idx,
                   case when u.op = 'DELETE' then %5$s else %4$s end as r,
                   -- realtime.distinct_rooms, inline: a subplan, not a
                   -- function call that starts an executor per row.
                   (select coalesce(array_agg(d.r order by d.i), '{}')
                      from (select w.r, min(w.i) as i
                              from unnest(array[%2$s, %3$s]) with ordinality w(r, i)
                             where w.r is not null group by w.r) d) as rooms
              from unnest(tables, ops, news, olds) with ordinality u(tbl, op, new, old, idx)
              cross join lateral (
                  select case when u.new is not null then json_populate_record(null::%7$s, u.new) end as n,
                         case when u.old is not null then json_populate_record(null::%7$s, u.old) end as o) p
             where u.idx >= start and u.tbl = %8$s and u.op in ('INSERT', 'UPDATE', 'DELETE')) x
$body$
$f$,
        realtime.wal_render_function(t), new_rooms, old_rooms,
        realtime.row_sql(entry, '(p.n)'), realtime.row_sql(entry, '(p.o)'),
        realtime.key_sql(entry, 'x.r'), qualified, t::oid);
end
$$;

-- Both render functions of one tracked table.
create or replace function realtime.install_wal_render(t regclass) returns void
language plpgsql as $$
begin
    perform realtime.install_wal_render_safe(t);
    perform realtime.install_wal_render_set(t);
end
$$;

-- 0006's, dropping both render functions in notify mode.
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
        execute format('drop function if exists %s(bigint[], text[], json[], json[], int)',
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
        -- A safe batch renders row by row (the PL/pgSQL function), any
        -- other set-based.
        select string_agg(format(case when p_safe
                                      then 'select idx, k, r, rooms, null::text from %s($1, $2, $3, $4, $5, $6)'
                                      else 'select idx, k, r, rooms, null::text from %s($1, $2, $3, $4, $5)' end,
                                 realtime.wal_render_function(d.t::oid::regclass)),
                          ' union all ')
          into parts
          from (select distinct t from unnest(p_tables[start:total], p_ops[start:total]) u(t, op)
                 where op in ('INSERT', 'UPDATE', 'DELETE')) d
         where exists (select 1 from pg_proc
                        where proname = 'wal_render_' || d.t and pronamespace = 'realtime'::regnamespace);
        parts := concat_ws(' union all ', parts,
            $e$select e.idx::int, null::jsonb, e.doc::jsonb -> 'payload',
                      array[e.doc::jsonb ->> 'room'], e.doc::jsonb ->> 'event'
                 from unnest($2, $3) with ordinality e(op, doc, idx)
                where e.idx >= $5 and e.op = 'EVENT'$e$,
            $t$select t.idx::int, null::jsonb, null::jsonb, realtime.room_patterns(tr.rooms), null::text
                 from unnest($2, $1) with ordinality t(op, tbl, idx)
                 join realtime.tracked tr on tr.tbl::oid = t.tbl
                where t.idx >= $5 and t.op = 'TRUNCATE'$t$);
        -- The per-entry columns joined by index (unnest is linear; a
        -- subscript of a flat array of text is a scan from its start).
        execute format($q$
            insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms, event)
            select $7 + x.idx - $5, a.at, a.lsn, nullif(a.schema, ''), nullif(a.name, ''), a.op, x.k, x.r, x.rooms, x.ev
              from (%s) x (idx, k, r, rooms, ev)
              join unnest($8, $9, $10, $11, $2) with ordinality a(at, lsn, schema, name, op, idx) on a.idx = x.idx
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

-- Both render functions for every table tracked in wal mode.
do $$
declare
    t regclass;
begin
    if (select source from realtime.settings) = 'wal' then
        for t in select tbl from realtime.tracked where to_regclass(tbl::text) is not null loop
            perform realtime.install_wal_render(t);
        end loop;
    end if;
end
$$;
