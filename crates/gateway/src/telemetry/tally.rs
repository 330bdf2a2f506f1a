//! The tallies of every refusal and close, by code, for `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Counts by code: refusals (`forbidden`, `rate_limited`, 401s...) and
/// closes (4008, 1009...).
#[derive(Debug, Default)]
pub struct Tally {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    pub fn count(&self, code: &str) {
        let mut counts = self.counts.lock().expect("tally lock");
        *counts.entry(code.to_owned()).or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().expect("tally lock").clone()
    }
}
