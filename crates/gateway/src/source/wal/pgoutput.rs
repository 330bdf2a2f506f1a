//! The pgoutput protocol (version 1) messages that `pgwire-replication`
//! leaves raw in `XLogData`: Relation, Type, Origin, Insert, Update, Delete,
//! Truncate. Begin, Commit and logical decoding messages arrive as events of
//! their own. Pure: bytes in, a [`Message`] out.

use bytes::Bytes;

/// Why a pgoutput message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput: {0}")]
pub struct DecodeError(String);

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// `u`: a TOASTed value the change left unchanged, which the WAL record
    /// does not carry (filled from the old tuple, see [`fill_unchanged`]).
    Unchanged,
    /// The value in its type's text output.
    Text(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// A table as pgoutput describes it before its first change in a session
/// (and again after it changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `relreplident`: `f` (full), `d` (default), `n` (nothing), `i` (index).
    pub identity: u8,
    pub columns: Vec<Column>,
}

/// Which old tuple an UPDATE or DELETE carries: `O` (the whole row, with
/// REPLICA IDENTITY FULL) or `K` (the replica identity's columns only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    Full,
    Key,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Relation(Relation),
    /// A type's name (for types outside pg_catalog): not needed, values are text.
    Type,
    Origin,
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        old: Option<(OldKind, Vec<Value>)>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: (OldKind, Vec<Value>),
    },
    Truncate {
        relations: Vec<u32>,
    },
}

struct Reader<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.buf.len() - self.at < n {
            return Err(bad(format!(
                "message truncated at byte {} ({n} more expected)",
                self.at
            )));
        }
        self.at += n;
        Ok(&self.buf[self.at - n..self.at])
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad("string without its terminator"))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| bad("a name that is not UTF-8"))?
            .to_owned();
        self.at += end + 1;
        Ok(s)
    }

    /// A slice of the message, without copying.
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.take(n)?;
        Ok(self.buf.slice(self.at - n..self.at))
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.u16()? as usize;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.bytes(len)?)
                }
                b'b' => return Err(bad("a binary value (the stream was started with binary 'true')")),
                other => return Err(bad(format!("unknown tuple value kind {:?}", other as char))),
            });
        }
        Ok(out)
    }

    fn old_kind(kind: u8) -> Option<OldKind> {
        match kind {
            b'O' => Some(OldKind::Full),
            b'K' => Some(OldKind::Key),
            _ => None,
        }
    }
}

/// Decodes one pgoutput message.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let tag = *data.first().ok_or_else(|| bad("empty message"))?;
    let mut r = Reader { buf: data, at: 1 };
    Ok(match tag {
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                // Flags: 1 marks the replica identity's columns (with FULL,
                // all of them); keys come from realtime.tracked instead.
                let _flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
                columns.push(Column { name, type_oid });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                identity,
                columns,
            })
        }
        b'Y' => Message::Type,
        b'O' => Message::Origin,
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err(bad("an INSERT without its new tuple"));
            }
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if let Some(old_kind) = Reader::old_kind(kind) {
                old = Some((old_kind, r.tuple()?));
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(bad("an UPDATE without its new tuple"));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = Reader::old_kind(r.u8()?).ok_or_else(|| bad("a DELETE without its old tuple"))?;
            Message::Delete {
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let _flags = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        other => {
            return Err(bad(format!(
                "unexpected message {:?} (streaming and two-phase are off)",
                other as char
            )));
        }
    })
}

/// Fills the `u` values of an UPDATE's new tuple from its old tuple (which
/// REPLICA IDENTITY FULL carries whole). Returns the names of columns that
/// stayed unknown: no old tuple carried them.
pub fn fill_unchanged<'r>(relation: &'r Relation, new: &mut [Value], old: Option<&[Value]>) -> Vec<&'r str> {
    let mut unknown = Vec::new();
    for (i, value) in new.iter_mut().enumerate() {
        if *value != Value::Unchanged {
            continue;
        }
        match old.and_then(|o| o.get(i)) {
            Some(Value::Text(b)) => *value = Value::Text(b.clone()),
            Some(Value::Null) => *value = Value::Null,
            _ => unknown.extend(relation.columns.get(i).map(|c| c.name.as_str())),
        }
    }
    unknown
}

/// `json` and `jsonb`: their text is JSON already.
const JSON_TYPES: [u32; 2] = [114, 3802];

/// The row as a JSON object of its values' text, which the database turns
/// back into the table's row type (`json_populate_record` feeds each string
/// to its type's input function): json and jsonb values are embedded as
/// they are, everything else is a JSON string. Unknown (`u`) values are left
/// out. Text that is not UTF-8 (a database whose encoding is not UTF8) is
/// replaced lossily.
pub fn row_json(relation: &Relation, values: &[Value]) -> String {
    let mut out = String::with_capacity(
        16 + values
            .iter()
            .map(|v| match v {
                Value::Text(b) => b.len() + 24,
                _ => 24,
            })
            .sum::<usize>(),
    );
    out.push('{');
    let mut first = true;
    for (column, value) in relation.columns.iter().zip(values) {
        let text = match value {
            Value::Unchanged => continue,
            Value::Null => None,
            Value::Text(b) => Some(utf8(b)),
        };
        if !first {
            out.push(',');
        }
        first = false;
        crate::change::push_json_str(&mut out, &column.name);
        out.push(':');
        match text {
            None => out.push_str("null"),
            Some(text) if JSON_TYPES.contains(&column.type_oid) => out.push_str(&text),
            Some(text) => crate::change::push_json_str(&mut out, &text),
        }
    }
    out.push('}');
    out
}

/// A value's text: borrowed when it is UTF-8, as it nearly always is.
/// `from_utf8`'s validation skips ASCII a word at a time;
/// `from_utf8_lossy`'s goes byte by byte: it was a sixth of the gateway's
/// CPU while its leader wrote rows of 8 KB.
fn utf8(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_message() -> Bytes {
        let mut m = vec![b'R'];
        m.extend(16384u32.to_be_bytes());
        m.extend(b"public\0items\0");
        m.push(b'f');
        m.extend(3u16.to_be_bytes());
        for (name, oid) in [("id", 20u32), ("doc", 3802), ("body", 25)] {
            m.push(1);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(oid.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        Bytes::from(m)
    }

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut t = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => t.push(b'n'),
                Some("<u>") => t.push(b'u'),
                Some(text) => {
                    t.push(b't');
                    t.extend((text.len() as u32).to_be_bytes());
                    t.extend(text.as_bytes());
                }
            }
        }
        t
    }

    #[test]
    fn decodes_a_relation_and_an_update_with_its_old_row() {
        let Message::Relation(relation) = decode(&relation_message()).unwrap() else {
            panic!("expected a relation")
        };
        assert_eq!(relation.id, 16384);
        assert_eq!((relation.schema.as_str(), relation.name.as_str()), ("public", "items"));
        assert_eq!(relation.identity, b'f');
        assert_eq!(relation.columns[1].type_oid, 3802);

        let mut m = vec![b'U'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'O');
        m.extend(tuple(&[Some("1"), Some(r#"{"a": 1}"#), Some("long text")]));
        m.push(b'N');
        m.extend(tuple(&[Some("1"), None, Some("<u>")]));
        let Message::Update {
            relation: id,
            old,
            mut new,
        } = decode(&Bytes::from(m)).unwrap()
        else {
            panic!("expected an update")
        };
        assert_eq!(id, 16384);
        let (kind, old) = old.unwrap();
        assert_eq!(kind, OldKind::Full);
        assert_eq!(new[2], Value::Unchanged);
        assert!(fill_unchanged(&relation, &mut new, Some(&old)).is_empty());
        assert_eq!(new[2], Value::Text(Bytes::from_static(b"long text")));
        assert_eq!(row_json(&relation, &new), r#"{"id":"1","doc":null,"body":"long text"}"#);
        assert_eq!(
            row_json(&relation, &old),
            r#"{"id":"1","doc":{"a": 1},"body":"long text"}"#,
            "jsonb goes in as JSON"
        );
    }

    #[test]
    fn an_unchanged_value_without_an_old_row_is_named_and_left_out() {
        let Message::Relation(relation) = decode(&relation_message()).unwrap() else {
            panic!()
        };
        let mut new = vec![Value::Text(Bytes::from_static(b"2")), Value::Null, Value::Unchanged];
        assert_eq!(fill_unchanged(&relation, &mut new, None), ["body"]);
        assert_eq!(row_json(&relation, &new), r#"{"id":"2","doc":null}"#);
    }

    #[test]
    fn text_that_is_not_utf8_is_replaced_and_the_rest_kept() {
        let Message::Relation(relation) = decode(&relation_message()).unwrap() else {
            panic!()
        };
        let values = [
            Value::Text(Bytes::from_static(b"3")),
            Value::Null,
            Value::Text(Bytes::from_static(b"caf\xe9 \xc3\xa9t\xc3\xa9")),
        ];
        assert_eq!(
            row_json(&relation, &values),
            "{\"id\":\"3\",\"doc\":null,\"body\":\"caf\u{fffd} été\"}"
        );
    }

    #[test]
    fn decodes_delete_insert_and_truncate() {
        let mut m = vec![b'D'];
        m.extend(7u32.to_be_bytes());
        m.push(b'K');
        m.extend(tuple(&[Some("9")]));
        assert_eq!(
            decode(&Bytes::from(m)).unwrap(),
            Message::Delete {
                relation: 7,
                old: (OldKind::Key, vec![Value::Text(Bytes::from_static(b"9"))])
            }
        );
        let mut m = vec![b'I'];
        m.extend(7u32.to_be_bytes());
        m.push(b'N');
        m.extend(tuple(&[None]));
        assert_eq!(
            decode(&Bytes::from(m)).unwrap(),
            Message::Insert {
                relation: 7,
                new: vec![Value::Null]
            }
        );
        let mut m = vec![b'T'];
        m.extend(2u32.to_be_bytes());
        m.push(1);
        m.extend(7u32.to_be_bytes());
        m.extend(8u32.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(m)).unwrap(),
            Message::Truncate { relations: vec![7, 8] }
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(decode(&Bytes::new()).is_err());
        assert!(
            decode(&Bytes::from_static(b"S")).is_err(),
            "stream start: streaming is off"
        );
        let mut m = vec![b'I'];
        m.extend(7u32.to_be_bytes());
        m.push(b'N');
        m.extend(1u16.to_be_bytes());
        m.push(b't');
        m.extend(100u32.to_be_bytes());
        m.extend(b"short");
        let error = decode(&Bytes::from(m)).unwrap_err();
        assert!(error.to_string().contains("truncated"), "{error}");
    }
}
