//! Replication events to the items of committed transactions: the second
//! stage of the wal source (replication stream -> **transactions** -> batch
//! -> outbox). Plain and synchronous: one event in, at most one [`Step`] out.
//!
//! pgoutput sends a transaction whole, at its commit, in commit-LSN order
//! (streaming is off): Begin, its changes and logical messages, Commit. Each
//! item gets its index in the transaction (`seq`, from 1), so
//! `(commit_lsn, seq)` names it across sessions: a replay after a crash is
//! recognized by that pair.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use pgwire_replication::{Lsn, ReplicationEvent};

use super::pgoutput::{self, DecodeError, Message, OldKind, Relation, Value};

/// `realtime.publish` in wal mode: `pg_logical_emit_message(true, 'realtime', ...)`.
pub const EVENT_PREFIX: &str = "realtime";
/// A switch of `realtime.settings.source` (`ws-gateway source`): the content
/// names the source switched to.
pub const SWITCH_PREFIX: &str = "realtime.switch";
// `ws-gateway source notify` also commits a `realtime.drain` message in a
// transaction of its own while it holds every tracked table locked: once the
// leader's progress is past it, everything committed before is in the
// outbox. It needs nothing special here: its commit moves the progress like
// any other.

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Where an item sits in commit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct At {
    /// Its transaction's commit LSN.
    pub commit_lsn: Lsn,
    /// Its index in the transaction, from 1.
    pub seq: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    Insert,
    Update,
    Delete,
}

impl RowOp {
    pub fn as_str(self) -> &'static str {
        match self {
            RowOp::Insert => "INSERT",
            RowOp::Update => "UPDATE",
            RowOp::Delete => "DELETE",
        }
    }
}

/// One row change as decoded.
#[derive(Debug, Clone)]
pub struct RowChange {
    pub relation: Arc<Relation>,
    pub op: RowOp,
    pub new: Option<Vec<Value>>,
    pub old: Option<(OldKind, Vec<Value>)>,
}

/// What goes into the outbox, in order.
#[derive(Debug, Clone)]
pub enum Item {
    Row(RowChange),
    /// TRUNCATE of these tables (after CASCADE, each published one).
    Truncate(Vec<Arc<Relation>>),
    /// A `realtime.publish` event: its JSON document.
    Event(Bytes),
}

/// What one event amounts to.
#[derive(Debug, Clone)]
pub enum Step {
    /// An item of the open transaction.
    Item {
        at: At,
        /// Commit time, microseconds since the Unix epoch.
        committed_at_us: i64,
        item: Item,
    },
    /// The open transaction carries a switch marker (`realtime.switch`).
    Switch { to: String },
    /// The open transaction committed; `last_seq` is its last item's index.
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        last_seq: i32,
    },
    /// The server's WAL position; nothing of the publication is unsent
    /// before it.
    KeepAlive { wal_end: Lsn },
}

/// Why the stream cannot be followed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("replication stream out of step: {0}")]
    OutOfStep(String),
}

struct Open {
    commit_lsn: Lsn,
    committed_at_us: i64,
    seq: i32,
}

/// Turns the event stream into [`Step`]s, remembering each table's latest
/// Relation message.
#[derive(Default)]
pub struct Transactions {
    relations: HashMap<u32, Arc<Relation>>,
    open: Option<Open>,
}

impl Transactions {
    /// Whether a transaction is open (between Begin and Commit).
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    pub fn on_event(&mut self, event: ReplicationEvent) -> Result<Option<Step>, StreamError> {
        Ok(match event {
            ReplicationEvent::KeepAlive { wal_end, .. } => Some(Step::KeepAlive { wal_end }),
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                if self.open.is_some() {
                    return Err(StreamError::OutOfStep("Begin inside a transaction".into()));
                }
                self.open = Some(Open {
                    commit_lsn: final_lsn,
                    committed_at_us: commit_time_micros + PG_EPOCH_US,
                    seq: 0,
                });
                None
            }
            ReplicationEvent::XLogData { data, .. } => self.on_data(&data)?,
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                ..
            } => match (transactional, prefix.as_str()) {
                (true, EVENT_PREFIX) => Some(self.item(Item::Event(content))?),
                (true, SWITCH_PREFIX) => Some(Step::Switch {
                    to: String::from_utf8_lossy(&content).into_owned(),
                }),
                // A drain, another application's messages, ours out of place.
                _ => None,
            },
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                let open = self
                    .open
                    .take()
                    .ok_or_else(|| StreamError::OutOfStep("Commit without Begin".into()))?;
                if open.commit_lsn != lsn {
                    return Err(StreamError::OutOfStep(format!(
                        "Commit at {lsn}, but Begin announced {}",
                        open.commit_lsn
                    )));
                }
                Some(Step::Commit {
                    commit_lsn: lsn,
                    end_lsn,
                    last_seq: open.seq,
                })
            }
            ReplicationEvent::StoppedAt { .. } => None,
        })
    }

    fn on_data(&mut self, data: &Bytes) -> Result<Option<Step>, StreamError> {
        let row = |relations: &HashMap<u32, Arc<Relation>>, id: u32| {
            relations
                .get(&id)
                .cloned()
                .ok_or_else(|| StreamError::OutOfStep(format!("a change of relation {id} before its Relation message")))
        };
        let item = match pgoutput::decode(data)? {
            Message::Relation(relation) => {
                self.relations.insert(relation.id, Arc::new(relation));
                return Ok(None);
            }
            Message::Type | Message::Origin => return Ok(None),
            Message::Insert { relation, new } => Item::Row(RowChange {
                relation: row(&self.relations, relation)?,
                op: RowOp::Insert,
                new: Some(new),
                old: None,
            }),
            Message::Update { relation, old, new } => Item::Row(RowChange {
                relation: row(&self.relations, relation)?,
                op: RowOp::Update,
                new: Some(new),
                old,
            }),
            Message::Delete { relation, old } => Item::Row(RowChange {
                relation: row(&self.relations, relation)?,
                op: RowOp::Delete,
                new: None,
                old: Some(old),
            }),
            Message::Truncate { relations } => Item::Truncate(
                relations
                    .into_iter()
                    .map(|id| row(&self.relations, id))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Some(self.item(item)?))
    }

    fn item(&mut self, item: Item) -> Result<Step, StreamError> {
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| StreamError::OutOfStep("a change outside a transaction".into()))?;
        open.seq += 1;
        Ok(Step::Item {
            at: At {
                commit_lsn: open.commit_lsn,
                seq: open.seq,
            },
            committed_at_us: open.committed_at_us,
            item,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(id: u32) -> Bytes {
        let mut m = vec![b'R'];
        m.extend(id.to_be_bytes());
        m.extend(b"public\0t\0f");
        m.extend(1u16.to_be_bytes());
        m.push(1);
        m.extend(b"id\0");
        m.extend(20u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        Bytes::from(m)
    }

    fn insert(id: u32, value: &str) -> Bytes {
        let mut m = vec![b'I'];
        m.extend(id.to_be_bytes());
        m.push(b'N');
        m.extend(1u16.to_be_bytes());
        m.push(b't');
        m.extend((value.len() as u32).to_be_bytes());
        m.extend(value.as_bytes());
        Bytes::from(m)
    }

    fn data(bytes: Bytes) -> ReplicationEvent {
        ReplicationEvent::XLogData {
            wal_start: Lsn(0),
            wal_end: Lsn(0),
            server_time_micros: 0,
            data: bytes,
        }
    }

    #[test]
    fn items_are_numbered_within_their_transaction() {
        let mut t = Transactions::default();
        let begin = ReplicationEvent::Begin {
            final_lsn: Lsn(500),
            xid: 7,
            commit_time_micros: 1,
        };
        assert!(t.on_event(begin).unwrap().is_none());
        assert!(t.in_transaction());
        assert!(t.on_event(data(relation(9))).unwrap().is_none());
        let mut ats = Vec::new();
        for value in ["1", "2"] {
            match t.on_event(data(insert(9, value))).unwrap() {
                Some(Step::Item {
                    at, committed_at_us, ..
                }) => {
                    assert_eq!(committed_at_us, 1 + PG_EPOCH_US);
                    ats.push(at);
                }
                other => panic!("expected an item, got {other:?}"),
            }
        }
        let event = ReplicationEvent::Message {
            transactional: true,
            lsn: Lsn(450),
            prefix: EVENT_PREFIX.into(),
            content: Bytes::from_static(b"{}"),
        };
        assert!(matches!(
            t.on_event(event).unwrap(),
            Some(Step::Item {
                at: At { seq: 3, .. },
                item: Item::Event(_),
                ..
            })
        ));
        let other_app = ReplicationEvent::Message {
            transactional: true,
            lsn: Lsn(460),
            prefix: "someone.else".into(),
            content: Bytes::new(),
        };
        assert!(t.on_event(other_app).unwrap().is_none());
        assert_eq!(
            ats,
            [
                At {
                    commit_lsn: Lsn(500),
                    seq: 1
                },
                At {
                    commit_lsn: Lsn(500),
                    seq: 2
                }
            ]
        );
        let commit = ReplicationEvent::Commit {
            lsn: Lsn(500),
            end_lsn: Lsn(540),
            commit_time_micros: 1,
        };
        assert!(matches!(
            t.on_event(commit).unwrap(),
            Some(Step::Commit {
                end_lsn: Lsn(540),
                last_seq: 3,
                ..
            })
        ));
        assert!(!t.in_transaction());
    }

    #[test]
    fn a_stream_out_of_step_is_an_error() {
        let mut t = Transactions::default();
        assert!(t.on_event(data(insert(9, "1"))).is_err(), "no relation yet");
        let commit = ReplicationEvent::Commit {
            lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time_micros: 0,
        };
        assert!(t.on_event(commit).is_err(), "no begin");
        let stray = ReplicationEvent::Message {
            transactional: false,
            lsn: Lsn(77),
            prefix: EVENT_PREFIX.into(),
            content: Bytes::new(),
        };
        assert!(
            t.on_event(stray).unwrap().is_none(),
            "a non-transactional event is not ours"
        );
    }
}
