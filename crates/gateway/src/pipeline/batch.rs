//! Batching: the changes of one room that reached the gateway together are
//! sent together, up to the batch size. Nothing is held back to wait for
//! company: a change that arrives alone goes alone, at once. Changes of
//! critical and high priority tables always go alone.

/// Splits a room's changes (in commit order) into the groups that become
/// units: runs of ordinary changes up to `batch_size`, priority ones alone.
/// Returns index ranges into `priority`.
pub fn plan_units(priority: &[bool], batch_size: usize, batching: bool) -> Vec<std::ops::Range<usize>> {
    let limit = if batching { batch_size.max(1) } else { 1 };
    let mut units = Vec::new();
    let mut start = 0;
    for (i, urgent) in priority.iter().enumerate() {
        if *urgent {
            if start < i {
                units.push(start..i);
            }
            units.push(i..i + 1);
            start = i + 1;
        } else if i + 1 - start == limit {
            units.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < priority.len() {
        units.push(start..priority.len());
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_up_to_the_batch_size_and_keeps_priority_changes_alone() {
        assert_eq!(plan_units(&[false; 5], 2, true), [0..2, 2..4, 4..5]);
        assert_eq!(plan_units(&[false], 10, true), vec![0..1]);
        assert_eq!(plan_units(&[false, true, false, false], 10, true), [0..1, 1..2, 2..4]);
        assert_eq!(plan_units(&[true, true], 10, true), [0..1, 1..2]);
        assert_eq!(plan_units(&[false; 3], 10, false), [0..1, 1..2, 2..3]);
        assert!(plan_units(&[], 10, true).is_empty());
    }
}
