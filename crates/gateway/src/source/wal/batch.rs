//! Decoded items into the arrays of one `realtime.wal_write` call: the
//! third stage of the wal source (stream -> transactions -> **batch** ->
//! outbox). Plain and synchronous.
//!
//! The rows go to the database as JSON objects of their values' text: the
//! database renders them (row, key, rooms) with the same SQL as the trigger,
//! so both sources deliver the same documents.

use pgwire_replication::Lsn;

use super::pgoutput::{self, OldKind};
use super::transactions::{At, Item, RowChange, RowOp};
use crate::db::WalBatch;

/// What the batch had to say about a change it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concern {
    /// An UPDATE left TOASTed columns unchanged and no old row carried
    /// them: the table's REPLICA IDENTITY is not FULL.
    UnknownColumns { table: String, columns: Vec<String> },
    /// An UPDATE or DELETE without the whole old row (REPLICA IDENTITY not
    /// FULL): the old row's rooms, or a DELETE's row, are incomplete.
    PartialOldRow { table: String },
    /// A `realtime` logical message that is not `realtime.publish`'s
    /// document (someone else's `pg_logical_emit_message`): not carried.
    BadEvent { error: String },
}

/// A [`WalBatch`] being filled, with its size.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: WalBatch,
    /// Bytes of row text held.
    pub bytes: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.bytes = 0;
    }

    /// Adds one decoded item; returns what looked wrong with it.
    pub fn push(&mut self, at: At, committed_at_us: i64, item: &Item) -> Option<Concern> {
        match item {
            Item::Row(change) => self.push_row(at, committed_at_us, change),
            Item::Truncate(relations) => {
                // One entry per table (a TRUNCATE of several, or CASCADE),
                // at the item's place: the database gives it the table's
                // room patterns, and skips a table that is not tracked.
                for relation in relations {
                    self.push_entry(at, committed_at_us, Entry::of(relation, "TRUNCATE"));
                }
                self.rows.upto = Some((at.commit_lsn.to_string(), at.seq));
                None
            }
            Item::Event(content) => {
                self.rows.upto = Some((at.commit_lsn.to_string(), at.seq));
                match event_document(content) {
                    Ok(document) => {
                        self.bytes += document.len();
                        let entry = Entry {
                            table: 0,
                            schema: "",
                            name: "",
                            op: "EVENT",
                            new: Some(document),
                            old: None,
                        };
                        self.push_entry(at, committed_at_us, entry);
                        None
                    }
                    Err(error) => Some(Concern::BadEvent { error }),
                }
            }
        }
    }

    fn push_entry(&mut self, at: At, committed_at_us: i64, entry: Entry<'_>) {
        let rows = &mut self.rows;
        rows.commit_lsns.push(at.commit_lsn.to_string());
        rows.seqs.push(at.seq);
        rows.committed_ats
            .push(crate::change::format_rfc3339_micros(committed_at_us));
        rows.tables.push(entry.table);
        rows.schemas.push(entry.schema.to_owned());
        rows.names.push(entry.name.to_owned());
        rows.ops.push(entry.op);
        rows.news.push(entry.new);
        rows.olds.push(entry.old);
        rows.upto = Some((at.commit_lsn.to_string(), at.seq));
    }

    fn push_row(&mut self, at: At, committed_at_us: i64, change: &RowChange) -> Option<Concern> {
        let relation = &change.relation;
        let table = || format!("{}.{}", relation.schema, relation.name);
        let mut concern = None;
        let old = change.old.as_ref();
        if change.op != RowOp::Insert && !matches!(old, Some((OldKind::Full, _))) {
            concern = Some(Concern::PartialOldRow { table: table() });
        }
        let new = change.new.as_ref().map(|values| {
            let mut values = values.clone();
            let unknown = pgoutput::fill_unchanged(relation, &mut values, old.map(|(_, v)| v.as_slice()));
            if !unknown.is_empty() {
                concern = Some(Concern::UnknownColumns {
                    table: table(),
                    columns: unknown.iter().map(|c| (*c).to_owned()).collect(),
                });
            }
            pgoutput::row_json(relation, &values)
        });
        let old = old.map(|(_, values)| pgoutput::row_json(relation, values));
        self.bytes += new.as_ref().map_or(0, String::len) + old.as_ref().map_or(0, String::len);
        let entry = Entry {
            new,
            old,
            ..Entry::of(relation, change.op.as_str())
        };
        self.push_entry(at, committed_at_us, entry);
        concern
    }

    /// A transaction ends in this batch: once written, the slot may be
    /// confirmed to `end_lsn`, and everything of it is done.
    pub fn commit(&mut self, commit_lsn: Lsn, end_lsn: Lsn, last_seq: i32) {
        self.rows.upto = Some((commit_lsn.to_string(), last_seq.max(0)));
        self.rows.end_lsn = Some(end_lsn.to_string());
    }
}

/// One element of the batch's arrays.
struct Entry<'a> {
    /// The table's oid (0 for an event).
    table: i64,
    schema: &'a str,
    name: &'a str,
    /// INSERT, UPDATE, DELETE, TRUNCATE or EVENT.
    op: &'static str,
    new: Option<String>,
    old: Option<String>,
}

impl Entry<'_> {
    fn of<'a>(relation: &'a pgoutput::Relation, op: &'static str) -> Entry<'a> {
        Entry {
            table: i64::from(relation.id),
            schema: &relation.schema,
            name: &relation.name,
            op,
            new: None,
            old: None,
        }
    }
}

/// `realtime.publish`'s message (`{"room","event","payload"}`, migrations
/// 0006), checked: a malformed one would fail the whole batch's write.
fn event_document(content: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[allow(dead_code)]
        room: &'a str,
        #[allow(dead_code)]
        event: &'a str,
        #[allow(dead_code)]
        #[serde(borrow)]
        payload: Option<&'a serde_json::value::RawValue>,
    }
    let text = std::str::from_utf8(content).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str::<Event>(text).map_err(|e| e.to_string())?;
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::source::wal::pgoutput::{Column, Relation, Value};

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            id: 42,
            schema: "public".into(),
            name: "items".into(),
            identity: b'f',
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                },
                Column {
                    name: "body".into(),
                    type_oid: 25,
                },
            ],
        })
    }

    fn text(s: &'static str) -> Value {
        Value::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn an_update_takes_unchanged_columns_from_its_old_row() {
        let mut batch = Batch::default();
        let change = RowChange {
            relation: relation(),
            op: RowOp::Update,
            new: Some(vec![text("1"), Value::Unchanged]),
            old: Some((OldKind::Full, vec![text("1"), text("big")])),
        };
        let at = At {
            commit_lsn: Lsn(0x1_0000_0010),
            seq: 1,
        };
        assert_eq!(batch.push(at, 0, &Item::Row(change)), None);
        batch.commit(Lsn(0x1_0000_0010), Lsn(0x1_0000_0040), 1);
        let rows = &batch.rows;
        assert_eq!(rows.news, [Some(r#"{"id":"1","body":"big"}"#.to_owned())]);
        assert_eq!(rows.olds, [Some(r#"{"id":"1","body":"big"}"#.to_owned())]);
        assert_eq!(rows.commit_lsns, ["1/10"]);
        assert_eq!(rows.committed_ats, ["1970-01-01T00:00:00.000000Z"]);
        assert_eq!(rows.upto, Some(("1/10".to_owned(), 1)));
        assert_eq!(rows.end_lsn.as_deref(), Some("1/40"));
    }

    #[test]
    fn without_replica_identity_full_it_says_what_is_missing() {
        let mut batch = Batch::default();
        let change = RowChange {
            relation: relation(),
            op: RowOp::Update,
            new: Some(vec![text("1"), Value::Unchanged]),
            old: None,
        };
        let at = At {
            commit_lsn: Lsn(1),
            seq: 1,
        };
        assert_eq!(
            batch.push(at, 0, &Item::Row(change)),
            Some(Concern::UnknownColumns {
                table: "public.items".into(),
                columns: vec!["body".into()]
            })
        );
        let delete = RowChange {
            relation: relation(),
            op: RowOp::Delete,
            new: None,
            old: Some((OldKind::Key, vec![text("1"), Value::Null])),
        };
        assert_eq!(
            batch.push(At { seq: 2, ..at }, 0, &Item::Row(delete)),
            Some(Concern::PartialOldRow {
                table: "public.items".into()
            })
        );
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn events_and_truncations_take_their_place_and_a_foreign_message_is_refused() {
        let mut batch = Batch::default();
        let at = |seq| At {
            commit_lsn: Lsn(0x500),
            seq,
        };
        let event = Bytes::from_static(br#"{"room":"project:1","event":"passed","payload":{"id":7}}"#);
        assert_eq!(batch.push(at(1), 0, &Item::Event(event.clone())), None);
        assert_eq!(
            batch.push(at(2), 0, &Item::Truncate(vec![relation(), relation()])),
            None
        );
        let foreign = Item::Event(Bytes::from_static(b"not json"));
        assert!(matches!(batch.push(at(3), 0, &foreign), Some(Concern::BadEvent { .. })));
        let rows = &batch.rows;
        assert_eq!(rows.ops, ["EVENT", "TRUNCATE", "TRUNCATE"]);
        assert_eq!(rows.tables, [0, 42, 42]);
        assert_eq!(rows.seqs, [1, 2, 2]);
        assert_eq!(rows.news[0].as_deref(), std::str::from_utf8(&event).ok());
        assert_eq!(rows.names, ["", "items", "items"]);
        // The refused one still moves the progress past it.
        assert_eq!(rows.upto, Some(("0/500".to_owned(), 3)));
    }
}
