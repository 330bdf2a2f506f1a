-- The outbox's documents compressed with lz4 where the server has it.
--
-- A row larger than about 2 KB is compressed when it is stored, inside the
-- transaction that stores it: the writer's own commit in notify mode (the
-- capture trigger), the wal leader's write in wal mode. pglz, the default,
-- is slow at it, and slowest when it gives up: measured with pgbench on
-- this project's wide-row shape (8 writers each updating its own row whose
-- 8 KB text column does not change, tracked in notify mode), 1,620-1,680
-- commits/s with pglz against 2,330-2,570 with lz4. pglz did not compress
-- those rows at all (hex text); lz4 saved a little. In a profile of the wal
-- leader's backend writing such rows, pglz_compress was a quarter of its
-- time.
--
-- lz4 needs a server built with it (PostgreSQL 14 or later, --with-lz4, as
-- the Debian, RPM, Docker and managed-service builds are). Elsewhere the
-- outbox keeps pglz. Only new rows are affected: stored ones keep their
-- compression, and both are read alike.
do $$
begin
    if 'lz4' = any (coalesce((select enumvals from pg_settings where name = 'default_toast_compression'), '{}')) then
        alter table realtime.changes
            alter column row set compression lz4,
            alter column key set compression lz4;
    end if;
end
$$;
