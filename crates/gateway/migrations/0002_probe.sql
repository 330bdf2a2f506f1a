-- The built-in latency probe's table. Each gateway instance keeps one row,
-- keyed by its instance id, and updates it every GATEWAY_PROBE_INTERVAL_MS;
-- the change is captured like any tracked table's (0001's deferred trigger,
-- position and committed_at at COMMIT) into the room `__probe:<instance>`,
-- which the instance's probe receives over its own WebSocket.
create table if not exists realtime.probe (
    instance text primary key,
    -- The probe's counter: which commit a received change answers.
    seq bigint not null,
    sent_at timestamptz not null default clock_timestamp()
);

select realtime.track('realtime.probe', array['__probe:{instance}']);
