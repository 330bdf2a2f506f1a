//! What one receiver got of one room, against what was committed for it:
//! duplicates and out-of-order deliveries as they happen, losses at the end.
//! Pure and synchronous; the hot path is a bit test and two compares.
//!
//! Rows are numbered `1..` and row `id` belongs to room `(id - 1) % rooms`, so
//! a room's rows are `room + 1, room + 1 + rooms, ...`: a dense bitset per
//! receiver. Ids are NOT commit-ordered across writers; positions are (SPEC
//! section 2), so order is judged by position.

use serde::{Deserialize, Serialize};

/// What one delivery was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The first delivery of a row of this room.
    First,
    /// A row already delivered.
    Again,
    /// Not a row of this room (another room's, or an id never written).
    Unexpected,
}

#[derive(Debug, Clone)]
pub struct RoomLedger {
    room: u64,
    rooms: u64,
    /// Bit `(id - 1) / rooms`: this room's row `id` was delivered.
    seen: Vec<u64>,
    unique: u64,
    duplicated: u64,
    out_of_order: u64,
    unexpected: u64,
    /// The highest position delivered so far; a later delivery must exceed it.
    last_position: i64,
}

impl RoomLedger {
    pub fn new(room: u64, rooms: u64) -> RoomLedger {
        assert!(rooms > 0 && room < rooms, "room {room} of {rooms}");
        RoomLedger {
            room,
            rooms,
            seen: Vec::new(),
            unique: 0,
            duplicated: 0,
            out_of_order: 0,
            unexpected: 0,
            last_position: i64::MIN,
        }
    }

    /// Records the delivery of row `id` at `position`.
    pub fn observe(&mut self, id: u64, position: i64) -> Seen {
        let Some(index) = id.checked_sub(1) else {
            self.unexpected += 1;
            return Seen::Unexpected;
        };
        if index % self.rooms != self.room {
            self.unexpected += 1;
            return Seen::Unexpected;
        }
        let bit = index / self.rooms;
        let word = (bit / 64) as usize;
        let mask = 1u64 << (bit % 64);
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & mask != 0 {
            self.duplicated += 1;
            return Seen::Again;
        }
        self.seen[word] |= mask;
        self.unique += 1;
        if position <= self.last_position {
            self.out_of_order += 1;
        } else {
            self.last_position = position;
        }
        Seen::First
    }

    pub fn room(&self) -> u64 {
        self.room
    }

    /// Distinct rows delivered.
    pub fn unique(&self) -> u64 {
        self.unique
    }
}

/// Delivery counts over many receivers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Committed rows times the receivers of their rooms.
    pub expected: u64,
    /// Distinct rows delivered.
    pub delivered: u64,
    /// Expected and never delivered (by the end of the drain).
    pub lost: u64,
    /// Deliveries of a row the receiver had already.
    pub duplicated: u64,
    /// First deliveries whose position was not above the last one delivered.
    pub out_of_order: u64,
    /// Deliveries of rows not expected at all (another room's, never written).
    pub unexpected: u64,
}

impl Tally {
    /// Adds one receiver that should have received `expected` rows.
    pub fn add(&mut self, ledger: &RoomLedger, expected: u64) {
        self.expected += expected;
        self.delivered += ledger.unique;
        self.lost += expected.saturating_sub(ledger.unique);
        self.duplicated += ledger.duplicated;
        self.out_of_order += ledger.out_of_order;
        self.unexpected += ledger.unexpected;
    }

    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_first_deliveries_duplicates_and_strangers() {
        // Room 1 of 3 holds rows 2, 5, 8, ...
        let mut ledger = RoomLedger::new(1, 3);
        assert_eq!(ledger.observe(2, 10), Seen::First);
        assert_eq!(ledger.observe(5, 11), Seen::First);
        assert_eq!(ledger.observe(5, 11), Seen::Again);
        assert_eq!(ledger.observe(3, 12), Seen::Unexpected);
        assert_eq!(ledger.observe(0, 13), Seen::Unexpected);
        // Far ids grow the bitset.
        assert_eq!(ledger.observe(3 * 10_000 + 2, 14), Seen::First);
        assert_eq!(ledger.unique(), 3);
        assert_eq!(ledger.duplicated, 1);
        assert_eq!(ledger.unexpected, 2);
        assert_eq!(ledger.out_of_order, 0);
    }

    #[test]
    fn order_is_judged_by_position_not_id() {
        let mut ledger = RoomLedger::new(0, 1);
        // Ids out of order but positions increasing: commit order, fine.
        ledger.observe(7, 100);
        ledger.observe(3, 101);
        ledger.observe(5, 105);
        assert_eq!(ledger.out_of_order, 0);
        // A position at or below the last one is out of order, once.
        ledger.observe(9, 104);
        ledger.observe(10, 105);
        assert_eq!(ledger.out_of_order, 2);
        // Later deliveries are judged against the highest position, 105.
        ledger.observe(11, 106);
        assert_eq!(ledger.out_of_order, 2);
        // A duplicate is a duplicate, not also out of order.
        ledger.observe(3, 101);
        assert_eq!((ledger.duplicated, ledger.out_of_order), (1, 2));
    }

    #[test]
    fn tallies_losses_against_expectations() {
        let mut a = RoomLedger::new(0, 2);
        for (i, id) in [1, 3, 5].into_iter().enumerate() {
            a.observe(id, i as i64);
        }
        a.observe(3, 9);
        let mut b = RoomLedger::new(1, 2);
        b.observe(2, 1);
        let mut tally = Tally::default();
        tally.add(&a, 3);
        tally.add(&b, 3);
        assert_eq!(
            tally,
            Tally {
                expected: 6,
                delivered: 4,
                lost: 2,
                duplicated: 1,
                out_of_order: 0,
                unexpected: 0,
            }
        );
        assert!(!tally.is_clean());
        let mut clean = Tally::default();
        clean.add(&b, 1);
        assert!(clean.is_clean());
    }
}
