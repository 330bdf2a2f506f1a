//! The demo ConstructTrack application: its schema (`constructtrack.sql`)
//! and a writer that keeps committing realistic site updates, so that `make
//! run` shows live changes flowing through the gateway without any client;
//! and the project board (`board.rs`), a page of the application that
//! follows a project live through the JavaScript client.
//!
//! Nothing here is used when the gateway serves a real database.

pub mod board;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Tables, seed data and the `realtime.track` calls. Needs the gateway's
/// `realtime` schema to exist already.
pub const SCHEMA_SQL: &str = include_str!("../constructtrack.sql");

/// Creates the demo tables (if missing), seeds empty ones, and tracks them.
pub async fn load_schema(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(SCHEMA_SQL)
        .execute(pool)
        .await
        .context("loading the ConstructTrack demo schema (crates/demo/constructtrack.sql)")?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Site updates committed per second, on average. One update is usually
    /// one row, sometimes a small transaction of a few rows.
    pub changes_per_second: f64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            changes_per_second: 5.0,
        }
    }
}

/// Commits site updates at about `opts.changes_per_second` until `shutdown`.
///
/// A failed update (the database restarting, say) is logged and skipped: the
/// writer keeps going, so the demo recovers by itself. Updates run one after
/// another, so the reachable rate is bounded by the round trip, a few
/// thousand per second.
pub async fn run_writer(pool: PgPool, opts: WriterOptions, shutdown: CancellationToken) -> Result<()> {
    let rate = opts.changes_per_second;
    if !rate.is_finite() || rate <= 0.0 {
        bail!("demo writer: changes_per_second must be a positive number, got {rate}");
    }
    // Timers tick at millisecond granularity: above ~100/s, wake every 10 ms
    // and make several updates per tick.
    let period = Duration::from_secs_f64((1.0 / rate).max(0.010));
    let per_tick = rate * period.as_secs_f64();
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut rng = XorShift::from_clock();
    let mut site = Site::default();
    let mut failures = FailureLog::default();
    let mut due = 0.0;
    tracing::info!(changes_per_second = rate, "demo writer started");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        due += per_tick;
        while due >= 1.0 {
            due -= 1.0;
            let update = Update::pick(&mut rng);
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                result = update.apply(&pool, &mut site, &mut rng) => result,
            };
            failures.record(update, result);
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    tracing::info!("demo writer stopped");
    Ok(())
}

/// The kinds of update a construction site produces, with how often each
/// happens relative to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Update {
    /// A task moves along todo -> in_progress (-> blocked -> in_progress) ->
    /// done; a done task is archived (deleted) and a new one planned.
    AdvanceTask,
    ReassignTask,
    /// The task's rooms change: it leaves one project room for another.
    MoveTask,
    DailyLog,
    /// A new inspection is scheduled, or the oldest pending one passes or fails.
    Inspection,
    /// Hours logged, or the machine moved (sometimes to another project).
    Equipment,
    /// An RFI asked, the oldest open one answered, or an answered one closed.
    Rfi,
    SafetyIncident,
    /// One transaction: progress on several tasks of a project plus the
    /// day's log entry.
    CrewShift,
}

impl Update {
    const WEIGHTS: [(Update, u32); 9] = [
        (Update::AdvanceTask, 34),
        (Update::ReassignTask, 10),
        (Update::MoveTask, 3),
        (Update::DailyLog, 8),
        (Update::Inspection, 10),
        (Update::Equipment, 15),
        (Update::Rfi, 8),
        (Update::SafetyIncident, 1),
        (Update::CrewShift, 6),
    ];

    fn pick(rng: &mut XorShift) -> Update {
        let total: u32 = Self::WEIGHTS.iter().map(|(_, w)| w).sum();
        let mut roll = rng.below(u64::from(total)) as u32;
        for (update, weight) in Self::WEIGHTS {
            if roll < weight {
                return update;
            }
            roll -= weight;
        }
        unreachable!("roll is below the total weight")
    }

    fn name(self) -> &'static str {
        match self {
            Update::AdvanceTask => "advance_task",
            Update::ReassignTask => "reassign_task",
            Update::MoveTask => "move_task",
            Update::DailyLog => "daily_log",
            Update::Inspection => "inspection",
            Update::Equipment => "equipment",
            Update::Rfi => "rfi",
            Update::SafetyIncident => "safety_incident",
            Update::CrewShift => "crew_shift",
        }
    }

    async fn apply(self, pool: &PgPool, site: &mut Site, rng: &mut XorShift) -> Result<()> {
        site.refresh(pool).await?;
        match self {
            Update::AdvanceTask => advance_task(pool, site, rng).await,
            Update::ReassignTask => reassign_task(pool, site, rng).await,
            Update::MoveTask => move_task(pool, site, rng).await,
            Update::DailyLog => {
                let mut tx = pool.begin().await?;
                insert_daily_log(&mut tx, site.project(rng), site, rng).await?;
                tx.commit().await?;
                Ok(())
            }
            Update::Inspection => inspection(pool, site, rng).await,
            Update::Equipment => equipment(pool, site, rng).await,
            Update::Rfi => rfi(pool, site, rng).await,
            Update::SafetyIncident => safety_incident(pool, site, rng).await,
            Update::CrewShift => crew_shift(pool, site, rng).await,
        }
    }
}

/// Project and crew ids, re-read now and then: they change rarely, and
/// every update needs one.
#[derive(Debug, Default)]
struct Site {
    projects: Vec<i64>,
    crew: Vec<i64>,
    read_at: Option<Instant>,
}

impl Site {
    const MAX_AGE: Duration = Duration::from_secs(30);

    async fn refresh(&mut self, pool: &PgPool) -> Result<()> {
        if self.read_at.is_some_and(|at| at.elapsed() < Self::MAX_AGE) {
            return Ok(());
        }
        self.projects = sqlx::query_scalar("select id from public.projects order by id")
            .fetch_all(pool)
            .await?;
        self.crew = sqlx::query_scalar("select id from public.crew_members where active order by id")
            .fetch_all(pool)
            .await?;
        if self.projects.is_empty() || self.crew.is_empty() {
            bail!("the demo needs projects and crew members; run demo::load_schema first");
        }
        self.read_at = Some(Instant::now());
        Ok(())
    }

    fn project(&self, rng: &mut XorShift) -> i64 {
        *rng.choose(&self.projects)
    }

    fn crew_member(&self, rng: &mut XorShift) -> i64 {
        *rng.choose(&self.crew)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskStatus {
    Todo,
    InProgress,
    Blocked,
    Done,
}

impl TaskStatus {
    fn parse(text: &str) -> Result<TaskStatus> {
        Ok(match text {
            "todo" => TaskStatus::Todo,
            "in_progress" => TaskStatus::InProgress,
            "blocked" => TaskStatus::Blocked,
            "done" => TaskStatus::Done,
            other => bail!("unknown task status {other:?}"),
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Todo => "todo",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Blocked => "blocked",
            TaskStatus::Done => "done",
        }
    }
}

/// What happens next to a task, given where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskStep {
    Set(TaskStatus, i32),
    /// Done tasks leave the board, which keeps the table at a steady size.
    Archive,
}

fn next_step(status: TaskStatus, percent: i32, rng: &mut XorShift) -> TaskStep {
    match status {
        TaskStatus::Todo => TaskStep::Set(TaskStatus::InProgress, percent.max(5)),
        TaskStatus::Blocked => TaskStep::Set(TaskStatus::InProgress, percent),
        TaskStatus::InProgress if rng.chance(0.08) => TaskStep::Set(TaskStatus::Blocked, percent),
        TaskStatus::InProgress => {
            let percent = percent + 5 + rng.below(16) as i32;
            if percent >= 100 {
                TaskStep::Set(TaskStatus::Done, 100)
            } else {
                TaskStep::Set(TaskStatus::InProgress, percent)
            }
        }
        TaskStatus::Done => TaskStep::Archive,
    }
}

/// A random row of `table` (one of ours), without scanning the table: the
/// first id at or after a random point between the lowest and highest id.
fn random_id_sql(table: &str, columns: &str) -> String {
    format!(
        "select {columns} from public.{table} \
          where id >= (select min(id) + floor($1 * (max(id) - min(id) + 1))::bigint \
                         from public.{table}) \
          order by id limit 1"
    )
}

async fn advance_task(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    let sql = random_id_sql("tasks", "id, project_id, status, percent_complete");
    let Some(row) = sqlx::query(&sql).bind(rng.unit()).fetch_optional(pool).await? else {
        return plan_task(pool, site.project(rng), site, rng).await;
    };
    let id: i64 = row.try_get("id")?;
    let project_id: i64 = row.try_get("project_id")?;
    let status = TaskStatus::parse(row.try_get("status")?)?;
    let percent: i32 = row.try_get("percent_complete")?;
    match next_step(status, percent, rng) {
        TaskStep::Set(status, percent) => {
            sqlx::query(
                "update public.tasks set status = $2, percent_complete = $3, updated_at = now() \
                  where id = $1",
            )
            .bind(id)
            .bind(status.as_str())
            .bind(percent)
            .execute(pool)
            .await?;
        }
        TaskStep::Archive => {
            let mut tx = pool.begin().await?;
            sqlx::query("delete from public.tasks where id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            insert_task(&mut tx, project_id, site, rng).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

async fn plan_task(pool: &PgPool, project_id: i64, site: &Site, rng: &mut XorShift) -> Result<()> {
    let mut tx = pool.begin().await?;
    insert_task(&mut tx, project_id, site, rng).await?;
    tx.commit().await?;
    Ok(())
}

async fn insert_task(
    tx: &mut Transaction<'_, Postgres>,
    project_id: i64,
    site: &Site,
    rng: &mut XorShift,
) -> Result<()> {
    let title = format!("{} — {}", rng.choose(ACTIVITIES), rng.choose(AREAS));
    sqlx::query(
        "insert into public.tasks (project_id, assignee_id, title, due_on) \
         values ($1, $2, $3, current_date + $4::int)",
    )
    .bind(project_id)
    .bind(site.crew_member(rng))
    .bind(title)
    .bind(7 + rng.below(40) as i32)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn reassign_task(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    let sql = random_id_sql("tasks", "id");
    let Some(id) = sqlx::query_scalar::<_, i64>(&sql)
        .bind(rng.unit())
        .fetch_optional(pool)
        .await?
    else {
        return Ok(());
    };
    sqlx::query("update public.tasks set assignee_id = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(site.crew_member(rng))
        .execute(pool)
        .await?;
    Ok(())
}

async fn move_task(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    let sql = random_id_sql("tasks", "id, project_id");
    let Some(row) = sqlx::query(&sql).bind(rng.unit()).fetch_optional(pool).await? else {
        return Ok(());
    };
    let id: i64 = row.try_get("id")?;
    let from: i64 = row.try_get("project_id")?;
    let others: Vec<i64> = site.projects.iter().copied().filter(|p| *p != from).collect();
    if others.is_empty() {
        return Ok(());
    }
    sqlx::query("update public.tasks set project_id = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(*rng.choose(&others))
        .execute(pool)
        .await?;
    Ok(())
}

async fn insert_daily_log(
    tx: &mut Transaction<'_, Postgres>,
    project_id: i64,
    site: &Site,
    rng: &mut XorShift,
) -> Result<()> {
    sqlx::query(
        "insert into public.daily_logs \
             (project_id, author_id, weather, temperature_c, crew_count, notes) \
         values ($1, $2, $3, $4::numeric(4, 1), $5, $6)",
    )
    .bind(project_id)
    .bind(site.crew_member(rng))
    .bind(*rng.choose(WEATHER))
    .bind(-2.0 + 30.0 * rng.unit())
    .bind(6 + rng.below(40) as i32)
    .bind(*rng.choose(LOG_NOTES))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn inspection(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    if rng.chance(0.5) {
        let pending: Option<i64> =
            sqlx::query_scalar("select id from public.inspections where result = 'pending' order by id limit 1")
                .fetch_optional(pool)
                .await?;
        if let Some(id) = pending {
            let mut tx = pool.begin().await?;
            let (result, notes) = if rng.chance(0.8) {
                ("pass", *rng.choose(PASS_NOTES))
            } else {
                ("fail", *rng.choose(FAIL_NOTES))
            };
            sqlx::query(
                "update public.inspections \
                    set result = $2, notes = $3, inspected_at = now(), updated_at = now() \
                  where id = $1",
            )
            .bind(id)
            .bind(result)
            .bind(notes)
            .execute(&mut *tx)
            .await?;
            // An application event in the same transaction: it reaches the
            // project's room right after the row change, or not at all.
            sqlx::query(
                "select realtime.publish('project:' || project_id, 'inspection_' || $2, \
                        jsonb_build_object('inspection_id', id, 'kind', kind, 'inspector', inspector)) \
                   from public.inspections where id = $1",
            )
            .bind(id)
            .bind(if result == "pass" { "passed" } else { "failed" })
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(());
        }
    }
    let sql = random_id_sql("tasks", "id, project_id");
    let task = sqlx::query(&sql).bind(rng.unit()).fetch_optional(pool).await?;
    let (project_id, task_id) = match task {
        Some(row) => (row.try_get("project_id")?, Some(row.try_get::<i64, _>("id")?)),
        None => (site.project(rng), None),
    };
    sqlx::query(
        "insert into public.inspections (project_id, task_id, inspector, kind, scheduled_on) \
         values ($1, $2, $3, $4, current_date + $5::int)",
    )
    .bind(project_id)
    .bind(task_id)
    .bind(*rng.choose(INSPECTORS))
    .bind(*rng.choose(INSPECTION_KINDS))
    .bind(1 + rng.below(7) as i32)
    .execute(pool)
    .await?;
    Ok(())
}

async fn equipment(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    let sql = random_id_sql("equipment", "id, project_id");
    let Some(row) = sqlx::query(&sql).bind(rng.unit()).fetch_optional(pool).await? else {
        return Ok(());
    };
    let id: i64 = row.try_get("id")?;
    let project_id: i64 = row.try_get("project_id")?;
    let roll = rng.unit();
    if roll < 0.6 {
        sqlx::query(
            "update public.equipment \
                set hours = hours + $2::numeric(10, 1), status = 'in_use', updated_at = now() \
              where id = $1",
        )
        .bind(id)
        .bind(0.5 + 8.0 * rng.unit())
        .execute(pool)
        .await?;
    } else {
        // Mostly a move around the site; now and then to another project.
        let project_id = if roll < 0.95 { project_id } else { site.project(rng) };
        sqlx::query(
            "update public.equipment \
                set project_id = $2, location = $3, status = $4, updated_at = now() \
              where id = $1",
        )
        .bind(id)
        .bind(project_id)
        .bind(*rng.choose(AREAS))
        .bind(*rng.choose(&["available", "in_use", "in_use", "maintenance"]))
        .execute(pool)
        .await?;
    }
    Ok(())
}

async fn rfi(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    let roll = rng.unit();
    if roll >= 0.35 {
        let status = if roll < 0.8 { "open" } else { "answered" };
        let oldest: Option<i64> =
            sqlx::query_scalar("select id from public.rfis where status = $1 order by id limit 1")
                .bind(status)
                .fetch_optional(pool)
                .await?;
        if let Some(id) = oldest {
            if status == "open" {
                sqlx::query(
                    "update public.rfis \
                        set answer = $2, status = 'answered', answered_at = now(), \
                            updated_at = now() \
                      where id = $1",
                )
                .bind(id)
                .bind(*rng.choose(RFI_ANSWERS))
                .execute(pool)
                .await?;
            } else {
                sqlx::query("update public.rfis set status = 'closed', updated_at = now() where id = $1")
                    .bind(id)
                    .execute(pool)
                    .await?;
            }
            return Ok(());
        }
    }
    let (subject, question) = *rng.choose(RFI_QUESTIONS);
    sqlx::query(
        "insert into public.rfis (project_id, asked_by, subject, question, due_on) \
         values ($1, $2, $3, $4, current_date + $5::int)",
    )
    .bind(site.project(rng))
    .bind(site.crew_member(rng))
    .bind(subject)
    .bind(question)
    .bind(3 + rng.below(10) as i32)
    .execute(pool)
    .await?;
    Ok(())
}

async fn safety_incident(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    let severity = match rng.below(100) {
        0..=69 => "near_miss",
        70..=92 => "minor",
        93..=98 => "major",
        _ => "critical",
    };
    sqlx::query(
        "insert into public.safety_incidents (project_id, reported_by, severity, description) \
         values ($1, $2, $3, $4)",
    )
    .bind(site.project(rng))
    .bind(site.crew_member(rng))
    .bind(severity)
    .bind(*rng.choose(INCIDENTS))
    .execute(pool)
    .await?;
    Ok(())
}

async fn crew_shift(pool: &PgPool, site: &Site, rng: &mut XorShift) -> Result<()> {
    let project_id = site.project(rng);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "update public.tasks \
            set percent_complete = least(percent_complete + $2, 95), updated_at = now() \
          where id in (select id from public.tasks \
                        where project_id = $1 and status = 'in_progress' \
                        order by updated_at limit $3)",
    )
    .bind(project_id)
    .bind(3 + rng.below(8) as i32)
    .bind(2 + rng.below(3) as i64)
    .execute(&mut *tx)
    .await?;
    insert_daily_log(&mut tx, project_id, site, rng).await?;
    // The foreman who wrote the log checks in (the crew board's row; its
    // e-mail and phone are not sent: see the projection in constructtrack.sql).
    sqlx::query(
        "update public.crew_members set updated_at = now() \
          where id = (select author_id from public.daily_logs where project_id = $1 order by id desc limit 1)",
    )
    .bind(project_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "select realtime.publish('project:' || $1, 'crew_checked_in', \
                jsonb_build_object('crew_count', crew_count, 'weather', weather)) \
           from public.daily_logs where project_id = $1 order by id desc limit 1",
    )
    .bind(project_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Warns about a failing update once, not once per tick: while the database
/// is down every update fails, and a restart should read as two log lines.
#[derive(Debug, Default)]
struct FailureLog {
    /// Failures since the last success.
    failing: u64,
    last_warning: Option<Instant>,
}

impl FailureLog {
    const REPEAT_AFTER: Duration = Duration::from_secs(10);

    fn record(&mut self, update: Update, result: Result<()>) {
        match result {
            Ok(()) => {
                if self.failing > 0 {
                    tracing::info!(failed = self.failing, "demo writer recovered");
                }
                self.failing = 0;
                self.last_warning = None;
            }
            Err(error) => {
                self.failing += 1;
                if self.last_warning.is_none_or(|at| at.elapsed() >= Self::REPEAT_AFTER) {
                    tracing::warn!(
                        update = update.name(),
                        failing = self.failing,
                        error = format!("{error:#}"),
                        "demo writer update failed; continuing"
                    );
                    self.last_warning = Some(Instant::now());
                }
            }
        }
    }
}

/// xorshift64*: cheap, and plenty for picking demo updates.
#[derive(Debug, Clone)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // The state must never be zero.
        XorShift(seed.max(1))
    }

    fn from_clock() -> XorShift {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        XorShift::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); n > 0.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn choose<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const ACTIVITIES: &[&str] = &[
    "Install drywall",
    "Tape and finish drywall",
    "Pull wire for lighting circuits",
    "Set door frames",
    "Install fire sprinkler branch lines",
    "Pour slab on grade",
    "Place rebar",
    "Hang ductwork",
    "Install waterproofing membrane",
    "Set curtain wall units",
    "Paint corridors",
    "Install ceiling grid",
    "Firestop penetrations",
    "Set plumbing fixtures",
    "Install roof insulation",
    "Grout column base plates",
];

const AREAS: &[&str] = &[
    "Level 1 east wing",
    "Level 2 west wing",
    "Level 3 corridor",
    "Level 4 core",
    "Roof",
    "Parking garage",
    "Lobby",
    "Stair tower B",
    "Mechanical room",
    "North laydown yard",
    "Pier 4",
    "Span 3",
];

const WEATHER: &[&str] = &[
    "clear",
    "sunny",
    "overcast",
    "light rain",
    "heavy rain",
    "windy",
    "fog",
    "hot",
];

const LOG_NOTES: &[&str] = &[
    "Work proceeded on schedule.",
    "Concrete delivery 40 minutes late; pour finished on time.",
    "Crane stood down for an hour for wind.",
    "Owner walkthrough of completed areas; punch list started.",
    "Material delivery staged in the laydown yard.",
    "Toolbox talk held on ladder safety.",
    "Rain delayed exterior work; crews moved inside.",
    "Inspector on site in the afternoon.",
];

const INSPECTORS: &[&str] = &[
    "City Building Department",
    "State DOT",
    "Fire Marshal",
    "Third-party special inspector",
    "Owner's representative",
];

const INSPECTION_KINDS: &[&str] = &[
    "framing",
    "electrical rough-in",
    "plumbing rough-in",
    "rebar placement",
    "fire sprinkler",
    "structural steel bolting",
    "insulation",
    "final",
];

const PASS_NOTES: &[&str] = &[
    "Approved as built.",
    "Passed; minor notes for the punch list.",
    "Approved; clearances verified.",
];

const FAIL_NOTES: &[&str] = &[
    "Missing firestopping at two penetrations; re-inspect.",
    "Anchor spacing exceeds the drawings; correct and re-inspect.",
    "Nail plates missing at plumbing bores.",
];

const RFI_QUESTIONS: &[(&str, &str)] = &[
    (
        "Beam penetration",
        "May the sprinkler main pass through beam B-12 web, or must it drop below?",
    ),
    (
        "Finish substitution",
        "Specified floor tile has a 14-week lead time. Is the equal from the approved list acceptable?",
    ),
    (
        "Conflicting dimensions",
        "Architectural and structural drawings disagree on the stair opening width. Which governs?",
    ),
    (
        "Embed plate location",
        "Embed plates at gridline C are shown on two different sheets at different elevations.",
    ),
    (
        "Door hardware",
        "Hardware schedule omits the closer for door 214. Please confirm the intended hardware set.",
    ),
];

const RFI_ANSWERS: &[&str] = &[
    "Proceed as proposed.",
    "Structural sheets govern; see revised detail in ASI-07.",
    "Substitution accepted; submit product data for the record.",
    "Drop the main below the beam; no penetrations allowed.",
    "Use hardware set 12 as on similar doors.",
];

const INCIDENTS: &[&str] = &[
    "Worker slipped on wet formwork; no injury.",
    "Dropped bolt from the deck landed inside the barricaded zone.",
    "Excavator swing came close to a ground worker; spotter re-briefed.",
    "Minor cut from sheet metal edge; first aid given.",
    "Guardrail found missing at a floor opening; replaced immediately.",
];

#[cfg(test)]
mod tests {
    use super::*;
    use pg_private::{ClusterOptions, PrivateCluster, StopMode, TempDir};
    use sqlx::postgres::PgPoolOptions;

    /// Stand-in for the gateway's migration until both are tested together.
    const REALTIME_STUB: &str = "create schema realtime; \
        create function realtime.track(tbl regclass, rooms text[], columns text[] default null, \
                                       exclude text[] default null) returns void \
        language sql as 'select null::void'; \
        create function realtime.publish(room text, event text, payload jsonb) returns void \
        language sql as 'select null::void';";

    /// Counts row changes per table, as the gateway's capture would see them.
    const CHANGE_COUNTER: &str = r#"
        create table test_changes (tbl text not null, op text not null);
        create function test_count_change() returns trigger language plpgsql as $$
        begin
            insert into test_changes values (tg_table_name, tg_op);
            return null;
        end $$;
        do $$
        declare t text;
        begin
            foreach t in array array['projects', 'tasks', 'daily_logs', 'inspections',
                                     'equipment', 'rfis', 'safety_incidents'] loop
                execute format('create trigger count_change after insert or update or delete
                                on public.%I for each row execute function test_count_change()', t);
            end loop;
        end $$;
    "#;

    async fn table_counts(pool: &PgPool) -> Vec<(String, i64)> {
        sqlx::query_as(
            "select 'tasks', count(*) from tasks union all \
             select 'projects', count(*) from projects union all \
             select 'crew_members', count(*) from crew_members union all \
             select 'equipment', count(*) from equipment union all \
             select 'rfis', count(*) from rfis",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn schema_loads_twice_and_the_writer_makes_changes() {
        let dir = TempDir::new("demo");
        let opts = ClusterOptions {
            fast_unsafe: true,
            ..ClusterOptions::default()
        };
        let cluster = PrivateCluster::start(&dir.0, opts).await.unwrap();
        let url = cluster.create_database("constructtrack").await.unwrap();
        let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
        sqlx::raw_sql(REALTIME_STUB).execute(&pool).await.unwrap();

        load_schema(&pool).await.unwrap();
        let seeded = table_counts(&pool).await;
        load_schema(&pool).await.unwrap();
        assert_eq!(table_counts(&pool).await, seeded, "loading again seeds nothing");
        let tasks = seeded.iter().find(|(t, _)| t == "tasks").unwrap().1;
        assert_eq!(tasks, 40);

        sqlx::raw_sql(CHANGE_COUNTER).execute(&pool).await.unwrap();
        let shutdown = CancellationToken::new();
        let writer = tokio::spawn(run_writer(
            pool.clone(),
            WriterOptions {
                changes_per_second: 2000.0,
            },
            shutdown.clone(),
        ));

        let deadline = Instant::now() + Duration::from_secs(30);
        let changed = loop {
            let changed: Vec<(String, i64)> =
                sqlx::query_as("select tbl || ' ' || op, count(*) from test_changes group by 1 order by 1")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let total: i64 = changed.iter().map(|(_, n)| n).sum();
            if total >= 500 && changed.len() >= 8 {
                break changed;
            }
            assert!(Instant::now() < deadline, "writer too slow: {changed:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("writer stops on shutdown")
            .unwrap()
            .unwrap();

        let has = |what: &str| changed.iter().any(|(k, _)| k == what);
        for what in [
            "tasks UPDATE",
            "daily_logs INSERT",
            "equipment UPDATE",
            "inspections INSERT",
        ] {
            assert!(has(what), "no {what} in {changed:?}");
        }
        // The board stays at a steady size: done tasks are replaced.
        let (tasks,): (i64,) = sqlx::query_as("select count(*) from tasks")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!((30..=50).contains(&tasks), "{tasks} tasks");
        let (bad,): (i64,) =
            sqlx::query_as("select count(*) from tasks where (status = 'done') <> (percent_complete = 100)")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(bad, 0, "done tasks are exactly the ones at 100 %");
    }

    #[tokio::test]
    async fn the_writer_survives_a_database_restart() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = TempDir::new("demo-restart");
        let opts = ClusterOptions {
            fast_unsafe: true,
            ..ClusterOptions::default()
        };
        let cluster = PrivateCluster::start(&dir.0, opts).await.unwrap();
        let url = cluster.create_database("constructtrack").await.unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(1))
            .connect(&url)
            .await
            .unwrap();
        sqlx::raw_sql(REALTIME_STUB).execute(&pool).await.unwrap();
        load_schema(&pool).await.unwrap();

        let shutdown = CancellationToken::new();
        let writer = tokio::spawn(run_writer(
            pool.clone(),
            WriterOptions {
                changes_per_second: 200.0,
            },
            shutdown.clone(),
        ));
        cluster.restart(StopMode::Immediate).await.unwrap();
        let restarted_at = Instant::now();

        // Updates made after the restart show the writer kept going.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let fresh: Result<i64, _> = sqlx::query_scalar(
                "select count(*) from tasks where updated_at > now() - $1::float8 * interval '1 second'",
            )
            .bind(restarted_at.elapsed().as_secs_f64())
            .fetch_one(&pool)
            .await;
            if fresh.is_ok_and(|n| n >= 5) {
                break;
            }
            assert!(Instant::now() < deadline, "no updates after the restart");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!writer.is_finished());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("writer stops on shutdown")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn tasks_move_forward() {
        let mut rng = XorShift::new(7);
        assert_eq!(
            next_step(TaskStatus::Todo, 0, &mut rng),
            TaskStep::Set(TaskStatus::InProgress, 5)
        );
        assert_eq!(
            next_step(TaskStatus::Blocked, 40, &mut rng),
            TaskStep::Set(TaskStatus::InProgress, 40)
        );
        assert_eq!(next_step(TaskStatus::Done, 100, &mut rng), TaskStep::Archive);
        for _ in 0..1000 {
            match next_step(TaskStatus::InProgress, 90, &mut rng) {
                TaskStep::Set(TaskStatus::Done, 100) | TaskStep::Set(TaskStatus::Blocked, 90) => {}
                TaskStep::Set(TaskStatus::InProgress, p) => assert!((95..100).contains(&p)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn updates_are_picked_by_weight() {
        let mut rng = XorShift::new(42);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..100_000 {
            *counts.entry(Update::pick(&mut rng)).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), Update::WEIGHTS.len());
        let advance = counts[&Update::AdvanceTask];
        assert!((32_000..36_000).contains(&advance), "{advance}");
        for _ in 0..1000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(rng.below(3) < 3);
        }
    }

    #[tokio::test]
    async fn run_writer_refuses_a_bad_rate() {
        let pool = PgPoolOptions::new().connect_lazy("postgres://nowhere/x").unwrap();
        let result = run_writer(
            pool,
            WriterOptions {
                changes_per_second: 0.0,
            },
            CancellationToken::new(),
        )
        .await;
        assert!(result.is_err());
    }
}
