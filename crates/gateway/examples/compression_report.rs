//! Bytes saved by each encoding on ConstructTrack-shaped payloads, and what
//! compressing costs: `cargo run --release --example compression_report`.

use std::time::Instant;

use serde_json::value::RawValue;
use ws_gateway::change::{Change, Op, Position};
use ws_gateway::{Unit, brotli, gzip};

/// A daily log (notes) or task row of about `bytes` bytes, worded like the
/// demo writer's.
fn row(id: i64, bytes: usize) -> Change {
    let phrases = [
        "Poured level 3 east slab, 42 m3, finished by 15:40.",
        "Formwork stripped on grid C-D; rebar inspection passed.",
        "Tower crane idle 2 h for wind above 38 km/h.",
        "Drywall delivery delayed to Thursday; crew moved to level 2 framing.",
        "Safety walk: two missing toe boards on the north stair, fixed.",
        "Electrician roughed in panels L3-E1 and L3-E2.",
        "RFI 17 answered: use 16 mm bars at 200 mm centres.",
    ];
    let mut notes = String::new();
    let mut i = id as usize;
    while notes.len() + 260 < bytes {
        notes.push_str(phrases[i % phrases.len()]);
        notes.push(' ');
        i = i.wrapping_mul(7).wrapping_add(3);
    }
    let row = format!(
        r#"{{"id": {id}, "notes": "{notes}", "weather": "overcast", "log_date": "2026-11-26", "author_id": 7, "crew_count": 23, "created_at": "2026-11-26T10:30:00.123456+00:00", "project_id": 3, "updated_at": "2026-11-26T10:30:00.123456+00:00", "temperature_c": 8.5}}"#
    );
    let key = RawValue::from_string(format!(r#"{{"id": {id}}}"#)).unwrap();
    let row = RawValue::from_string(row).unwrap();
    Change::new(
        Position(id),
        1_795_689_000_123_456,
        "public".into(),
        "daily_logs".into(),
        Op::Update,
        &key,
        &row,
        vec!["project:3".into()],
    )
}

fn time_us(f: impl Fn() -> usize) -> (usize, f64) {
    let runs = 200;
    let mut size = 0;
    let started = Instant::now();
    for _ in 0..runs {
        size = f();
    }
    (size, started.elapsed().as_secs_f64() * 1e6 / runs as f64)
}

fn main() {
    println!("| payload | message | brotli q6 | saved | time | gzip 6 | saved | time |");
    println!("|---|---|---|---|---|---|---|---|");
    for target in [200, 2_000, 20_000] {
        let change = row(1, target);
        let unit = Unit::new("project:3", &[&change], false);
        let text = unit.text.as_bytes();
        let (br, br_us) = time_us(|| brotli(text, 6).len());
        let (gz, gz_us) = time_us(|| gzip(text, 6).len());
        let saved = |n: usize| 100.0 * (1.0 - n as f64 / text.len() as f64);
        println!(
            "| {target} B | {} B | {br} B | {:.0} % | {br_us:.0} us | {gz} B | {:.0} % | {gz_us:.0} us |",
            text.len(),
            saved(br),
            saved(gz)
        );
    }
}
