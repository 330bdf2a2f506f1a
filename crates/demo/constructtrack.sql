-- ConstructTrack demo schema and seed data, for `make run` and the tests.
--
-- NOT one of the gateway's migrations: a production database keeps its own
-- application tables and only gets the `realtime` schema. This file plays the
-- application: it creates a small construction-management schema, seeds it
-- when empty, and asks the gateway to capture changes with realtime.track().
--
-- Idempotent: run it as often as you like. It is sent as one multi-statement
-- query, which PostgreSQL runs as one transaction; the advisory lock makes
-- two loaders started together take turns.

select pg_advisory_xact_lock(hashtext('constructtrack demo schema'));

create table if not exists public.projects (
    id bigint generated always as identity primary key,
    name text not null unique,
    client text not null,
    city text not null,
    status text not null default 'active'
        check (status in ('planning', 'active', 'on_hold', 'completed')),
    budget numeric(14, 2) not null check (budget >= 0),
    starts_on date not null,
    ends_on date not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.crew_members (
    id bigint generated always as identity primary key,
    full_name text not null unique,
    role text not null,
    trade text not null,
    email text not null unique,
    phone text not null,
    active boolean not null default true,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.tasks (
    id bigint generated always as identity primary key,
    project_id bigint not null references public.projects (id) on delete cascade,
    assignee_id bigint references public.crew_members (id) on delete set null,
    title text not null,
    status text not null default 'todo'
        check (status in ('todo', 'in_progress', 'blocked', 'done')),
    percent_complete integer not null default 0 check (percent_complete between 0 and 100),
    due_on date,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index if not exists tasks_project_id on public.tasks (project_id);

create table if not exists public.daily_logs (
    id bigint generated always as identity primary key,
    project_id bigint not null references public.projects (id) on delete cascade,
    log_date date not null default current_date,
    author_id bigint references public.crew_members (id) on delete set null,
    weather text not null,
    temperature_c numeric(4, 1),
    crew_count integer not null check (crew_count >= 0),
    notes text not null default '',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index if not exists daily_logs_project_id on public.daily_logs (project_id, log_date);

create table if not exists public.inspections (
    id bigint generated always as identity primary key,
    project_id bigint not null references public.projects (id) on delete cascade,
    task_id bigint references public.tasks (id) on delete set null,
    inspector text not null,
    kind text not null,
    result text not null default 'pending' check (result in ('pending', 'pass', 'fail')),
    notes text not null default '',
    scheduled_on date not null default current_date,
    inspected_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index if not exists inspections_project_id on public.inspections (project_id);
-- The demo writer completes the oldest pending inspection.
create index if not exists inspections_pending on public.inspections (id) where result = 'pending';

create table if not exists public.equipment (
    id bigint generated always as identity primary key,
    project_id bigint not null references public.projects (id) on delete cascade,
    name text not null,
    kind text not null,
    status text not null default 'available'
        check (status in ('available', 'in_use', 'maintenance', 'out_of_service')),
    location text not null,
    hours numeric(10, 1) not null default 0 check (hours >= 0),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index if not exists equipment_project_id on public.equipment (project_id);

create table if not exists public.rfis (
    id bigint generated always as identity primary key,
    project_id bigint not null references public.projects (id) on delete cascade,
    asked_by bigint references public.crew_members (id) on delete set null,
    subject text not null,
    question text not null,
    answer text,
    status text not null default 'open' check (status in ('open', 'answered', 'closed')),
    due_on date,
    answered_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index if not exists rfis_project_id on public.rfis (project_id);
-- The demo writer answers the oldest open RFI and closes the oldest answered.
create index if not exists rfis_unclosed on public.rfis (status, id) where status <> 'closed';

create table if not exists public.safety_incidents (
    id bigint generated always as identity primary key,
    project_id bigint not null references public.projects (id) on delete cascade,
    reported_by bigint references public.crew_members (id) on delete set null,
    severity text not null check (severity in ('near_miss', 'minor', 'major', 'critical')),
    description text not null,
    occurred_at timestamptz not null default now(),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index if not exists safety_incidents_project_id on public.safety_incidents (project_id);

-- Seed data: each table is seeded only while it is empty. Rows refer to each
-- other by name, since identity values differ from one database to another.

insert into public.projects (name, client, city, status, budget, starts_on, ends_on)
select v.name, v.client, v.city, v.status, v.budget,
       current_date + v.start_days, current_date + v.end_days
  from (values
    ('Riverside Medical Center', 'Riverside Health System', 'Portland', 'active', 84500000.00, -210, 380),
    ('Harbor Bridge Retrofit', 'Port Authority', 'Seattle', 'active', 46200000.00, -120, 300),
    ('Oak Street Apartments', 'Oak Street Housing LLC', 'Tacoma', 'active', 23800000.00, -60, 420),
    ('Northgate Transit Hub', 'Metro Transit', 'Seattle', 'planning', 61000000.00, 45, 730)
  ) as v (name, client, city, status, budget, start_days, end_days)
 where not exists (select 1 from public.projects);

insert into public.crew_members (full_name, role, trade, email, phone)
select v.full_name, v.role, v.trade, v.email, v.phone
  from (values
    ('Maria Alvarez', 'Project Manager', 'management', 'maria.alvarez@constructtrack.example', '503-555-0101'),
    ('James Okafor', 'Superintendent', 'general', 'james.okafor@constructtrack.example', '503-555-0102'),
    ('Priya Natarajan', 'Project Engineer', 'engineering', 'priya.natarajan@constructtrack.example', '503-555-0103'),
    ('Tom Becker', 'Foreman', 'concrete', 'tom.becker@constructtrack.example', '503-555-0104'),
    ('Lena Kowalski', 'Foreman', 'electrical', 'lena.kowalski@constructtrack.example', '503-555-0105'),
    ('Diego Ramirez', 'Journeyman', 'plumbing', 'diego.ramirez@constructtrack.example', '503-555-0106'),
    ('Aisha Mohammed', 'Safety Officer', 'safety', 'aisha.mohammed@constructtrack.example', '503-555-0107'),
    ('Kevin Tran', 'Ironworker', 'steel', 'kevin.tran@constructtrack.example', '503-555-0108'),
    ('Sarah Lindqvist', 'Foreman', 'carpentry', 'sarah.lindqvist@constructtrack.example', '503-555-0109'),
    ('Marcus Johnson', 'Equipment Operator', 'earthwork', 'marcus.johnson@constructtrack.example', '503-555-0110'),
    ('Hannah Cho', 'Journeyman', 'mechanical', 'hannah.cho@constructtrack.example', '503-555-0111'),
    ('Ravi Patel', 'Quality Manager', 'quality', 'ravi.patel@constructtrack.example', '503-555-0112')
  ) as v (full_name, role, trade, email, phone)
 where not exists (select 1 from public.crew_members);

insert into public.tasks (project_id, assignee_id, title, status, percent_complete, due_on)
select p.id, c.id, v.title, v.status, v.pct, current_date + v.due_days
  from (values
    ('Riverside Medical Center', 'Tom Becker', 'Pour level 4 slab, east wing', 'in_progress', 60, 6),
    ('Riverside Medical Center', 'Lena Kowalski', 'Electrical rough-in, level 2 operating rooms', 'in_progress', 35, 14),
    ('Riverside Medical Center', 'Diego Ramirez', 'Medical gas piping, level 2', 'todo', 0, 21),
    ('Riverside Medical Center', 'Hannah Cho', 'Install air handling units AHU-3 and AHU-4', 'blocked', 20, 10),
    ('Riverside Medical Center', 'Sarah Lindqvist', 'Frame interior walls, level 3', 'in_progress', 45, 12),
    ('Riverside Medical Center', 'Kevin Tran', 'Erect steel for helipad structure', 'todo', 0, 35),
    ('Riverside Medical Center', 'Priya Natarajan', 'Submit lead-lined drywall shop drawings', 'done', 100, -3),
    ('Riverside Medical Center', 'Aisha Mohammed', 'Fall protection audit, levels 3 to 5', 'todo', 0, 4),
    ('Riverside Medical Center', 'Ravi Patel', 'Concrete cylinder break tests, level 3', 'done', 100, -8),
    ('Riverside Medical Center', 'Marcus Johnson', 'Backfill utility trench along north access road', 'in_progress', 70, 3),
    ('Harbor Bridge Retrofit', 'Kevin Tran', 'Replace bearings at pier 3', 'in_progress', 40, 18),
    ('Harbor Bridge Retrofit', 'Tom Becker', 'Jacket columns at piers 4 and 5', 'todo', 0, 30),
    ('Harbor Bridge Retrofit', 'Marcus Johnson', 'Set up barge crane for span 2', 'done', 100, -12),
    ('Harbor Bridge Retrofit', 'Priya Natarajan', 'Seismic isolation submittal review', 'in_progress', 80, 5),
    ('Harbor Bridge Retrofit', 'Aisha Mohammed', 'Over-water rescue drill', 'todo', 0, 9),
    ('Harbor Bridge Retrofit', 'Kevin Tran', 'Install steel cross-frames, span 1', 'in_progress', 25, 24),
    ('Harbor Bridge Retrofit', 'Ravi Patel', 'Ultrasonic weld testing, span 1 girders', 'blocked', 10, 15),
    ('Harbor Bridge Retrofit', 'Lena Kowalski', 'Relocate navigation lighting conduit', 'todo', 0, 20),
    ('Harbor Bridge Retrofit', 'James Okafor', 'Traffic control plan for lane closures', 'done', 100, -20),
    ('Harbor Bridge Retrofit', 'Tom Becker', 'Repair spalled concrete at abutment A', 'in_progress', 55, 11),
    ('Oak Street Apartments', 'Marcus Johnson', 'Excavate for parking garage, phase 2', 'in_progress', 65, 8),
    ('Oak Street Apartments', 'Tom Becker', 'Form and pour foundation walls, building B', 'todo', 0, 16),
    ('Oak Street Apartments', 'Sarah Lindqvist', 'Frame units 201 to 212', 'in_progress', 30, 22),
    ('Oak Street Apartments', 'Diego Ramirez', 'Underground plumbing, building A', 'done', 100, -5),
    ('Oak Street Apartments', 'Lena Kowalski', 'Temporary power for building B', 'in_progress', 90, 2),
    ('Oak Street Apartments', 'Hannah Cho', 'Rooftop unit curbs, building A', 'todo', 0, 28),
    ('Oak Street Apartments', 'Sarah Lindqvist', 'Install window package, building A level 1', 'blocked', 0, 13),
    ('Oak Street Apartments', 'Priya Natarajan', 'Finish schedule for model unit', 'in_progress', 50, 7),
    ('Oak Street Apartments', 'Aisha Mohammed', 'Trench shoring inspection walk', 'done', 100, -1),
    ('Oak Street Apartments', 'Ravi Patel', 'Compaction tests, parking garage subgrade', 'todo', 0, 6),
    ('Northgate Transit Hub', 'Maria Alvarez', 'Preconstruction meeting with Metro Transit', 'done', 100, -2),
    ('Northgate Transit Hub', 'Priya Natarajan', 'Geotechnical report review', 'in_progress', 40, 10),
    ('Northgate Transit Hub', 'James Okafor', 'Site logistics plan', 'in_progress', 20, 19),
    ('Northgate Transit Hub', 'Marcus Johnson', 'Demolish existing bus shelters', 'todo', 0, 50),
    ('Northgate Transit Hub', 'Lena Kowalski', 'Utility locate and potholing', 'todo', 0, 40),
    ('Northgate Transit Hub', 'Aisha Mohammed', 'Site-specific safety plan', 'in_progress', 65, 25),
    ('Northgate Transit Hub', 'Ravi Patel', 'Quality control plan submittal', 'todo', 0, 30),
    ('Northgate Transit Hub', 'Kevin Tran', 'Canopy steel procurement', 'todo', 0, 60),
    ('Northgate Transit Hub', 'Maria Alvarez', 'Baseline schedule approval', 'blocked', 50, 15),
    ('Northgate Transit Hub', 'Hannah Cho', 'Mechanical design coordination', 'in_progress', 15, 33)
  ) as v (project, assignee, title, status, pct, due_days)
  join public.projects p on p.name = v.project
  left join public.crew_members c on c.full_name = v.assignee
 where not exists (select 1 from public.tasks);

insert into public.daily_logs (project_id, log_date, author_id, weather, temperature_c, crew_count, notes)
select p.id, current_date + v.day, c.id, v.weather, v.temp, v.crew, v.notes
  from (values
    ('Riverside Medical Center', -1, 'James Okafor', 'overcast', 12.5, 34, 'Level 4 deck rebar inspected; pour scheduled for tomorrow.'),
    ('Riverside Medical Center', 0, 'James Okafor', 'light rain', 10.0, 31, 'Pour delayed two hours for rain; finished by 15:30.'),
    ('Harbor Bridge Retrofit', -1, 'Maria Alvarez', 'windy', 9.0, 18, 'Barge crane stood down for 3 hours, gusts over 30 mph.'),
    ('Harbor Bridge Retrofit', 0, 'Maria Alvarez', 'clear', 11.5, 22, 'Pier 3 bearing removal started.'),
    ('Oak Street Apartments', 0, 'Sarah Lindqvist', 'sunny', 16.0, 27, 'Framing crew ahead of schedule on units 201-206.')
  ) as v (project, day, author, weather, temp, crew, notes)
  join public.projects p on p.name = v.project
  left join public.crew_members c on c.full_name = v.author
 where not exists (select 1 from public.daily_logs);

insert into public.inspections (project_id, task_id, inspector, kind, result, notes, scheduled_on, inspected_at)
select t.project_id, t.id, v.inspector, v.kind, v.result, v.notes, current_date + v.day,
       case when v.result = 'pending' then null else now() + v.day * interval '1 day' end
  from (values
    ('Pour level 4 slab, east wing', 'City of Portland', 'rebar placement', 'pass', 'Clearances verified at all beams.', -1),
    ('Electrical rough-in, level 2 operating rooms', 'City of Portland', 'electrical rough-in', 'pending', '', 3),
    ('Replace bearings at pier 3', 'State DOT', 'bearing seat', 'fail', 'Seat elevation 6 mm low; shim and re-inspect.', -2),
    ('Underground plumbing, building A', 'Tacoma Permits', 'underground plumbing', 'pass', 'Pressure test held for 15 minutes.', -4),
    ('Frame units 201 to 212', 'Tacoma Permits', 'framing', 'pending', '', 5)
  ) as v (task, inspector, kind, result, notes, day)
  join public.tasks t on t.title = v.task
 where not exists (select 1 from public.inspections);

insert into public.equipment (project_id, name, kind, status, location, hours)
select p.id, v.name, v.kind, v.status, v.location, v.hours
  from (values
    ('Riverside Medical Center', 'Tower Crane TC-1', 'tower crane', 'in_use', 'East wing core', 2140.5),
    ('Riverside Medical Center', 'Concrete Pump CP-7', 'concrete pump', 'in_use', 'Level 4 deck', 880.0),
    ('Riverside Medical Center', 'Scissor Lift SL-12', 'scissor lift', 'available', 'Level 2 laydown', 410.5),
    ('Harbor Bridge Retrofit', 'Barge Crane BC-2', 'crawler crane on barge', 'in_use', 'Span 2', 3275.0),
    ('Harbor Bridge Retrofit', 'Hydraulic Jacks HJ-4', 'jacking system', 'in_use', 'Pier 3', 120.0),
    ('Harbor Bridge Retrofit', 'Welding Rig WR-3', 'welder', 'maintenance', 'Yard', 1544.5),
    ('Oak Street Apartments', 'Excavator EX-9', 'excavator', 'in_use', 'Garage phase 2', 1980.0),
    ('Oak Street Apartments', 'Telehandler TH-5', 'telehandler', 'available', 'Building A laydown', 760.5),
    ('Oak Street Apartments', 'Compactor VC-2', 'vibratory compactor', 'available', 'Garage ramp', 305.0),
    ('Northgate Transit Hub', 'Site Trailer ST-1', 'office trailer', 'in_use', 'North lot', 0.0)
  ) as v (project, name, kind, status, location, hours)
  join public.projects p on p.name = v.project
 where not exists (select 1 from public.equipment);

insert into public.rfis (project_id, asked_by, subject, question, answer, status, due_on, answered_at)
select p.id, c.id, v.subject, v.question, v.answer, v.status, current_date + v.due_days,
       case when v.answer is null then null else now() - interval '1 day' end
  from (values
    ('Riverside Medical Center', 'Hannah Cho', 'AHU-3 duct clash', 'Main supply duct clashes with beam B-14 at level 2. Can the duct be rerouted below the beam?', null, 'open', 4),
    ('Riverside Medical Center', 'Lena Kowalski', 'OR lighting circuits', 'Drawings show 20 A circuits for surgical lights; manufacturer requires 30 A. Please confirm.', 'Use 30 A circuits per manufacturer; revised panel schedule attached.', 'answered', -2),
    ('Harbor Bridge Retrofit', 'Kevin Tran', 'Bearing shim material', 'Is stainless steel shim plate acceptable in place of the specified galvanized plate?', null, 'open', 6),
    ('Harbor Bridge Retrofit', 'Tom Becker', 'Abutment A repair depth', 'Spalls exceed 75 mm at two locations. Extend repair detail 4 or use detail 6?', 'Use detail 6 where depth exceeds 75 mm.', 'closed', -9),
    ('Oak Street Apartments', 'Sarah Lindqvist', 'Window rough opening sizes', 'Window schedule and elevations disagree on unit 104 rough openings. Which governs?', null, 'open', 3),
    ('Northgate Transit Hub', 'Priya Natarajan', 'Boring log B-7', 'Groundwater at 2.1 m in boring B-7 is not addressed in the dewatering plan. Please advise.', null, 'open', 12)
  ) as v (project, asker, subject, question, answer, status, due_days)
  join public.projects p on p.name = v.project
  left join public.crew_members c on c.full_name = v.asker
 where not exists (select 1 from public.rfis);

insert into public.safety_incidents (project_id, reported_by, severity, description, occurred_at)
select p.id, c.id, v.severity, v.description, now() - v.ago
  from (values
    ('Harbor Bridge Retrofit', 'Aisha Mohammed', 'near_miss', 'Unsecured tool fell from span 2 deck into the exclusion zone; no one below.', interval '3 days'),
    ('Oak Street Apartments', 'Aisha Mohammed', 'minor', 'Laborer cut hand on rebar end; first aid given, rebar caps installed.', interval '6 days')
  ) as v (project, reporter, severity, description, ago)
  join public.projects p on p.name = v.project
  left join public.crew_members c on c.full_name = v.reporter
 where not exists (select 1 from public.safety_incidents);

-- Change capture: which rooms each table's rows belong to.
select realtime.track('public.projects', array['project:{id}']);
select realtime.track('public.tasks', array['project:{project_id}', 'task:{id}']);
select realtime.track('public.daily_logs', array['project:{project_id}']);
select realtime.track('public.inspections', array['project:{project_id}', 'inspection:{id}']);
select realtime.track('public.equipment', array['project:{project_id}', 'equipment:{id}']);
select realtime.track('public.rfis', array['project:{project_id}', 'rfi:{id}']);
select realtime.track('public.safety_incidents', array['project:{project_id}', 'safety']);
-- A projection: the crew board shows who is on site; e-mail addresses and
-- phone numbers stay in the database.
select realtime.track('public.crew_members', array['crew', 'crew:{id}'], exclude => array['email', 'phone']);
