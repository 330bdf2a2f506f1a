-- One table's batch written by one function: the leader's call for the
-- common batch (row changes of one table, the only kind at light load).
--
-- 0009's realtime.wal_write reaches a table's rows through two more
-- layers: a query for the batch's tables and their insert functions, a
-- dynamic SELECT of each (parsed and planned on every call), whose INSERT
-- joins the render function's rows to the batch's other arrays; then
-- notify_range reads the rows back to build the NOTIFY, and two UPDATEs
-- move the progress. Measured with pgbench on one change per call
-- (`-M prepared`, 10 calls/s, so each call runs on a cold CPU, as at
-- baseline load): 3.1-3.3 ms per call for wal_write, 2.1-2.2 ms for the
-- function below; back to back, 0.7 against 0.34 ms.
--
-- realtime.wal_write_<oid> has wal_write's arguments and result, and one
-- more column: `notified`, the NOTIFY's text when the batch went out in
-- one (small batches), which the leader hands to its own instance's feed
-- (source/notify.rs says why that is safe). Its
-- statements are static, and it renders with the same pieces as the
-- trigger and 0007's render function (row_sql, key_sql, template_sql):
-- one INSERT over one unnest of the batch's arrays, the documents of a
-- small batch taken from the INSERT's RETURNING (the NOTIFY is the same
-- text notify_range sends when it fits one notification), one UPDATE of
-- the progress. A batch it is not made for (another table, an event or a
-- truncation, a `safe` replay, nothing to write) goes to wal_write.
--
-- The leader calls it when its batch is one table's row changes and falls
-- back to wal_write where it does not exist (a table published by hand).
-- Like wal_insert_<oid>, it is made by realtime.track in wal mode and
-- left by untrack (changes already in the slot still render).

create or replace function realtime.wal_write_function(t regclass) returns text
language sql stable as $$
    select format('realtime.%I', 'wal_write_' || t::oid)
$$;

create or replace function realtime.install_wal_write_table(t regclass) returns void
language plpgsql as $$
declare
    entry realtime.tracked;
    qualified text;
    new_rooms text;
    old_rooms text;
    rows_sql text;
begin
    select * into strict entry from realtime.tracked where tbl = t;
    select format('%I.%I', n.nspname, c.relname) into strict qualified
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = t;
    select string_agg(realtime.template_sql(tpl, '(p.n)'), ', ' order by o),
           string_agg(realtime.template_sql(tpl, '(p.o)'), ', ' order by o)
      into new_rooms, old_rooms
      from unnest(entry.rooms) with ordinality u(tpl, o);
    -- The rows to insert, as 0007's render function and 0009's insert
    -- function make them (without the join: one unnest of every array).
    rows_sql := format($r$
        select first + u.idx - start, u.at, u.lsn, nullif(u.schema, ''), nullif(u.name, ''), u.op,
               %4$s, x.r,
               (select coalesce(array_agg(d.r order by d.i), '{}')
                  from (select w.r, min(w.i) as i
                          from unnest(array[%5$s, %6$s]) with ordinality w(r, i)
                         where w.r is not null group by w.r) d)
          from unnest(p_tables, p_ops, p_news, p_olds, p_ats, p_lsns, p_schemas, p_names)
               with ordinality u(tbl, op, new, old, at, lsn, schema, name, idx)
         cross join lateral (
               select case when u.new is not null then json_populate_record(null::%1$s, u.new) end as n,
                      case when u.old is not null then json_populate_record(null::%1$s, u.old) end as o) p
         cross join lateral (select case when u.op = 'DELETE' then %3$s else %2$s end as r) x
         where u.idx >= start$r$,
        qualified, realtime.row_sql(entry, '(p.n)'), realtime.row_sql(entry, '(p.o)'),
        realtime.key_sql(entry, 'x.r'), new_rooms, old_rooms);
    execute format($f$
create or replace function %1$s(
    p_epoch bigint, p_lsns pg_lsn[], p_seqs int[], p_ats timestamptz[], p_tables bigint[],
    p_schemas text[], p_names text[], p_ops text[], p_news json[], p_olds json[], p_safe boolean,
    p_upto_lsn pg_lsn, p_upto_seq int, p_end_lsn pg_lsn, p_state text
) returns table (written int, skipped int, first_position bigint, notified text)
language plpgsql as $body$
declare
    prog realtime.wal_progress;
    total int := coalesce(cardinality(p_lsns), 0);
    start int;
    n int;
    first bigint;
    payload text;
begin
    if p_safe or total = 0 or not (p_tables <@ array[%2$s::bigint] and p_ops <@ array['INSERT', 'UPDATE', 'DELETE']) then
        return query select w.written, w.skipped, w.first_position, null::text
                       from realtime.wal_write(p_epoch, p_lsns, p_seqs, p_ats, p_tables, p_schemas, p_names,
                            p_ops, p_news, p_olds, p_safe, p_upto_lsn, p_upto_seq, p_end_lsn, p_state) w;
        return;
    end if;
    written := 0;
    select * into strict prog from realtime.wal_progress for update;
    if prog.epoch <> p_epoch then
        raise exception 'ws-gateway: this wal leader (epoch %%) was replaced (epoch %%): another instance leads',
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
        if n <= 16 then
            -- Small: the documents come back from the INSERT. A row
            -- stored larger than a NOTIFY can carry is not rendered
            -- (notify_range's rule, on the row before compression).
            with ins as (
                insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms)
                %3$s
                returning position,
                          case when coalesce(pg_column_size(row), 0) < 7000 then realtime.payload(changes) end as doc
            )
            select count(*)::int,
                   string_agg(case when doc is null or octet_length(doc) >= 7000 then '{"p":' || position || ',"ref":true}'
                                   else doc end, ',' order by position)
              into written, payload
              from ins;
            if octet_length(payload) <= 7000 then
                notified := '{"docs":[' || payload || ']}';
                perform pg_notify((select channel from realtime.settings), notified);
            else
                perform realtime.notify_range((select channel from realtime.settings), first, first + n - 1);
            end if;
        else
            insert into realtime.changes (position, committed_at, commit_lsn, schema_name, table_name, op, key, row, rooms)
            %3$s;
            get diagnostics written = row_count;
            perform realtime.notify_range((select channel from realtime.settings), first, first + n - 1);
        end if;
    end if;
    update realtime.wal_progress
       set commit_lsn = case when (p_upto_lsn, p_upto_seq) > (prog.commit_lsn, prog.seq) then p_upto_lsn else commit_lsn end,
           seq = case when (p_upto_lsn, p_upto_seq) > (prog.commit_lsn, prog.seq) then p_upto_seq else seq end,
           end_lsn = greatest(end_lsn, coalesce(p_end_lsn, end_lsn)),
           state = coalesce(p_state, state);
    return next;
end
$body$
$f$, realtime.wal_write_function(t), t::oid, rows_sql);
end
$$;

-- 0009's, with the table's write function.
create or replace function realtime.install_wal_render(t regclass) returns void
language plpgsql as $$
begin
    perform realtime.install_wal_render_safe(t);
    perform realtime.install_wal_render_set(t);
    perform realtime.install_wal_insert(t);
    perform realtime.install_wal_write_table(t);
end
$$;

-- The write function for every table tracked in wal mode.
do $$
declare
    t regclass;
begin
    if (select source from realtime.settings) = 'wal' then
        for t in select tbl from realtime.tracked where to_regclass(tbl::text) is not null loop
            perform realtime.install_wal_write_table(t);
        end loop;
    end if;
end
$$;
