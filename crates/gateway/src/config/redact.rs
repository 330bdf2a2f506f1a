//! Redaction: secrets in a [`Secret`] that cannot be printed, and what an
//! error or a log line may show of a value.

use std::fmt;

/// A value that must not be printed: a JWT secret, a database URL with its
/// password. Its `Debug` says only how long it is and nothing implements
/// `Display`, so neither `{:?}` of the settings nor a stray log line leaks
/// it; [`Secret::expose`] is the one way to read it, easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes, hidden>", self.0.len())
    }
}

/// What an error may show of a value: never a secret, never a password.
pub(super) fn shown_value(variable: &str, value: &str) -> String {
    match variable {
        "GATEWAY_JWT_SECRET" if !value.is_empty() => format!("<{} bytes, hidden>", value.len()),
        "DATABASE_URL" => redact_url(value),
        _ => value.to_owned(),
    }
}

/// `postgres://user:secret@host/db?password=x` -> `postgres://user:***@host/db?password=***`.
pub(super) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last `@` ends the user info even when an unencoded password holds
    // `/`, `?` or `@`.
    let (userinfo, location) = match rest.rsplit_once('@') {
        Some((userinfo, location)) => match userinfo.split_once(':') {
            Some((user, _password)) => (format!("{user}:***@"), location),
            None => (format!("{userinfo}@"), location),
        },
        None => (String::new(), rest),
    };
    let location = match location.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => location.to_owned(),
    };
    format!("{scheme}://{userinfo}{location}")
}
