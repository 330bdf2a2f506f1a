//! The privileges a least-privileged gateway role needs on the `realtime`
//! schema, per capture source (`ws-gateway grants ROLE [--apply]`). The
//! schema's owner runs `ws-gateway migrate` at deploy; the gateway then runs
//! as this role with `GATEWAY_AUTO_MIGRATE=false`. The test suite runs the
//! gateway as such a role.

/// The capture source the grants are for (SPEC section 8): each reads the
/// database differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantSource {
    /// LISTEN plus outbox catch-up: `GATEWAY_SOURCE=notify`, the default.
    Notify,
}

impl GrantSource {
    pub const NAMES: &[&str] = &["notify"];

    pub fn parse(name: &str) -> Option<GrantSource> {
        match name {
            "notify" => Some(GrantSource::Notify),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GrantSource::Notify => "notify",
        }
    }
}

/// One statement, and why the gateway needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub why: &'static str,
    pub sql: String,
}

/// `name` as a quoted SQL identifier.
fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The statements that let `role` run the gateway with `source`, in the
/// order to run them. Errs when `role` cannot be a role's name.
pub fn grants(role: &str, source: GrantSource) -> Result<Vec<Grant>, String> {
    if role.is_empty() || role.len() > 63 || role.contains('\0') {
        return Err(format!("{role:?} is not a role name: expected 1 to 63 bytes"));
    }
    let r = identifier(role);
    let lit = literal(role);
    let shared = vec![
        Grant {
            why: "connect to the database (PUBLIC has this by default; a hardened database revokes it)",
            sql: format!(
                "do $$ begin execute format('grant connect on database %I to %I', current_database(), {lit}); end $$;"
            ),
        },
        Grant {
            why: "see the realtime schema",
            sql: format!("grant usage on schema realtime to {r};"),
        },
        Grant {
            why: "the start-up check of the channel, and how far history was pruned (catch-up, resumes)",
            sql: format!("grant select on realtime.settings to {r};"),
        },
        Grant {
            why: "the pruner records how far it pruned (GATEWAY_HISTORY_RETENTION)",
            sql: format!("grant update (pruned_through) on realtime.settings to {r};"),
        },
        Grant {
            why: "catch-up after a reconnect, resumes from history, and pruning the outbox",
            sql: format!("grant select, delete on realtime.changes to {r};"),
        },
        Grant {
            why: "the probe's row is captured like any tracked table's: its trigger writes the outbox, \
                  and draws a position, as the gateway's role",
            sql: format!("grant insert on realtime.changes to {r};"),
        },
        Grant {
            why: "the latest position (select) and the probe's positions (usage)",
            sql: format!("grant select, usage on sequence realtime.position_seq to {r};"),
        },
        Grant {
            why: "the probe's row, upserted every GATEWAY_PROBE_INTERVAL_MS, and rows of instances gone a day",
            sql: format!("grant select, insert, update, delete on realtime.probe to {r};"),
        },
        Grant {
            why: "the document a change travels as (catch-up reads) and the probe's capture trigger \
                  (PUBLIC has these by default; a hardened database revokes it)",
            sql: format!(
                "do $$ begin execute format('grant execute on function realtime.payload(realtime.changes), %s() to %I', \
                 realtime.capture_function('realtime.probe'::regclass), {lit}); end $$;"
            ),
        },
        Grant {
            why: "realtime.authorize(sub, room), if the application defined it (it runs as the gateway's role: \
                  grant it what it reads, too)",
            sql: format!(
                "do $$ begin if to_regprocedure('realtime.authorize(text, text)') is not null then \
                 execute format('grant execute on function realtime.authorize(text, text) to %I', {lit}); end if; end $$;"
            ),
        },
    ];
    // What each source needs beyond the outbox.
    let own: Vec<Grant> = match source {
        // LISTEN needs no privilege.
        GrantSource::Notify => Vec::new(),
    };
    Ok(shared.into_iter().chain(own).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_quoted_and_checked() {
        let list = grants("gate\"way", GrantSource::Notify).unwrap();
        assert!(
            list.iter()
                .any(|g| g.sql == "grant usage on schema realtime to \"gate\"\"way\";")
        );
        assert!(list.iter().all(|g| g.sql.ends_with(';')));
        assert!(grants("", GrantSource::Notify).is_err());
        assert!(grants(&"x".repeat(64), GrantSource::Notify).is_err());
        let quoted = grants("o'brien", GrantSource::Notify).unwrap();
        assert!(quoted[0].sql.contains("'o''brien'"), "{}", quoted[0].sql);
        assert_eq!(GrantSource::parse("notify"), Some(GrantSource::Notify));
        assert_eq!(GrantSource::parse("wal"), None);
    }
}
