//! The hot path, measured: encoding (and compressing) a room's unit per
//! batch size and payload size, and fanning a change out per subscriber.
//!
//! `cargo bench --bench pipeline` (release profile).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use ws_gateway::change::{Change, Op, Position};
use ws_gateway::config::Settings;
use ws_gateway::{Encoding, Unit, brotli, gzip};
use ws_gateway::{Hub, Subscriber};

/// A ConstructTrack daily log row of about `bytes` bytes of JSON.
fn daily_log(id: i64, bytes: usize) -> Change {
    let words = [
        "Crew",
        "poured",
        "level",
        "3",
        "east",
        "slab;",
        "formwork",
        "stripped",
        "on",
        "grid",
        "C-D.",
        "Rebar",
        "inspection",
        "passed,",
        "crane",
        "idle",
        "2h",
        "for",
        "wind.",
        "Delivery",
        "of",
        "drywall",
        "delayed.",
    ];
    let mut notes = String::new();
    let mut i = id as usize;
    while notes.len() + 220 < bytes {
        notes.push_str(words[i % words.len()]);
        notes.push(' ');
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    let row = format!(
        r#"{{"id":{id},"project_id":3,"log_date":"2026-11-26","author_id":7,"weather":"overcast","temperature_c":8.5,"crew_count":23,"notes":"{notes}","created_at":"2026-11-26T10:30:00.123456+00:00","updated_at":"2026-11-26T10:30:00.123456+00:00"}}"#
    );
    let key = RawValue::from_string(format!(r#"{{"id":{id}}}"#)).unwrap();
    let row = RawValue::from_string(row).unwrap();
    Change::new(
        Position(id),
        1_795_689_000_123_456,
        "public".into(),
        "daily_logs".into(),
        Op::Insert,
        &key,
        &row,
        vec!["project:3".into()],
    )
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for payload in [200, 2_000, 20_000] {
        for batch in [1usize, 10] {
            let changes: Vec<Change> = (0..batch as i64).map(|i| daily_log(i + 1, payload)).collect();
            let refs: Vec<&Change> = changes.iter().collect();
            let unit = Unit::new("project:3", &refs, false);
            group.throughput(Throughput::Bytes(unit.text.len() as u64));
            let id = format!("{payload}B x{batch}");
            group.bench_function(BenchmarkId::new("json", &id), |b| {
                b.iter(|| Unit::new(black_box("project:3"), black_box(&refs), false))
            });
            group.bench_function(BenchmarkId::new("brotli q6", &id), |b| {
                b.iter(|| brotli(black_box(unit.text.as_bytes()), 6))
            });
            group.bench_function(BenchmarkId::new("gzip 6", &id), |b| {
                b.iter(|| gzip(black_box(unit.text.as_bytes()), 6))
            });
        }
    }
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    let settings = Settings::for_tests();
    for subscribers in [1usize, 50, 1000] {
        let hub = Hub::new(Position(0), settings.pipeline.clone(), settings.features);
        let mut queues = Vec::new();
        let mut subs = Vec::new();
        for id in 0..subscribers {
            let (sub, rx) = Subscriber::new(id as u64, usize::MAX / 2);
            hub.subscribe("project:3", &sub, None);
            subs.push(sub);
            queues.push(rx);
        }
        group.throughput(Throughput::Elements(subscribers as u64));
        let mut position = 0;
        group.bench_function(BenchmarkId::new("dispatch 2KB change", subscribers), |b| {
            b.iter(|| {
                position += 1;
                let done = hub.dispatch(Arc::new(daily_log(position, 2_000)));
                // Drain, as the send tasks would, so queues stay small.
                for (rx, sub) in queues.iter_mut().zip(&subs) {
                    while let Some(item) = rx.try_recv() {
                        sub.sent(item.queued_size());
                    }
                }
                done
            })
        });
    }
    group.finish();
    // Compression is made once per unit and shared: the cost per extra
    // subscriber of a compressed room is a clone of the bytes.
    let unit = Unit::new("project:3", &[&daily_log(1, 20_000)], false);
    c.bench_function("fan_out/compressed unit, per extra subscriber", |b| {
        unit.compressed(Encoding::Brotli, 6);
        b.iter(|| black_box(unit.compressed(Encoding::Brotli, 6).unwrap().clone()))
    });
}

criterion_group!(benches, encode, fan_out);
criterion_main!(benches);
